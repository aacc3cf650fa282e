"""The tones world's synthesiser: seeded two-second melodies with five audible attributes, and their captions.

A clip is a melody of 4 to 16 notes at 16 kHz, described by a :class:`Tone`:

* instrument (timbre), four families made far apart on purpose, because a mel-VAE blurs fine spectral detail
  (an earlier attempt with subtle timbres left them at chance after the autoencoder):
  ``flute`` a near-sine with breath noise, a soft attack and vibrato; ``clarinet`` odd harmonics only,
  moderate brightness, a flat sustain; ``brass`` every harmonic up to 7.8 kHz (sawtooth-like, the brightest),
  a dark-to-bright swell at each onset; ``plucked`` a sharp attack and a fast exponential decay that also
  darkens. In every timbre the
  fundamental is the strongest partial, so a spectrum's peak is the note's pitch.
* register: fundamentals within one octave each, ``low`` 110-220 Hz, ``middle`` 262-523 Hz, ``high``
  622-1245 Hz (MIDI notes 45-57, 60-72, 75-87, plus at most 20 cents of detune), with three semitones between
  neighbouring registers.
* tempo: ``slow`` 2-3 notes per second (4-6 notes per clip), ``fast`` 6-8 (12-16 notes); every note stops
  shortly before the next one starts, so each note is a separate onset.
* contour: ``rising``, ``falling`` or ``arch`` (up, then down): the melody follows that shape over the clip,
  spanning 7-12 semitones, and every note scoops 3-4 semitones into its pitch (within the register) from the
  side the melody comes from: up while it rises, down while it falls; the arch's peak note has none. The
  scoops give contour a local cue. Without them the tiny CLAP's HTSAT audio tower, which average-pools its
  patch tokens, stayed at chance on contour; supervised on all five attributes for 300 small steps it
  reached contour accuracy 0.59 with 1.5-2.5 semitone scoops and 0.79 with these.
* loudness: ``quiet`` (peak 0.12-0.18) or ``loud`` (peak 0.6-0.8); clips are peak-normalised after synthesis,
  and the added noise is relative to the peak, so loudness is a pure gain.

Within a class everything else is random per clip (seeded): note count, exact pitches, span, detune, onset
jitter, gaps, attack and decay times, vibrato, noise level (-45 to -35 dB below the peak). The only systematic
differences are the attributes.

Seeds. A clip is a function of its Tone and an integer seed (:func:`synthesize`). Every consumer draws its clip
seeds from its own block (:func:`clip_seeds`), so the data of two purposes never share a clip::

    seed = SEED_BLOCKS[purpose] * 10**9 + seed_index * 10**6 + (900_000 if held_out else 0) + i

with purposes ``data`` (the text-to-audio VAE/UNet training clips), ``clap`` (the CLAP), ``gold`` (the gold
judge), ``exemplar`` (the exemplar set) and ``aesthetic`` (the aesthetic head), ``seed_index`` (a recipe seed)
in [0, 1000), up to 900,000 training and 100,000 held-out clips per (purpose, seed_index).

The generation path, imitated. :func:`log_mel` (n_fft 1024, hop 160, 64 Slaney-style mel bins over 0-8 kHz,
dB) is the gold judge's front end, and :func:`degrade` returns clips as a mel-VAE + Griffin-Lim vocoder would
(blurred log-mel, pseudo-inverse, a few Griffin-Lim iterations); the gold judge and the CLAP train on a share
of degraded clips so that they also read generated audio.

Speed (measured, 1 thread, with other jobs on the 2-core machine): :func:`make_dataset` of 5,000 clips takes
34 s (4-7 ms per clip), :func:`log_mel` of them 24 s, :func:`degrade` about 60 ms per clip.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SAMPLE_RATE = 16_000
CLIP_SECONDS = 2.0
CLIP_SAMPLES = 32_000

# Attribute -> values, in the field order of Tone. Saved beside trained models, which refuse other lists.
VOCABULARIES: dict[str, tuple[str, ...]] = {
    "instrument": ("flute", "clarinet", "brass", "plucked"),
    "register": ("low", "middle", "high"),
    "tempo": ("slow", "fast"),
    "contour": ("rising", "falling", "arch"),
    "loudness": ("quiet", "loud"),
}
ATTRIBUTES: tuple[str, ...] = tuple(VOCABULARIES)

# Lowest MIDI note of each register; a register spans 12 semitones from there.
REGISTER_LOWEST_MIDI: dict[str, int] = {"low": 45, "middle": 60, "high": 75}
REGISTER_SPAN = 12
NOTES_PER_SECOND: dict[str, tuple[float, float]] = {"slow": (2.0, 3.0), "fast": (6.0, 8.0)}
PEAK: dict[str, tuple[float, float]] = {"quiet": (0.12, 0.18), "loud": (0.6, 0.8)}

SEED_BLOCKS: dict[str, int] = {"data": 0, "clap": 1, "gold": 2, "exemplar": 3, "aesthetic": 4}
_BLOCK, _PER_SEED, _HELD_OUT_START = 10**9, 10**6, 900_000

# Partials stay below this, under the 8 kHz Nyquist frequency even with vibrato and detune.
_MAX_PARTIAL_HZ = 7_800.0
_TABLE_SIZE = 4096  # wavetable length: linear interpolation error is ~1e-6 of the amplitude
_MAX_HARMONICS = 72  # 7.8 kHz / the lowest fundamental (about 109 Hz)
_RELEASE_SECONDS = 0.01  # every note fades out over its last 10 ms, so notes never click


@dataclass(frozen=True)
class Tone:
    """One clip's attributes; each field is a value of VOCABULARIES[field]."""

    instrument: str
    register: str
    tempo: str
    contour: str
    loudness: str

    def __post_init__(self) -> None:
        for name in ATTRIBUTES:
            if getattr(self, name) not in VOCABULARIES[name]:
                raise ValueError(f"{name} must be one of {VOCABULARIES[name]}, got {getattr(self, name)!r}")


