"""The tones world: synthesiser, captions, exemplars, gold judge and tiny CLAP."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genalign.worlds import build_gold
from genalign.worlds.tones import (
    ALL_TONES,
    ATTRIBUTES,
    CLIP_SAMPLES,
    EXEMPLAR_DEFINITION,
    NUM_TEMPLATES,
    PEAK,
    REGISTER_LOWEST_MIDI,
    REGISTER_SPAN,
    SAMPLE_RATE,
    VOCABULARIES,
    Tone,
    caption,
    clip_seeds,
    exemplar_halves,
    parse_caption,
    sample_tones,
    synthesize,
    synthesize_batch,
    tones_prompts,
)
from genalign.worlds.tones_clap import (
    CLAP_SIZES,
    audio_embeddings,
    soft_clap_loss,
    save_tones_clap,
    text_embeddings,
    text_encoder_from_clap,
    train_tones_clap,
)
from genalign.worlds.tones_gold import GOLD_SIZES, TonesGold, load_tones_gold, save_tones_gold, train_tones_gold

TONE = Tone("clarinet", "middle", "slow", "rising", "loud")


@contextmanager
def _one_thread() -> Iterator[None]:
    """Train on one torch thread, then restore the suite's setting. The small convolutions and STFTs of the
    tiny recipes gain nothing from a second thread, and on a shared 2-core machine two threads waiting on
    each other were measured many times slower (the tiny gold recipe: 168 s with two, 13 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _onsets(clip: np.ndarray, frame: int = 80) -> int:
    """Note onsets: upward crossings of 30% of the peak 5 ms-RMS envelope, re-armed below 10%."""
    envelope = np.sqrt((clip[: len(clip) // frame * frame].reshape(-1, frame) ** 2).mean(axis=1))
    envelope /= envelope.max()
    count, armed = 0, True
    for value in envelope:
        if armed and value > 0.3:
            count, armed = count + 1, False
        elif value < 0.1:
            armed = True
    return count


def _peak_frequencies(clip: np.ndarray) -> list[float]:
    """Strongest frequency (Hz, ~2 Hz resolution) of every 128 ms frame holding at least 30% of the
    loudest frame's energy."""
    size, hop = 2048, 1024
    frames = np.stack([clip[i : i + size] for i in range(0, len(clip) - size, hop)]) * np.hanning(size)
    energy = (frames**2).sum(axis=1)
    spectra = np.abs(np.fft.rfft(frames[energy > 0.3 * energy.max()], 8 * size, axis=1))
    return list(spectra.argmax(axis=1) * SAMPLE_RATE / (8 * size))


# --- synthesiser ------------------------------------------------------------------------------------------


def test_synthesize_is_deterministic_per_seed_and_batches_alike():
    clip = synthesize(TONE, 5)
    assert clip.dtype == np.float32 and clip.shape == (CLIP_SAMPLES,)
    np.testing.assert_array_equal(clip, synthesize(TONE, 5))
    assert np.abs(clip - synthesize(TONE, 6)).max() > 0.05, "another seed must give another clip"
    batch = synthesize_batch([TONE, TONE], [5, 6])
    assert batch.shape == (2, CLIP_SAMPLES) and batch.dtype == torch.float32
    np.testing.assert_array_equal(batch[0].numpy(), clip)


@pytest.mark.parametrize("register", VOCABULARIES["register"])
def test_register_puts_every_fundamental_in_its_range(register):
    # The register's 12 semitones, widened by the 20 cents of detune plus a little for the FFT resolution.
    low = 440.0 * 2 ** ((REGISTER_LOWEST_MIDI[register] - 69 - 0.25) / 12)
    high = 440.0 * 2 ** ((REGISTER_LOWEST_MIDI[register] + REGISTER_SPAN - 69 + 0.25) / 12)
    for instrument in VOCABULARIES["instrument"]:
        for seed in range(3):
            peaks = _peak_frequencies(synthesize(replace(TONE, instrument=instrument, register=register), seed))
            assert peaks and all(low <= f <= high for f in peaks), (instrument, seed, peaks)


def test_contour_shapes_the_pitch_track():
    for seed in range(3):
        rising, falling, arch = (
            _peak_frequencies(synthesize(replace(TONE, contour=c), seed)) for c in ("rising", "falling", "arch")
        )
        assert rising[-1] > rising[0] and falling[-1] < falling[0]
        assert max(arch[1:-1]) > max(arch[0], arch[-1])


def test_tempo_sets_the_onset_count():
    for instrument in VOCABULARIES["instrument"]:
        for seed in range(3):
            slow = _onsets(synthesize(replace(TONE, instrument=instrument, tempo="slow"), seed))
            fast = _onsets(synthesize(replace(TONE, instrument=instrument, tempo="fast"), seed))
            # 2-3 and 6-8 notes per second over 2 s, one onset per note.
            assert 4 <= slow <= 6 and 12 <= fast <= 16, (instrument, seed, slow, fast)


def test_loudness_is_a_gain_on_the_same_melody():
    for seed in range(3):
        quiet = synthesize(replace(TONE, loudness="quiet"), seed)
        loud = synthesize(replace(TONE, loudness="loud"), seed)
        assert PEAK["quiet"][0] <= np.abs(quiet).max() <= PEAK["quiet"][1] + 0.01
        assert PEAK["loud"][0] <= np.abs(loud).max() <= PEAK["loud"][1] + 0.01
        ratio = np.sqrt((loud**2).mean() / (quiet**2).mean())
        assert 0.6 / 0.18 <= ratio <= 0.8 / 0.12


# --- captions, prompts, seeds, exemplars ------------------------------------------------------------------


def test_every_template_round_trips_for_every_tone():
    words = {"brass": "brass horn", "plucked": "plucked string"}
    for tone in ALL_TONES:
        for template in range(NUM_TEMPLATES):
            text = caption(tone, template)
            assert parse_caption(text) == tone, text
            for name in ATTRIBUTES:  # every caption names all five attributes
                assert words.get(getattr(tone, name), getattr(tone, name)) in text
    assert parse_caption("  A Slow ARCH melody on a loud flute in a high register. ") == Tone(
        "flute", "high", "slow", "arch", "loud"
    )
    assert parse_caption("a red circle at the centre on a black background") is None
    assert NUM_TEMPLATES >= 4


def test_prompts_are_distinct_and_respect_exclude():
    train = tones_prompts(500, seed=1)
    held_out = tones_prompts(200, seed=2, exclude=train)
    assert len(set(train)) == 500 and len(set(held_out)) == 200 and not set(train) & set(held_out)
    assert all(parse_caption(p) is not None for p in train + held_out)
    assert tones_prompts(50, seed=1) == tones_prompts(50, seed=1)
    with pytest.raises(ValueError, match="distinct captions"):
        tones_prompts(200, seed=3, exclude=train + held_out)


def test_seed_blocks_are_disjoint():
    blocks = [
        set(clip_seeds(purpose, 1000, seed=seed, held_out=held_out))
        for purpose in ("data", "clap", "gold", "exemplar")
        for seed in (0, 1)
        for held_out in (False, True)
    ]
    assert sum(len(b) for b in blocks) == len(set().union(*blocks))
    with pytest.raises(ValueError, match="held-out"):
        clip_seeds("gold", 100_001, held_out=True)


def test_exemplar_halves_are_disjoint_and_match_the_definition():
    halves = exemplar_halves(6, seed=0)
    (reward, reward_tones), (evaluation, eval_tones) = halves["reward"], halves["eval"]
    assert reward.shape == evaluation.shape == (6, CLIP_SAMPLES)
    for tone in reward_tones + eval_tones:
        assert all(getattr(tone, name) == value for name, value in EXEMPLAR_DEFINITION.items())
    # No clip of one half is in the other, nor anywhere in the CLAP / gold / data training blocks.
    assert torch.cdist(reward, evaluation).min() > 1.0
    exemplar = set(clip_seeds("exemplar", 12))
    assert exemplar.isdisjoint(set(clip_seeds("data", 10_000)) | set(clip_seeds("clap", 10_000)))
    np.testing.assert_array_equal(reward[0].numpy(), synthesize(reward_tones[0], clip_seeds("exemplar", 1)[0]))


# --- CLAP loss ------------------------------------------------------------------------------------------


def test_soft_clap_loss_equals_a_hand_computation():
    audio = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    text = F.normalize(torch.tensor([[1.0, 1.0], [1.0, 0.0], [-1.0, 1.0]]), dim=1)
    positives = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    scale = 2.0
    logits = [[scale * float(audio[i] @ text[j]) for j in range(3)] for i in range(3)]
    targets = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]

    def cross_entropy(rows):
        total = 0.0
        for i, row in enumerate(rows):
            log_norm = math.log(sum(math.exp(v) for v in row))
            total -= sum(targets[i][j] * (row[j] - log_norm) for j in range(3))
        return total / len(rows)

    columns = [[logits[i][j] for i in range(3)] for j in range(3)]
    expected = 0.5 * (cross_entropy(logits) + cross_entropy(columns))
    loss = soft_clap_loss(audio, text, torch.tensor(math.log(scale)), positives)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# --- gold judge -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gold():
    with _one_thread():
        return train_tones_gold(**GOLD_SIZES["tiny"], seed=0)


@pytest.fixture(scope="module")
def gold_folder(tiny_gold, tmp_path_factory):
    return save_tones_gold(tiny_gold[0], tmp_path_factory.mktemp("tones") / "gold")


def test_tiny_gold_recipe_beats_chance_on_every_attribute(tiny_gold):
    _, report = tiny_gold
    for name, values in VOCABULARIES.items():
        assert report[f"accuracy_{name}"] > 1.0 / len(values) + 0.15, (name, report)
    assert report["train_seconds"] > 0 and report["data_seconds"] > 0


def test_tones_gold_checks_clips_against_their_prompts(gold_folder):
    gold = build_gold("tones", judge=gold_folder)
    tones = sample_tones(8, np.random.default_rng(3))
    seeds = clip_seeds("gold", len(tones), seed=999, held_out=True)  # never seen in training
    prompts = [caption(tone, i % NUM_TEMPLATES) for i, tone in enumerate(tones)]
    own = gold(synthesize_batch(tones, seeds), prompts)
    assert set(own) == {*ATTRIBUTES, "all_correct"} and all(v.shape == (8,) for v in own.values())
    assert own["register"].tolist() == [1.0] * 8
    assert own["all_correct"].mean() >= 0.75
    # The same clips with another register each: wrong on register, whatever the other attributes say.
    shifted = [replace(t, register=VOCABULARIES["register"][(VOCABULARIES["register"].index(t.register) + 1) % 3])
               for t in tones]
    other = gold(synthesize_batch(shifted, seeds), prompts)
    assert other["register"].tolist() == [0.0] * 8 and other["all_correct"].tolist() == [0.0] * 8
    # Too long or too short clips are cropped / padded, not refused.
    assert gold(synthesize_batch(tones[:2], seeds[:2])[:, :20_000], prompts[:2])["register"].shape == (2,)
    with pytest.raises(ValueError, match="not a tones-world caption"):
        gold(synthesize_batch(tones[:1], seeds[:1]), ["a red circle"])


def test_gold_folder_errors(gold_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="build_worlds.py tones"):
        TonesGold(tmp_path / "missing")
    config = json.loads((gold_folder / "config.json").read_text())
    config["vocabularies"]["instrument"] = ["piano", "violin", "drums", "organ"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").write_bytes((gold_folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="different tones world"):
        load_tones_gold(other)


# --- CLAP -------------------------------------------------------------------------------------------------


def test_tiny_clap_loads_through_clap_score_and_exports_its_text_encoder(tmp_path):
    from rewards.audio import ClapScore

    with _one_thread():
        model, processor, report = train_tones_clap(**CLAP_SIZES["tiny"], seed=0)
    assert 0.0 <= report["text_to_audio_top1"] <= 1.0 and math.isfinite(report["final_loss"])
    save_tones_clap(model, processor, tmp_path / "clap")
    reward = ClapScore(model=str(tmp_path / "clap"), sampling_rate=SAMPLE_RATE)
    tones = [TONE, replace(TONE, instrument="flute", register="high")]
    waveforms = synthesize_batch(tones, [1, 2])
    prompts = [caption(t, 0) for t in tones]
    scores = reward(waveforms, prompts).rewards
    # The saved extractor (numpy) must give the features training used: same score through the model.
    features = processor.feature_extractor(
        list(waveforms.numpy()), sampling_rate=SAMPLE_RATE, return_tensors="pt"
    )["input_features"]
    with torch.no_grad():
        expected = (audio_embeddings(model, features) * text_embeddings(model, processor.tokenizer, prompts)).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)

    encoder = text_encoder_from_clap(model)
    tokens = processor.tokenizer(
        prompts + [""], padding="max_length", max_length=processor.tokenizer.model_max_length, return_tensors="pt"
    )  # as AudioLDM calls it; "" is its unconditional input
    assert tokens["attention_mask"].sum(dim=1).max() < processor.tokenizer.model_max_length
    with torch.no_grad():
        mine = F.normalize(encoder(tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds, dim=-1)
        clap = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    clap = clap if isinstance(clap, torch.Tensor) else clap.pooler_output
    torch.testing.assert_close(mine, F.normalize(clap, dim=-1), atol=1e-6, rtol=0)
