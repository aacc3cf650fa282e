"""The tones world's aesthetic-style head: an MLP on the tiny CLAP's audio embeddings, trained on a rule.

The audio twin of :mod:`genalign.worlds.shapes_aesthetic`: the LAION improved-aesthetic-predictor layout
(:class:`rewards.clip_rewards.AestheticHead`, state-dict keys ``layers.0.weight`` ... ``layers.7.bias``) on
the unit-norm CLAP audio embedding, regressing a fixed, hand-written "pleasantness" rating on a 1-10 scale,
so how well the head (and a generator tuned on it) does can be checked against the rule itself.
``rewards.audio_aesthetic.ClapAesthetic(model=clap_folder, head=head_folder, sampling_rate=16000)`` (registered
as ``clap_aesthetic``) loads it as a reward.

The rule (version 1), :func:`aesthetic_rule`. It prefers a soft instrument, the middle register, a slow
tempo, a rising melody and a quiet clip, and penalises loud *and* high clips a second time; it is a fixed
preference of the clip, never a match with a prompt. Every term is in [0, 1]:

* instrument ``I``: flute 1.0, clarinet 0.8, plucked 0.5, brass 0.2 (softest to harshest timbre);
* register ``R``: middle 1.0, low 0.5, high 0.3;
* tempo ``T``: slow 1.0, fast 0.4;
* contour ``C``: rising 1.0, arch 0.6, falling 0.2;
* calm ``L = clip((0.8 - peak) / (0.8 - 0.12), 0, 1)``, where ``peak`` is the clip's peak ``max |x|`` when its
  waveform is given and otherwise the middle of its loudness class's peak range in
  :data:`genalign.worlds.tones.PEAK` (quiet 0.15 -> L = 0.9559, loud 0.7 -> L = 0.1471); 0.12 and 0.8 are the
  quietest and loudest peaks the synthesiser draws, so within a class the term is graded by the drawn gain;
* harshness ``H = (1 - L) * [register == high]``.

``score = 1 + 9 * (0.30 I + 0.20 R + 0.20 T + 0.10 C + 0.20 L - 0.10 H)``. The positive weights sum to 1 and
the penalty never outweighs the high register's own terms, so the score lies in [1, 10] without clamping.
Examples (no waveforms): a quiet, slow, rising flute melody in the middle register scores 9.92; the same
melody loud 8.46, loud in the low register 7.56 and loud in the high register 6.44 (the penalty); a loud, fast,
falling brass melody in the high register 2.48.

Contour has the smallest weight because the tiny CLAP hears it poorly (zero-shot probe 0.44, chance 0.33); the
other four attributes it hears almost perfectly, so the head can rank clips well. Training targets always come
from the clean clip: clips passed through :func:`genalign.worlds.tones.degrade` (a share of the training set,
so the head also reads generated audio) keep the rating of the clip they were made from.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor

from genalign.worlds.schedules import warmup_cosine
from genalign.worlds.tones import (
    PEAK,
    SAMPLE_RATE,
    SEED_BLOCKS,
    Tone,
    clip_seeds,
    degrade,
    sample_tones,
    synthesize_batch,
    vocabularies,
)
from rewards.audio import ClapScore
from genalign.worlds.aesthetic_heads import load_head, save_head
from rewards.clip_rewards import AestheticHead

RULE_NAME = "tones_pleasantness"
RULE_VERSION = 1
# Term weights of the rule; the positive ones sum to 1, so the score spans [SCORE_MIN, SCORE_MAX].
RULE_WEIGHTS: dict[str, float] = {
    "instrument": 0.30,
    "register": 0.20,
    "tempo": 0.20,
    "contour": 0.10,
    "calm": 0.20,
    "harshness": -0.10,
}
PREFERENCES: dict[str, dict[str, float]] = {
    "instrument": {"flute": 1.0, "clarinet": 0.8, "plucked": 0.5, "brass": 0.2},
    "register": {"middle": 1.0, "low": 0.5, "high": 0.3},
    "tempo": {"slow": 1.0, "fast": 0.4},
    "contour": {"rising": 1.0, "arch": 0.6, "falling": 0.2},
}
SCORE_MIN, SCORE_MAX = 1.0, 10.0
# The quietest and loudest peaks the synthesiser draws: calm is 1 at the first and 0 at the second.
CALM_PEAKS = (PEAK["quiet"][0], PEAK["loud"][1])
HELD_OUT_CLIPS = 1000

_EMBED_BATCH = 256  # clips synthesised and embedded at a time


def _peaks(tones: Sequence[Tone], waveforms: Tensor | np.ndarray | None) -> list[float]:
    """Each clip's peak |x| (any non-batch dimensions), or its loudness class's mid peak without waveforms."""
    if waveforms is None:
        return [sum(PEAK[tone.loudness]) / 2 for tone in tones]
    x = torch.as_tensor(waveforms).detach()
    if x.ndim < 2 or x.shape[0] != len(tones):
        raise ValueError(f"waveforms must be [N, T] or [N, C, T] with N = {len(tones)} tones, got {tuple(x.shape)}")
    return x.abs().flatten(1).amax(dim=1).double().tolist()


def rule_terms(tones: Sequence[Tone], waveforms: Tensor | np.ndarray | None = None) -> list[dict[str, float]]:
    """The rule's terms of each clip, each in [0, 1]: ``instrument``, ``register``, ``tempo``, ``contour``,
    ``calm`` and ``harshness`` (see the module docstring)."""
    quiet, loud = CALM_PEAKS
    terms = []
    for tone, peak in zip(tones, _peaks(tones, waveforms), strict=True):
        calm = min(1.0, max(0.0, (loud - peak) / (loud - quiet)))
        values = {name: table[getattr(tone, name)] for name, table in PREFERENCES.items()}
        values["calm"] = calm
        values["harshness"] = (1.0 - calm) * (tone.register == "high")
        terms.append(values)
    return terms


def aesthetic_rule(tones: Sequence[Tone], waveforms: Tensor | np.ndarray | None = None) -> Tensor:
    """N tones (and optionally their waveforms [N, T] or [N, C, T]) -> float32 [N] pleasantness in [1, 10].

    ``1 + 9 * (0.30 I + 0.20 R + 0.20 T + 0.10 C + 0.20 L - 0.10 H)`` with instrument ``I`` (flute 1.0,
    clarinet 0.8, plucked 0.5, brass 0.2), register ``R`` (middle 1.0, low 0.5, high 0.3), tempo ``T`` (slow
    1.0, fast 0.4), contour ``C`` (rising 1.0, arch 0.6, falling 0.2), calm ``L = clip((0.8 - peak) / 0.68,
    0, 1)`` and harshness ``H = (1 - L) * [register == high]``; ``peak`` is ``max |x|`` of the waveform, or
    without waveforms the middle of the loudness class's peak range (quiet 0.15, loud 0.7). Deterministic.
    """
    terms = rule_terms(tones, waveforms)
    quality = [sum(RULE_WEIGHTS[name] * value for name, value in clip.items()) for clip in terms]
    return SCORE_MIN + (SCORE_MAX - SCORE_MIN) * torch.tensor(quality, dtype=torch.float32)


def _clap(clap: ClapScore | str | os.PathLike) -> ClapScore:
    return clap if isinstance(clap, ClapScore) else ClapScore(model=str(clap), sampling_rate=SAMPLE_RATE)


def aesthetic_clips(n: int, *, seed: int, held_out: bool) -> tuple[list[Tone], list[int]]:
    """The tones and clip seeds of ``n`` clips of the ``aesthetic`` seed block (no other training set uses it)."""
    tones = sample_tones(n, np.random.default_rng([SEED_BLOCKS["aesthetic"], seed, int(held_out)]))
    return tones, clip_seeds("aesthetic", n, seed=seed, held_out=held_out)


@torch.no_grad()
def _embed_clips(
    clap: ClapScore,
    tones: Sequence[Tone],
    seeds: Sequence[int],
    *,
    degraded_fraction: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """Synthesise and embed clips in chunks: ``(embeddings [N, D], rule [N] of the clean clips, degraded [N])``.

    A random ``degraded_fraction`` of the clips (bool mask ``degraded``, drawn from ``generator``) goes through
    ``degrade`` before embedding."""
    embeddings, targets, degraded = [], [], []
    for start in range(0, len(tones), _EMBED_BATCH):
        part_tones, part_seeds = tones[start : start + _EMBED_BATCH], seeds[start : start + _EMBED_BATCH]
        waveforms = synthesize_batch(part_tones, part_seeds)
        targets.append(aesthetic_rule(part_tones, waveforms))
        smear = torch.rand(len(part_tones), generator=generator) < degraded_fraction
        if smear.any():
            waveforms[smear] = degrade(waveforms[smear], generator)
        embeddings.append(clap.embed_audio(waveforms).float().cpu())
        degraded.append(smear)
    return torch.cat(embeddings), torch.cat(targets), torch.cat(degraded)


def _correlations(predicted: Tensor, target: Tensor) -> dict[str, float]:
    return {
        "pearson": float(stats.pearsonr(predicted.numpy(), target.numpy()).statistic),
        "spearman": float(stats.spearmanr(predicted.numpy(), target.numpy()).statistic),
        "mse": F.mse_loss(predicted, target).item(),
        "rule_std": target.std().item(),
    }


@torch.no_grad()
def evaluate_aesthetic_head(
    head: AestheticHead,
    clap: ClapScore | str | os.PathLike,
    *,
    seed: int,
    n: int = HELD_OUT_CLIPS,
    degraded: int | None = None,
) -> dict[str, float]:
    """How well the head reproduces the rule on ``n`` held-out clips (``clip_seeds(..., held_out=True)``).

    Returns ``pearson`` and ``spearman`` correlations of prediction with rule, the ``mse`` and ``rule_std``
    (the RMSE of always predicting the rule's mean, to read mse against), on clean clips; and the same with a
    ``degraded_`` prefix on the first ``degraded`` of those clips (default ``n // 4``) passed through
    ``degrade`` (what a mel-VAE + Griffin-Lim vocoder does), rated as the clean clips they came from.
    """
    clap = _clap(clap)
    degraded = n // 4 if degraded is None else degraded
    tones, seeds = aesthetic_clips(n, seed=seed, held_out=True)
    generator = torch.Generator().manual_seed(seed)
    was_training = head.training
    head.eval()
    embeddings, target, _ = _embed_clips(clap, tones, seeds, degraded_fraction=0.0, generator=generator)
    metrics = _correlations(head(embeddings), target)
    if degraded >= 3:
        smeared, smeared_target, _ = _embed_clips(
            clap, tones[:degraded], seeds[:degraded], degraded_fraction=1.0, generator=generator
        )
        metrics.update({f"degraded_{k}": v for k, v in _correlations(head(smeared), smeared_target).items()})
    head.train(was_training)
    return metrics


def train_aesthetic_head(
    clap_folder: ClapScore | str | os.PathLike,
    n_clips: int,
    steps: int,
    seed: int = 0,
    *,
    batch_size: int = 256,
    lr: float = 1e-3,
    degraded_fraction: float = 0.25,
    held_out: int = HELD_OUT_CLIPS,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[AestheticHead, dict[str, float]]:
    """Regress :func:`aesthetic_rule` from the frozen CLAP's unit-norm audio embeddings with the LAION layout.

    ``n_clips`` clips of the ``aesthetic`` seed block are synthesised once (a random ``degraded_fraction`` of
    them through ``degrade``, rated as their clean clip) and embedded once with
    ``rewards.audio.ClapScore(model=clap_folder, sampling_rate=16000).embed_audio`` (or the ClapScore passed);
    then every step draws ``batch_size`` of them and takes one Adam step on the MSE, dropout on as in the
    layout, the learning rate warming up over the first 5% of steps and decaying with a cosine to zero.
    ``progress(step, loss)`` is called after every step. Seeded: the same arguments give the same weights, and
    the caller's global torch RNG is left untouched.

    Returns:
        ``(head in eval mode, metrics)``: :func:`evaluate_aesthetic_head` on ``held_out`` held-out clips of the
        same seed, plus ``data_seconds`` (synthesis and embedding) and ``train_seconds``.
    """
    clap = _clap(clap_folder)
    start = time.perf_counter()
    tones, seeds = aesthetic_clips(n_clips, seed=seed, held_out=False)
    generator = torch.Generator().manual_seed(seed)
    embeddings, targets, _ = _embed_clips(clap, tones, seeds, degraded_fraction=degraded_fraction, generator=generator)
    data_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AestheticHead(embeddings.shape[1])
        head.train()
        optimiser = torch.optim.Adam(head.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(steps))
        for step in range(steps):
            rows = torch.randint(n_clips, (batch_size,), generator=generator)
            loss = F.mse_loss(head(embeddings[rows]), targets[rows])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            if progress is not None:
                progress(step, loss.item())
    train_seconds = time.perf_counter() - start
    head.eval()
    metrics = evaluate_aesthetic_head(head, clap, seed=seed, n=held_out)
    metrics.update({"data_seconds": data_seconds, "train_seconds": train_seconds})
    return head, metrics


def save_aesthetic_head(head: AestheticHead, folder: str | os.PathLike) -> Path:
    """Write the head with this world's rule and vocabularies (see `genalign.worlds.aesthetic_heads.save_head`)."""
    rule = {"name": RULE_NAME, "version": RULE_VERSION, "weights": RULE_WEIGHTS, "preferences": PREFERENCES}
    return save_head(head, folder, rule, vocabularies())


def load_aesthetic_head(folder: str | os.PathLike) -> AestheticHead:
    """Rebuild a head written by :func:`save_aesthetic_head` (on the CPU, in eval mode); a head of another rule
    or world is a ValueError."""
    return load_head(folder, RULE_NAME, RULE_VERSION, vocabularies(), "tones", "genalign.worlds.tones_aesthetic.train_aesthetic_head")
