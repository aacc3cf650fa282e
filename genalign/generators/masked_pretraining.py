"""Pre-training of masked discrete diffusion models (`genalign.generators.masked`) on sequence files.

`scripts/pretrain_masked.py` is its command line; world builders call `pretrain_masked` directly.

Input by suffix: .fasta/.fa/.fna (FASTA, multi-line records joined), .csv (a named column), anything else one
sequence per line (blank lines skipped). Sequences are strings of single-character tokens from the model's
alphabet (lower case is read as upper case).

Lengths: the model has one length L (default the most common length in the data). Longer sequences are cropped
to their first L tokens, shorter ones are dropped (no padding token: padding would be learned as content); both
counts are printed.

Training: MDLM loss (`mdlm_loss`), AdamW with linear warm-up, gradient clipping, seeded data order, t and masks.
The held-out loss uses the same t and masks at every evaluation, so its changes are the model's, not noise.
The model is saved with `save_pretrained` (config.json + model.safetensors).
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from genalign.generators.masked import MaskedDiffusionConfig, MaskedDiffusionGenerator, mdlm_loss

FASTA_SUFFIXES = (".fasta", ".fa", ".fna")


def read_sequences(path: str | Path, *, column: str = "sequence") -> list[str]:
    """The sequences in a FASTA, CSV (column `column`) or one-per-line text file, upper-cased."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sequence file at {path}; pass a FASTA, CSV or one-sequence-per-line file")
    if path.suffix.lower() in FASTA_SUFFIXES:
        records, current = [], None
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith(">"):
                if current is not None:
                    records.append("".join(current))
                current = []
            elif line and current is not None:
                current.append(line)
        if current is not None:
            records.append("".join(current))
        sequences = records
    elif path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if column not in (reader.fieldnames or []):
                raise ValueError(f"{path} has no column {column!r} (columns: {reader.fieldnames}); pass --column")
            sequences = [row[column].strip() for row in reader]
    else:
        sequences = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not sequences:
        raise ValueError(f"{path} holds no sequences")
    return [s.upper() for s in sequences]


def encode_fixed_length(sequences: Sequence[str], alphabet: str, length: int) -> tuple[torch.Tensor, int, int]:
    """Crop to `length` and drop shorter sequences: ids [N, length], and the numbers cropped and dropped."""
    index = {token: i for i, token in enumerate(alphabet)}
    rows, cropped, dropped = [], 0, 0
    for number, sequence in enumerate(sequences):
        if len(sequence) < length:
            dropped += 1
            continue
        cropped += len(sequence) > length
        try:
            rows.append([index[token] for token in sequence[:length]])
        except KeyError as error:
            raise ValueError(f"sequence {number} has {error.args[0]!r}, which is not in the alphabet {alphabet!r}; "
                             "remove it or extend --alphabet") from None
    if not rows:
        raise ValueError(f"no sequence is at least {length} tokens long; lower --length")
    return torch.tensor(rows, dtype=torch.long), cropped, dropped


@dataclass
class PretrainResult:
    """What `pretrain_masked` returns.

    Attributes:
        generator: the trained model (eval mode).
        history: one dict per evaluation: step, train_loss (mean since the last evaluation; None at step 0),
            heldout_loss.
        output_dir: where it was saved (None if not saved).
    """

    generator: MaskedDiffusionGenerator
    history: list[dict] = field(default_factory=list)
    output_dir: Path | None = None


@torch.no_grad()
def heldout_loss(generator: MaskedDiffusionGenerator, ids: torch.Tensor, *, batch_size: int, seed: int) -> float:
    """Mean MDLM loss over ids [N, L] with t and masks fixed by `seed` (comparable across evaluations)."""
    rng = torch.Generator().manual_seed(seed)
    total = 0.0
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size].to(generator.device)
        loss = mdlm_loss(generator.logits, batch, generator.schedule, generator.mask_id, generator=rng)
        total += float(loss) * len(batch)
    return total / len(ids)


def pretrain_masked(
    data: str | Path | Sequence[str],
    output_dir: str | Path | None = None,
    *,
    config: MaskedDiffusionConfig | None = None,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_steps: int = 100,
    grad_clip: float = 1.0,
    eval_every: int = 200,
    heldout_fraction: float = 0.05,
    column: str = "sequence",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> PretrainResult:
    """Train a masked diffusion model from a sequence file (or a list of strings) and save it.

    Args:
        data: a FASTA/CSV/text file (see the module docstring) or the sequences themselves.
        output_dir: where to `save_pretrained` (None: do not save).
        config: model configuration; its `length` is the training length (default: a CNN over "ACGT" at the
            data's most common length).
        steps: optimiser steps; batch_size sequences each, drawn with replacement by a seeded RNG.
        eval_every: held-out evaluation period (also at step 0 and at the end).
        heldout_fraction: share of sequences held out (at least one).
        seed: seeds initialisation, split, data order, t and masks.
    """
    sequences = read_sequences(data, column=column) if isinstance(data, (str, Path)) else [s.upper() for s in data]
    if config is None:
        config = MaskedDiffusionConfig(length=Counter(len(s) for s in sequences).most_common(1)[0][0])
    alphabet = "".join(config.tokens)
    ids, cropped, dropped = encode_fixed_length(sequences, alphabet, config.length)
    print(f"{len(ids)} sequences of length {config.length} ({cropped} cropped, {dropped} shorter ones dropped)")
    if len(ids) < 2:
        raise ValueError("need at least 2 sequences (one to train on, one held out)")

    torch.manual_seed(seed)
    generator = MaskedDiffusionGenerator.from_config(config).to(device)
    split = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    n_heldout = min(max(1, round(heldout_fraction * len(ids))), len(ids) - 1)
    heldout, train = ids[split[:n_heldout]], ids[split[n_heldout:]]

    optimizer = torch.optim.AdamW(generator.backbone.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))
    rng = torch.Generator().manual_seed(seed + 1)
    result = PretrainResult(generator)

    def evaluate(step: int, train_loss: float | None) -> dict:
        entry = {"step": step, "train_loss": train_loss,
                 "heldout_loss": heldout_loss(generator, heldout, batch_size=batch_size, seed=seed + 2)}
        result.history.append(entry)
        return entry

    evaluate(0, None)
    generator.backbone.train()
    running: list[float] = []
    bar = tqdm(range(1, steps + 1), disable=not progress, desc="pretrain masked")
    for step in bar:
        batch = train[torch.randint(len(train), (batch_size,), generator=rng)].to(generator.device)
        loss = mdlm_loss(generator.logits, batch, generator.schedule, generator.mask_id, generator=rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(generator.backbone.parameters(), grad_clip)
        optimizer.step()
        warmup.step()
        running.append(float(loss.detach()))
        if step % eval_every == 0 or step == steps:
            entry = evaluate(step, sum(running) / len(running))
            running.clear()
            bar.set_postfix(train=f"{entry['train_loss']:.4f}", heldout=f"{entry['heldout_loss']:.4f}")
    generator.backbone.eval()
    if output_dir is not None:
        result.output_dir = generator.save_pretrained(output_dir)
    return result
