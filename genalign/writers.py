"""Samples as files and gallery entries, chosen by the rollout's modality: images as PNGs, sequences as FASTA.

The command line (`genalign sample`, `genalign gallery`) writes whatever a generator makes through these two
functions, so a new modality is one branch here and nothing in the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from genalign.gallery import GallerySample, to_pil
from genalign.generators.base import Generator, Rollout


def displayable(rollout: Rollout, generator: Generator) -> list[Any]:
    """One displayable item per sample: an image tensor [3, H, W], or a sequence's text."""
    if rollout.modality == "image":
        return list(rollout.outputs.detach().cpu())
    if rollout.modality == "sequence":
        return sequence_texts(rollout, generator)
    raise ValueError(f"no writer for {rollout.modality} samples yet; sample images or sequences")


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
    per-sample fields such as prompt, seed and reward). Images become NNNNN.png; sequences samples.fasta.

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


def sample_figures(rollouts: dict[str, Rollout], generator: Generator) -> list[tuple[str, Image.Image]]:
    """Figures about sets of samples (side name → that side's rollout for one prompt): a sequence logo per side
    for sequences; none for images, which the grid already shows."""
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