# Every attribute combination, in a fixed order (4 * 3 * 2 * 3 * 2 = 144).
ALL_TONES: tuple[Tone, ...] = tuple(Tone(*values) for values in itertools.product(*VOCABULARIES.values()))


def vocabularies() -> dict[str, list[str]]:
    """VOCABULARIES as plain lists (JSON-comparable), for the configs saved beside trained models."""
    return {name: list(values) for name, values in VOCABULARIES.items()}


def sample_tones(n: int, rng: np.random.Generator) -> list[Tone]:
    """n tones, uniform over all attribute combinations (each attribute independently uniform)."""
    return [ALL_TONES[i] for i in rng.integers(len(ALL_TONES), size=n)]


def clip_seeds(purpose: str, n: int, *, seed: int = 0, held_out: bool = False) -> list[int]:
    """n clip seeds from ``purpose``'s block (see the module docstring); distinct purposes, seeds and the
    training / held-out halves never overlap."""
    if purpose not in SEED_BLOCKS:
        raise ValueError(f"unknown seed purpose {purpose!r}; known: {sorted(SEED_BLOCKS)}")
    if not 0 <= seed < _BLOCK // _PER_SEED:
        raise ValueError(f"seed must be in [0, {_BLOCK // _PER_SEED}), got {seed}")
    room = _PER_SEED - _HELD_OUT_START if held_out else _HELD_OUT_START
    if not 0 <= n <= room:
        raise ValueError(f"at most {room} {'held-out' if held_out else 'training'} clips per seed, asked for {n}")
    start = SEED_BLOCKS[purpose] * _BLOCK + seed * _PER_SEED + (_HELD_OUT_START if held_out else 0)
    return list(range(start, start + n))


