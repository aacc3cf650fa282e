"""Samples as files and gallery entries, chosen by the rollout's modality: images as PNGs, audio as WAVs,
sequences as FASTA.

The command line (`genalign sample`, `genalign gallery`) writes whatever a generator makes through these two
functions, so a new modality is one branch here and nothing in the commands.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from genalign.audio_io import write_wav
from genalign.gallery import AudioClip, GallerySample, to_pil
from genalign.generators.base import Generator, Rollout


def displayable(rollout: Rollout, generator: Generator) -> list[Any]:
    """One displayable item per sample: an image tensor [3, H, W], an `AudioClip` (waveform [samples] at the
    generator's `sample_rate`), or a sequence's text."""
    if rollout.modality == "image":
        return list(rollout.outputs.detach().cpu())
    if rollout.modality == "audio":
        rate = sample_rate(generator)
        outputs = rollout.outputs.detach().cpu()
        if outputs.ndim != 2:
            raise ValueError(f"audio outputs must be waveforms [B, samples], got {tuple(outputs.shape)}")
        return [AudioClip(waveform, rate) for waveform in outputs]
    if rollout.modality == "sequence":
        return sequence_texts(rollout, generator)
    raise ValueError(f"no writer for {rollout.modality} samples yet; sample images, audio or sequences")


def sample_rate(generator: Generator) -> int:
    """The audio generator's output rate in Hz (its `sample_rate` attribute), needed to write its waveforms."""
    rate = getattr(generator, "sample_rate", None)
    if isinstance(rate, bool) or not isinstance(rate, numbers.Integral) or rate <= 0:
        raise ValueError(f"{type(generator).__name__} makes audio but has no positive int `sample_rate` "
                         f"(got {rate!r}); an audio generator must say the rate of its waveforms in Hz")
    return int(rate)


def sequence_texts(rollout: Rollout, generator: Generator) -> list[str]:
    """The decoded sequences, each cut to its own length when the batch was padded (conditions' "valid" mask,
    e.g. proteins on backbones of different lengths)."""
    texts = generator.decode(rollout.outputs)
    valid = rollout.conditions.tensors.get("valid") if rollout.conditions is not None else None
    if valid is None:
        return texts
    lengths = valid.bool().sum(-1).tolist()
    separator = "" if all(len(t) == 1 for t in generator.config.tokens) else " "
    return [text[:n] if not separator else separator.join(text.split(separator)[:n])
            for text, n in zip(texts, lengths)]


def write_samples(rollout: Rollout, generator: Generator, out: Path, records: Sequence[dict]) -> Path:
    """Write every sample of `rollout` into `out` with one JSON record each in samples.jsonl (`records` carries
    per-sample fields such as prompt, seed and reward). Images become NNNNN.png; audio NNNNN.wav (16-bit PCM at
    the generator's `sample_rate`, values clipped to [-1, 1]; records add sample_rate and duration_s);
    sequences samples.fasta.

    Returns the samples.jsonl path.
    """
    out.mkdir(parents=True, exist_ok=True)
    items = displayable(rollout, generator)
    lines = []
    if rollout.modality == "image":
        for i, (image, record) in enumerate(zip(items, records)):
            name = f"{i:05d}.png"
            to_pil(image).save(out / name)
            lines.append({"file": name, **record})
    elif rollout.modality == "audio":
        for i, (clip, record) in enumerate(zip(items, records)):
            name = f"{i:05d}.wav"
            write_wav(out / name, clip.waveform, clip.sample_rate)
            lines.append({"file": name, "sample_rate": clip.sample_rate, "duration_s": clip.duration_s, **record})
    else:
        with open(out / "samples.fasta", "w", encoding="utf-8") as fasta:
            for i, (text, record) in enumerate(zip(items, records)):
                fasta.write(f">{i:05d}\n{text}\n")
                lines.append({"id": f"{i:05d}", "sequence": text, **record})
    index = out / "samples.jsonl"
    index.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return index


def gallery_samples(rollout: Rollout, generator: Generator, rewards: Sequence[float],
                    labels: Sequence[dict[str, str]]) -> list[GallerySample]:
    """The rollout's samples as gallery entries with their rewards and labels."""
    return [GallerySample(image=item, reward=float(r), labels=label)
            for item, r, label in zip(displayable(rollout, generator), rewards, labels)]


def subset_gallery_samples(rollout: Rollout, outputs: torch.Tensor, generator: Generator, rewards: Sequence[float],
                           labels: Sequence[dict[str, str]]) -> list[GallerySample]:
    """Gallery entries for `outputs`: samples of the kind `rollout` holds but not its own rows (e.g. some of
    every process's outputs, gathered)."""
    return gallery_samples(replace(rollout, outputs=outputs), generator, rewards, labels)


def sample_figures(rollouts: dict[str, Rollout], generator: Generator) -> list[tuple[str, Image.Image]]:
    """Figures about sets of samples (side name → that side's rollout for one prompt): a sequence logo per side
    for sequences; none for images or audio, which the grid already shows (audio with a spectrogram per clip)."""
    figures = []
    for side, rollout in rollouts.items():
        if rollout.modality != "sequence":
            continue
        from genalign.sequence_logo import sequence_logo

        texts = sequence_texts(rollout, generator)
        alphabet = "".join(generator.config.tokens)
        figures.append((f"sequence logo, {side} ({len(texts)} samples)",
                        sequence_logo(texts, alphabet, title=f"{side}: {len(texts)} samples")))
    return figures


def gold_label(verdict: dict[str, float]) -> str:
    """One sample's gold verdict as text: for a verdict of correct/incorrect attributes (one with "all_correct"),
    "correct" or the attributes it got wrong; otherwise every gold score (e.g. activity, recovery)."""
    if "all_correct" not in verdict:
        return ", ".join(f"{name} {value:.3g}" for name, value in verdict.items())
    if verdict["all_correct"] == 1.0:
        return "correct"
    wrong = [name for name, value in verdict.items() if name != "all_correct" and value < 1.0]
    return "wrong: " + (", ".join(wrong) if wrong else "extra shapes")