# --- synthesis --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _harmonic_basis() -> np.ndarray:
    """[_MAX_HARMONICS, _TABLE_SIZE] float64: row n-1 is one period of sin(2 pi n x)."""
    x = np.arange(_TABLE_SIZE) / _TABLE_SIZE
    return np.sin(2 * np.pi * np.arange(1, _MAX_HARMONICS + 1)[:, None] * x[None, :])


def _harmonic_amplitudes(instrument: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Amplitudes of harmonics 1..count at a note's start-of-note ("bright") and settled ("dark") states."""
    n = np.arange(1, count + 1, dtype=np.float64)
    if instrument == "flute":
        bright = np.where(n == 1, 1.0, np.where(n == 2, 0.03, np.where(n == 3, 0.01, 0.0)))
        return bright, bright
    if instrument == "clarinet":
        # Odd harmonics only (a closed pipe), rolled off above the 9th so it stays far darker than brass.
        odd = np.where(n % 2 == 1, 1.0 / n, 0.01 / n) * np.where(n <= 9, 1.0, 0.3)
        return odd, odd
    if instrument == "brass":
        return n**-0.5, n**-2.0
    # plucked: bright at the pluck, then only the lowest partials ring on.
    return n**-0.8, np.where(n == 1, 1.0, np.where(n == 2, 0.25, np.where(n == 3, 0.08, 0.0)))


@functools.lru_cache(maxsize=None)
def _wavetables(instrument: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Single-period tables (bright, dark) of harmonics 1..count, each float64 [_TABLE_SIZE] with peak 1."""
    basis = _harmonic_basis()[:count]
    tables = []
    for amplitudes in _harmonic_amplitudes(instrument, count):
        table = amplitudes @ basis
        tables.append(table / np.abs(table).max())
    return tables[0], tables[1]


def _lookup(table: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Linear-interpolated table read at ``phase`` (in periods)."""
    position = (phase % 1.0) * _TABLE_SIZE
    index = position.astype(np.int64)
    frac = position - index
    return table[index] * (1 - frac) + table[(index + 1) % _TABLE_SIZE] * frac


def _contour(contour: str, t: np.ndarray) -> np.ndarray:
    """Melody shape in [0, 1] at positions t in [0, 1] along the clip."""
    if contour == "rising":
        return t
    if contour == "falling":
        return 1.0 - t
    return 1.0 - np.abs(2.0 * t - 1.0)


def _note(instrument: str, f0: float, glide: float, length: int, rng: np.random.Generator) -> np.ndarray:
    """One note of ``length`` samples at ``f0`` Hz that starts ``glide`` semitones away and slides to its
    pitch: float64 [length], before peak normalisation."""
    t = np.arange(length) / SAMPLE_RATE
    seconds = length / SAMPLE_RATE
    # Band-limited: only the harmonics below _MAX_PARTIAL_HZ (1% margin for vibrato and detune).
    bright, dark = _wavetables(instrument, max(1, min(_MAX_HARMONICS, int(_MAX_PARTIAL_HZ // (f0 * 1.01)))))
    slide = min(0.5 * seconds, 0.15)
    scoop = int(np.ceil(slide * SAMPLE_RATE))
    hertz = np.full(length, f0)
    hertz[:scoop] *= 2.0 ** (glide * np.clip(1.0 - t[:scoop] / slide, 0.0, 1.0) / 12)
    if instrument == "flute":
        hertz = hertz * (1.0 + rng.uniform(0.002, 0.005) * np.sin(2 * np.pi * rng.uniform(4.5, 6.0) * t))
    phase = np.cumsum(hertz) / SAMPLE_RATE + rng.random()
    if instrument == "brass":
        mix = np.exp(-t / rng.uniform(0.03, 0.05))  # dark at the onset, brightening: the brass "blat"
        wave = mix * _lookup(dark, phase) + (1 - mix) * _lookup(bright, phase)
    elif instrument == "plucked":
        mix = np.exp(-t / rng.uniform(0.03, 0.06))  # bright at the pluck, then darkening
        wave = mix * _lookup(bright, phase) + (1 - mix) * _lookup(dark, phase)
    else:
        wave = _lookup(bright, phase)

    if instrument == "flute":
        # Breath: high-passed noise (first difference of white noise), a texture the VAE's blur keeps.
        wave = wave + 0.04 * np.diff(rng.normal(size=length + 1))
        attack = min(rng.uniform(0.05, 0.08), 0.4 * seconds)
        tremolo = 1.0 + 0.05 * np.sin(2 * np.pi * rng.uniform(4.0, 6.0) * t)
        envelope = np.where(t < attack, 0.5 - 0.5 * np.cos(np.pi * t / attack), 1.0) * tremolo
    elif instrument == "clarinet":
        attack = rng.uniform(0.015, 0.025)
        envelope = np.minimum(t / attack, 1.0)
    elif instrument == "brass":
        attack = rng.uniform(0.03, 0.05)
        swell = 0.8 + 0.2 * t / max(seconds, 1e-3)  # a slight crescendo through the note
        envelope = np.minimum(t / attack, 1.0) * swell
    else:
        attack = rng.uniform(0.002, 0.004)
        envelope = np.minimum(t / attack, 1.0) * np.exp(-t / rng.uniform(0.06, 0.1))
    release = min(int(_RELEASE_SECONDS * SAMPLE_RATE), length // 4)
    if release > 0:
        envelope[-release:] *= 0.5 + 0.5 * np.cos(np.pi * np.arange(1, release + 1) / release)
    return wave * envelope


def synthesize(tone: Tone, seed: int) -> np.ndarray:
    """The clip of ``tone`` drawn with ``seed``: float32 [CLIP_SAMPLES] at SAMPLE_RATE, within [-1, 1].

    Deterministic in (tone, seed). Two tones with the same seed share their random draws (onset jitter,
    span, detune, ...) as far as their attributes allow, so paired clips differ mainly in their attributes.
    """
    rng = np.random.default_rng(seed)
    notes = int(round(rng.uniform(*NOTES_PER_SECOND[tone.tempo]) * CLIP_SECONDS))  # at least 4
    slot = CLIP_SECONDS / notes
    onsets = np.arange(notes) * slot + rng.uniform(-0.08, 0.08, size=notes) * slot
    onsets[0] = rng.uniform(0.0, 0.03)
    ends = np.append(onsets[1:] - rng.uniform(0.1, 0.2, size=notes - 1) * slot, CLIP_SECONDS - 0.005)

    span = int(rng.integers(7, REGISTER_SPAN + 1))
    base = REGISTER_LOWEST_MIDI[tone.register] + int(rng.integers(0, REGISTER_SPAN - span + 1))
    shape = _contour(tone.contour, np.linspace(0.0, 1.0, notes))
    midi = np.clip(
        np.round(base + span * shape + rng.normal(0.0, 0.3, size=notes)),
        REGISTER_LOWEST_MIDI[tone.register],
        REGISTER_LOWEST_MIDI[tone.register] + REGISTER_SPAN,
    )
    cents = rng.uniform(-15, 15) + rng.uniform(-5, 5, size=notes)  # clip detune + per-note wobble
    hertz = 440.0 * 2.0 ** ((midi - 69 + cents / 100) / 12)
    # Each note scoops into its pitch from the side the melody comes from (below while it rises, above while
    # it falls), a local cue to the contour that a patch-based audio tower picks up.
    direction = -np.sign(np.gradient(shape))
    glides = direction * rng.uniform(3.0, 4.0, size=notes)
    low = REGISTER_LOWEST_MIDI[tone.register]
    glides = np.clip(midi + glides, low, low + REGISTER_SPAN) - midi

    clip = np.zeros(CLIP_SAMPLES)
    for onset, end, f0, glide in zip(onsets, ends, hertz, glides):
        start, stop = int(onset * SAMPLE_RATE), min(int(end * SAMPLE_RATE), CLIP_SAMPLES)
        clip[start:stop] += _note(tone.instrument, float(f0), float(glide), stop - start, rng)

    peak = rng.uniform(*PEAK[tone.loudness])
    clip *= peak / np.abs(clip).max()
    clip += rng.normal(0.0, peak * 10 ** (rng.uniform(-45, -35) / 20), size=CLIP_SAMPLES)
    return np.clip(clip, -1.0, 1.0).astype(np.float32)


def synthesize_batch(tones: Sequence[Tone], seeds: Sequence[int]) -> Tensor:
    """B clips: float32 [B, CLIP_SAMPLES], row b = ``synthesize(tones[b], seeds[b])``."""
    if len(tones) != len(seeds):
        raise ValueError(f"{len(tones)} tones but {len(seeds)} seeds")
    if not tones:
        return torch.zeros(0, CLIP_SAMPLES)
    return torch.from_numpy(np.stack([synthesize(tone, int(seed)) for tone, seed in zip(tones, seeds)]))


# --- captions ---------------------------------------------------------------------------------------------
# Instrument names as nouns in captions ("a plucked string"); the other attributes appear as themselves.
INSTRUMENT_NOUNS: dict[str, str] = {
    "flute": "flute",
    "clarinet": "clarinet",
    "brass": "brass horn",
    "plucked": "plucked string",
}
# Written with "a" only; _with_articles makes "a arch" into "an arch" afterwards and the parser undoes it.
TEMPLATES: tuple[str, ...] = (
    "a {tempo} {contour} melody on a {loudness} {instrument} in a {register} register",
    "{loudness} {instrument}, {register} register, {tempo} tempo, {contour} contour",
    "a {register} {instrument} playing a {loudness} {tempo} {contour} tune",
    "a {instrument} melody, {tempo} and {contour}, {loudness}, {register} pitch",
    "{contour} {tempo} notes in a {register} register from a {loudness} {instrument}",
    "the {instrument} plays a {contour} phrase, {tempo} and {loudness}, in the {register} range",
)
NUM_TEMPLATES = len(TEMPLATES)


def _with_articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption(tone: Tone, template: int) -> str:
    """Describe ``tone`` with TEMPLATES[template]; every caption names all five attributes."""
    values = {name: getattr(tone, name) for name in ATTRIBUTES}
    values["instrument"] = INSTRUMENT_NOUNS[tone.instrument]
    return _with_articles(TEMPLATES[template].format(**values))


def _alternation(words: Sequence[str]) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


_NOUN_TO_INSTRUMENT = {noun: name for name, noun in INSTRUMENT_NOUNS.items()}
_FIELD_PATTERNS = {
    name: _alternation(INSTRUMENT_NOUNS.values() if name == "instrument" else values)
    for name, values in VOCABULARIES.items()
}


def _compile(template: str) -> re.Pattern[str]:
    pieces = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile(
        "".join(
            re.escape(piece) if i % 2 == 0 else f"(?P<{piece}>{_FIELD_PATTERNS[piece]})"
            for i, piece in enumerate(pieces)
        )
    )


_PARSERS = tuple(_compile(template) for template in TEMPLATES)


def parse_caption(text: str) -> Tone | None:
    """Invert :func:`caption` for every template (case, extra spaces and a final period tolerated).

    Returns None when the text matches no template.
    """
    normal = re.sub(r"\s+", " ", text.strip().lower()).rstrip(".")
    normal = re.sub(r"\ban\b", "a", normal)
    for parser in _PARSERS:
        match = parser.fullmatch(normal)
        if match is not None:
            values = match.groupdict()
            values["instrument"] = _NOUN_TO_INSTRUMENT[values["instrument"]]
            return Tone(**values)
    return None


def all_captions() -> list[str]:
    """Every caption the world can produce: ALL_TONES x TEMPLATES (864), tone-major."""
    return [caption(tone, template) for tone in ALL_TONES for template in range(NUM_TEMPLATES)]


def tones_prompts(n: int, seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """n distinct captions (random tones and templates), none of them in ``exclude``.

    The world has only len(all_captions()) = 864 captions; asking for more than remain raises ValueError.
    """
    taken = set(exclude)
    remaining = [text for text in all_captions() if text not in taken]
    if n > len(remaining):
        raise ValueError(f"asked for {n} tones prompts but only {len(remaining)} distinct captions remain")
    order = np.random.default_rng(seed).permutation(len(remaining))[:n]
    return [remaining[i] for i in order]


def make_dataset(
    n: int, *, purpose: str, seed: int = 0, held_out: bool = False
) -> tuple[Tensor, list[str], list[Tone]]:
    """n clips from ``purpose``'s seed block (see :func:`clip_seeds`): waveforms float32 [n, CLIP_SAMPLES],
    one random-template caption each and their tones. The same arguments give the same clips."""
    rng = np.random.default_rng([SEED_BLOCKS[purpose], seed, int(held_out)])
    tones = sample_tones(n, rng)
    captions = [caption(tone, int(t)) for tone, t in zip(tones, rng.integers(NUM_TEMPLATES, size=n))]
    seeds = clip_seeds(purpose, n, seed=seed, held_out=held_out)
    return synthesize_batch(tones, seeds), captions, tones


# --- exemplars --------------------------------------------------------------------------------------------
# The exemplar set of distributional rewards: clips with these attributes fixed, the rest uniform.
EXEMPLAR_DEFINITION: dict[str, str] = {"instrument": "plucked", "tempo": "fast", "register": "high"}
EXEMPLAR_DESCRIPTION = "bright, fast plucked melodies"


def matches_exemplar(tone: Tone) -> bool:
    """True where ``tone`` has every attribute EXEMPLAR_DEFINITION fixes."""
    return all(getattr(tone, name) == value for name, value in EXEMPLAR_DEFINITION.items())


def exemplar_clips(n: int, seed: int = 0) -> tuple[Tensor, list[Tone]]:
    """n exemplar clips: waveforms float32 [n, CLIP_SAMPLES] and their tones (EXEMPLAR_DEFINITION's
    attributes fixed, the others uniform), with clip seeds from the ``exemplar`` block, which no training
    set uses. Clip i of ``exemplar_clips(m, seed)`` is clip i of ``exemplar_clips(n, seed)`` for every m > i."""
    free = [tone for tone in ALL_TONES if matches_exemplar(tone)]
    seeds = clip_seeds("exemplar", n, seed=seed)
    # A stream of its own per clip: synthesize() consumes default_rng(s), which must not decide the tone too.
    tones = [free[int(np.random.default_rng([s, 1]).integers(len(free)))] for s in seeds]
    return synthesize_batch(tones, seeds), tones


def exemplar_halves(n: int, seed: int = 0) -> dict[str, tuple[Tensor, list[Tone]]]:
    """Two disjoint exemplar sets of n clips each: ``"reward"`` (what a distributional reward compares with)
    and ``"eval"`` (what evaluation compares with), so a generator cannot score on evaluation by copying the
    reward's own exemplars. They are the first and second n clips of ``exemplar_clips(2 * n, seed)``."""
    waveforms, tones = exemplar_clips(2 * n, seed)
    return {"reward": (waveforms[:n], tones[:n]), "eval": (waveforms[n:], tones[n:])}


# --- the generation path, imitated --------------------------------------------------------------------------
# A log-mel front end and what a mel-VAE + Griffin-Lim vocoder does to a clip. The gold judge reads clips
# through log_mel; the gold judge and the CLAP train on a share of degraded clips so that they also read
# generated audio, which reaches them through exactly such a path.
N_FFT, HOP, N_MELS, F_MAX = 1024, 160, 64, 8000.0
_DB_FLOOR = -100.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (15 mels there), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    log_step = math.log(6.4) / 27.0
    return np.where(hz < 1000.0, 3.0 * hz / 200.0, 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) / log_step)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    log_step = math.log(6.4) / 27.0
    return np.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * np.exp(log_step * (mel - 15.0)))


@functools.lru_cache(maxsize=1)
def mel_filters() -> Tensor:
    """float32 [N_FFT // 2 + 1, N_MELS]: triangular filters evenly spaced on the Slaney mel scale over
    0-8000 Hz, each scaled to unit area (2 / bandwidth), so white noise gives about the same power in every bin."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(F_MAX), N_MELS + 2))
    bins = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - low) / (centre - low)
    falling = (high - bins[None, :]) / (high - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (high - low))
    return torch.tensor(weights.T, dtype=torch.float32)


def _stft(waveforms: Tensor) -> Tensor:
    """[B, T] -> complex [B, N_FFT // 2 + 1, 1 + T // HOP]."""
    window = torch.hann_window(N_FFT, periodic=True, dtype=waveforms.dtype, device=waveforms.device)
    return torch.stft(waveforms, N_FFT, HOP, window=window, center=True, pad_mode="reflect", return_complex=True)


def log_mel(waveforms: Tensor) -> Tensor:
    """[B, T] float waveforms at 16 kHz -> [B, N_MELS, 1 + T // HOP] mel power in dB (floor -100 dB)."""
    spec = _stft(waveforms.float())
    power = spec.real.square() + spec.imag.square()
    mel = torch.einsum("fm,bft->bmt", mel_filters().to(power.device), power)
    return 10.0 * torch.log10(mel.clamp_min(10 ** (_DB_FLOOR / 10)))


def degrade(waveforms: Tensor, generator: torch.Generator, *, iterations: tuple[int, int] = (2, 8)) -> Tensor:
    """[B, T] clips -> [B, T] clips as a mel-VAE + Griffin-Lim vocoder would return them.

    Per clip: its log-mel is mixed, by a random amount, with a copy average-pooled by 2 or 4 in time and
    frequency and upsampled again (a VAE's latent grid is 4x coarser), turned back into a linear magnitude
    by the mel filters' pseudo-inverse (negatives clamped), and vocoded by a random number of Griffin-Lim
    iterations in ``iterations`` from random phase (fewer than a vocoder's usual 32: harsher, so safer). The
    level is not restored: blurring log-mels keeps their mean in dB but lowers the power (by about 11 dB for a
    2x2 blur of these clips), and a generator's output loses level the same way. All randomness comes from
    ``generator``.
    """
    batch, length = waveforms.shape
    db = log_mel(waveforms)  # [B, M, F]
    coarse = {
        factor: F.interpolate(
            F.avg_pool2d(db[:, None], factor, ceil_mode=True), size=db.shape[1:], mode="bilinear"
        )[:, 0]
        for factor in (2, 4)
    }
    amount, pick = torch.rand(2, batch, 1, 1, generator=generator)
    blurred = (1 - amount) * db + amount * torch.where(pick < 0.5, coarse[2], coarse[4])
    power = torch.einsum("fm,bmt->bft", torch.linalg.pinv(mel_filters().T), 10.0 ** (blurred / 10.0))
    magnitude = power.clamp_min(0.0).sqrt()
    window = torch.hann_window(N_FFT, periodic=True)
    steps = torch.randint(iterations[0], iterations[1] + 1, (batch,), generator=generator)
    phase = 2 * math.pi * torch.rand(magnitude.shape, generator=generator)
    out = torch.empty_like(waveforms)
    for count in steps.unique().tolist():
        rows = (steps == count).nonzero(as_tuple=True)[0]
        target = magnitude[rows]
        spec = torch.polar(target, phase[rows])
        for _ in range(count):
            wave = torch.istft(spec, N_FFT, HOP, window=window, length=length)
            spec = target * torch.sgn(_stft(wave))
        out[rows] = torch.istft(spec, N_FFT, HOP, window=window, length=length)
    return out.clamp(-1.0, 1.0)
