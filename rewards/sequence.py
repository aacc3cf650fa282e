"""Rewards for biological sequences: closed-form scores and a trainable neural oracle.

Every reward here has modality ``"sequence"`` and accepts either

* integer token ids ``[B, L]`` (one-hot encoded internally), or
* a float tensor ``[B, L, V]`` of one-hot vectors or per-position probabilities,
  used as is so gradients flow — e.g. the straight-through Gumbel-softmax
  samples that DRAKES back-propagates through.

Token id ``i`` means ``alphabet[i]``; use :func:`encode` / :func:`decode` to
convert between strings and ids.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from .base import Reward, RewardError, register_reward

__all__ = [
    "DNA",
    "KYTE_DOOLITTLE",
    "PROTEIN",
    "GCContent",
    "Hydrophobicity",
    "MotifCount",
    "OracleReward",
    "SequenceOracle",
    "decode",
    "encode",
    "one_hot",
    "train_oracle",
]

DNA = "ACGT"
PROTEIN = "ACDEFGHIKLMNPQRSTVWY"

# Kyte & Doolittle (1982), "A simple method for displaying the hydropathic
# character of a protein", J. Mol. Biol. 157:105-132, Table 2 (hydropathy index).
KYTE_DOOLITTLE: dict[str, float] = {
    "A": 1.8, "R": -4.5, "N": -3.5, "D": -3.5, "C": 2.5,
    "Q": -3.5, "E": -3.5, "G": -0.4, "H": -3.2, "I": 4.5,
    "L": 3.8, "K": -3.9, "M": 1.9, "F": 2.8, "P": -1.6,
    "S": -0.8, "T": -0.7, "W": -0.9, "Y": -1.3, "V": 4.2,
}  # fmt: skip

_ORACLE_WEIGHTS = "oracle.safetensors"
_ORACLE_CONFIG = "config.json"
_ORACLE_FORMAT = "genalign.SequenceOracle"
# Optional beside a saved oracle: a JSON list of its K output names, read by OracleReward.
OBJECTIVES_FILE = "objectives.json"


# ------------------------------------------------------------- encoding


def _check_alphabet(alphabet: str) -> None:
    if not isinstance(alphabet, str) or not alphabet or len(set(alphabet)) != len(alphabet):
        raise RewardError(
            f"alphabet must be a non-empty string of distinct characters such as DNA={DNA!r}; "
            f"got {alphabet!r}"
        )


def encode(seqs: Sequence[str], alphabet: str) -> torch.Tensor:
    """Turn equal-length strings into token ids.

    Lower-case letters are accepted (soft-masked genomic sequence is lower case)
    and read as their upper-case letter.

    Args:
        seqs: ``B`` strings, all of length ``L``.
        alphabet: the token set, e.g. :data:`DNA`; id ``i`` is ``alphabet[i]``.

    Returns:
        LongTensor ``[B, L]``.

    Raises:
        RewardError: empty batch, unequal lengths, or a character outside ``alphabet``.
    """
    _check_alphabet(alphabet)
    if isinstance(seqs, str):
        raise RewardError(f"encode expects a list of sequences; got a single string — use encode([{seqs[:20]!r}...])")
    seqs = list(seqs)
    if not seqs:
        raise RewardError("encode got an empty list; pass at least one sequence")
    index = {c: i for i, c in enumerate(alphabet)}
    length = len(seqs[0])
    ids = []
    for b, s in enumerate(seqs):
        if len(s) != length:
            raise RewardError(
                f"encode needs sequences of equal length; sequence 0 has length {length} but "
                f"sequence {b} has length {len(s)} — pad or crop them first"
            )
        row = []
        for pos, char in enumerate(s.upper()):
            if char not in index:
                raise RewardError(
                    f"sequence {b} has {char!r} at position {pos}, which is not in the alphabet "
                    f"{alphabet!r}; remove or replace it (e.g. ambiguous bases 'N')"
                )
            row.append(index[char])
        ids.append(row)
    return torch.tensor(ids, dtype=torch.long).reshape(len(seqs), length)


def decode(ids: torch.Tensor, alphabet: str) -> list[str]:
    """Inverse of :func:`encode`: ids ``[B, L]`` (or one-hot/probabilities ``[B, L, V]``, read by argmax) -> ``B`` strings."""
    _check_alphabet(alphabet)
    if ids.ndim == 3:
        ids = ids.argmax(dim=-1)
    if ids.ndim != 2:
        raise RewardError(f"decode expects ids [B, L] or probabilities [B, L, V]; got shape {tuple(ids.shape)}")
    _check_ids(ids, len(alphabet), "decode")
    return ["".join(alphabet[i] for i in row) for row in ids.tolist()]


def _check_ids(ids: torch.Tensor, vocab: int, who: str) -> None:
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise RewardError(f"{who} expects integer token ids; got a {ids.dtype} tensor — use .long()")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise RewardError(
            f"{who} got token ids in [{int(ids.min())}, {int(ids.max())}] but the alphabet has "
            f"{vocab} tokens (ids 0..{vocab - 1}); drop special tokens such as MASK first"
        )


def one_hot(ids: torch.Tensor, V: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot encode token ids.

    Args:
        ids: integer tensor ``[B, L]`` with values in ``0..V-1``.
        V: alphabet size.
        dtype: floating dtype of the result.

    Returns:
        ``[B, L, V]`` of ``dtype`` on ``ids.device``.
    """
    _check_ids(ids, V, "one_hot")
    return F.one_hot(ids, V).to(dtype)


def _as_probabilities(outputs: torch.Tensor, V: int, who: str) -> torch.Tensor:
    """Ids ``[B, L]`` -> one-hot ``[B, L, V]``; float ``[B, L, V]`` passes through untouched (keeps its graph)."""
    if not outputs.is_floating_point():
        return one_hot(outputs, V)
    if outputs.ndim != 3 or outputs.shape[-1] != V:
        hint = (
            " — this has one extra column; drop the MASK token with x[..., :-1]"
            if outputs.ndim == 3 and outputs.shape[-1] == V + 1
            else ""
        )
        raise RewardError(
            f"{who} expects one-hot/probabilities [B, L, {V}] over its {V}-letter alphabet; got "
            f"shape {tuple(outputs.shape)}{hint}"
        )
    return outputs


# --------------------------------------------------------------- oracle


class SequenceOracle(nn.Module):
    """Dilated residual CNN regressor over one-hot sequences (a DRAKES-style reward oracle).

    Architecture: a bias-free linear embedding of the one-hot input (equal to
    an embedding lookup on hard inputs, and defined on soft ones), ``layers``
    blocks ``h + GELU(Conv1d_dilated(h))`` with dilation ``2**i`` so the
    receptive field grows exponentially, a global mean over positions (any
    length ``L`` works), and a two-layer MLP head. Targets are standardised
    during training; ``target_mean``/``target_std`` buffers undo that, so
    outputs are in the units of the training targets.

    Args:
        alphabet_size: V.
        hidden: channels of the embedding and conv blocks.
        layers: number of dilated conv blocks.
        kernel_size: conv kernel width.
        dropout: dropout after every block and in the head (active in train mode only).
        outputs: K; 1 gives ``[B]`` predictions, K > 1 gives ``[B, K]``.
    """

    def __init__(
        self,
        alphabet_size: int,
        *,
        hidden: int = 64,
        layers: int = 4,
        kernel_size: int = 5,
        dropout: float = 0.0,
        outputs: int = 1,
    ) -> None:
        super().__init__()
        for key, value in (("alphabet_size", alphabet_size), ("hidden", hidden), ("layers", layers),
                           ("kernel_size", kernel_size), ("outputs", outputs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RewardError(f"SequenceOracle {key} must be a positive integer; got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise RewardError(f"SequenceOracle dropout must be in [0, 1); got {dropout!r}")
        self.config: dict[str, Any] = {
            "alphabet_size": alphabet_size,
            "hidden": hidden,
            "layers": layers,
            "kernel_size": kernel_size,
            "dropout": float(dropout),
            "outputs": outputs,
        }
        self.alphabet_size = alphabet_size
        self.outputs = outputs
        self.embed = nn.Linear(alphabet_size, hidden, bias=False)
        self.convs = nn.ModuleList(
            nn.Conv1d(hidden, hidden, kernel_size, dilation=2**i, padding="same") for i in range(layers)
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, outputs))
        self.register_buffer("target_mean", torch.zeros(outputs))
        self.register_buffer("target_std", torch.ones(outputs))

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions in standardised target units, ``[B, K]`` (what training fits)."""
        probs = _as_probabilities(x, self.alphabet_size, "SequenceOracle")
        h = self.embed(probs.to(self.embed.weight.dtype)).transpose(1, 2)  # [B, hidden, L]
        for conv in self.convs:
            h = h + self.dropout(F.gelu(conv(h)))
        return self.head(h.mean(dim=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict targets.

        Args:
            x: one-hot/probabilities ``[B, L, V]`` (differentiable) or ids ``[B, L]``.

        Returns:
            ``[B]`` when ``outputs == 1``, else ``[B, K]``.
        """
        y = self.forward_normalized(x) * self.target_std + self.target_mean
        return y.squeeze(1) if self.outputs == 1 else y

    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``oracle.safetensors`` into the directory ``path`` (created if needed)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / _ORACLE_WEIGHTS))
        config = {"format": _ORACLE_FORMAT, "version": 1, **self.config}
        (path / _ORACLE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> SequenceOracle:
        """Rebuild an oracle written by :meth:`save`; returned in eval mode."""
        path = Path(path)
        config_file, weights_file = path / _ORACLE_CONFIG, path / _ORACLE_WEIGHTS
        if not config_file.is_file() or not weights_file.is_file():
            raise RewardError(
                f"no saved SequenceOracle at {str(path)!r}: expected {_ORACLE_CONFIG} and "
                f"{_ORACLE_WEIGHTS} in that directory (written by SequenceOracle.save)"
            )
        config = json.loads(config_file.read_text())
        if config.pop("format", None) != _ORACLE_FORMAT or config.pop("version", None) != 1:
            raise RewardError(f"{config_file} is not a version-1 SequenceOracle config")
        oracle = cls(config.pop("alphabet_size"), **config)
        oracle.load_state_dict(load_file(str(weights_file)))
        return oracle.to(map_location).eval()


def _pearson(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-column Pearson r of ``[N, K]`` tensors -> ``[K]``; NaN where a column is constant."""
    p = pred - pred.mean(dim=0)
    t = target - target.mean(dim=0)
    denom = p.norm(dim=0) * t.norm(dim=0)
    return torch.where(denom > 0, (p * t).sum(dim=0) / denom, torch.full_like(denom, math.nan))


def train_oracle(
    sequences: torch.Tensor,
    targets: torch.Tensor,
    *,
    alphabet_size: int,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 1e-2,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = False,
    hidden: int = 64,
    layers: int = 4,
    kernel_size: int = 5,
    dropout: float = 0.0,
) -> tuple[SequenceOracle, dict[str, Any]]:
    """Fit a :class:`SequenceOracle` to (sequence, target) pairs by MSE with AdamW.

    A random ``val_fraction`` of the data is held out; targets are standardised
    with the training split's mean/std. All randomness (split, initialisation,
    shuffling, dropout) comes from ``seed`` inside a forked RNG, so on the CPU
    the result is identical for the same seed and the caller's RNG is untouched.

    Args:
        sequences: token ids ``[N, L]``.
        targets: ``[N]`` or ``[N, K]`` real-valued labels.
        alphabet_size: V.
        epochs, batch_size, lr, weight_decay: optimisation settings.
        val_fraction: share of the N examples held out for validation.
        seed: seeds everything random in training.
        progress: show a tqdm bar over epochs.
        hidden, layers, kernel_size, dropout: :class:`SequenceOracle` architecture.

    Returns:
        ``(oracle, metrics)``: the trained oracle in eval mode, and a dict with
        ``val_pearson`` (mean over objectives), ``val_pearson_per_objective``,
        ``val_mse`` (target units), ``train_loss`` (standardised units),
        ``n_train``, ``n_val`` and ``history`` (one dict per epoch with the same
        keys).
    """
    if sequences.ndim != 2 or sequences.is_floating_point():
        raise RewardError(
            f"train_oracle expects integer token ids [N, L]; got {sequences.dtype} of shape "
            f"{tuple(sequences.shape)} — use encode(strings, alphabet)"
        )
    _check_ids(sequences, alphabet_size, "train_oracle")
    if targets.ndim not in (1, 2) or targets.shape[0] != sequences.shape[0]:
        raise RewardError(
            f"train_oracle needs targets [N] or [N, K] with N = {sequences.shape[0]} (one row per "
            f"sequence); got shape {tuple(targets.shape)}"
        )
    n = int(sequences.shape[0])
    n_val = round(n * val_fraction)
    if not 0 < val_fraction < 1 or n_val < 2 or n - n_val < 2:
        raise RewardError(
            f"train_oracle with N={n} and val_fraction={val_fraction!r} leaves {n_val} validation "
            f"and {n - n_val} training examples; both need at least 2 — add data or change val_fraction"
        )
    for key, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RewardError(f"train_oracle {key} must be a positive integer; got {value!r}")

    y = targets.reshape(n, -1).float()
    k = int(y.shape[1])
    # Dropout and initialisation read the global RNG: fork it so training is
    # reproducible from `seed` without changing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        split_gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=split_gen).to(sequences.device)
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        x_train, y_train = sequences[train_idx], y[train_idx]
        x_val, y_val = sequences[val_idx], y[val_idx]

        oracle = SequenceOracle(
            alphabet_size, hidden=hidden, layers=layers, kernel_size=kernel_size, dropout=dropout, outputs=k
        ).to(sequences.device)
        # Standardise on the training split only so validation stays held out.
        oracle.target_mean.copy_(y_train.mean(dim=0))
        oracle.target_std.copy_(y_train.std(dim=0, correction=0).clamp_min(1e-8))
        y_train_n = (y_train - oracle.target_mean) / oracle.target_std

        optimizer = torch.optim.AdamW(oracle.parameters(), lr=lr, weight_decay=weight_decay)
        history: list[dict[str, Any]] = []
        epoch_iter: Any = range(epochs)
        if progress:
            from tqdm.auto import tqdm

            epoch_iter = tqdm(epoch_iter, desc="oracle", leave=False)
        for epoch in epoch_iter:
            oracle.train()
            order = torch.randperm(len(train_idx), generator=split_gen).to(sequences.device)
            total, count = 0.0, 0
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                loss = F.mse_loss(oracle.forward_normalized(x_train[batch]), y_train_n[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
                count += len(batch)
            oracle.eval()
            with torch.no_grad():
                pred_val = oracle(x_val).reshape(n_val, k)
            per_objective = _pearson(pred_val, y_val).tolist()
            record = {
                "epoch": epoch + 1,
                "train_loss": total / count,
                "val_mse": float(F.mse_loss(pred_val, y_val)),
                "val_pearson": float(sum(per_objective) / k),
                "val_pearson_per_objective": per_objective,
            }
            history.append(record)
            if progress:
                epoch_iter.set_postfix(loss=f"{record['train_loss']:.3f}", val_r=f"{record['val_pearson']:.3f}")

    last = history[-1]
    metrics = {
        "val_pearson": last["val_pearson"],
        "val_pearson_per_objective": last["val_pearson_per_objective"],
        "val_mse": last["val_mse"],
        "train_loss": last["train_loss"],
        "n_train": n - n_val,
        "n_val": n_val,
        "history": history,
    }
    return oracle.eval(), metrics


@register_reward("sequence_oracle")
class OracleReward(Reward):
    """A trained :class:`SequenceOracle` as a differentiable reward.

    The oracle is put in eval mode and its parameters are frozen: fine-tuning
    should move the generator, never the reward, and frozen weights keep the
    backward pass from computing oracle gradients nobody uses. Gradients still
    flow to float ``[B, L, V]`` inputs.

    Args:
        oracle: a :class:`SequenceOracle` or a directory written by :meth:`SequenceOracle.save`.
        objectives: names of the K outputs for a multi-output oracle (default: the names listed in the
            directory's ``objectives.json`` if it has one, else ``sequence_oracle_0 .. _{K-1}``).
        output: keep only this output of a multi-output oracle, by index (``0 .. K-1``) or by objective
            name (e.g. ``"hepg2"``): the reward is then ``[B]`` with that one objective.
    """

    modality = "sequence"
    kind = "instance"
    differentiable = True

    def __init__(self, oracle: SequenceOracle | str | Path, objectives: Sequence[str] | None = None,
                 output: int | str | None = None) -> None:
        super().__init__()
        if isinstance(oracle, (str, Path)):
            names_file = Path(oracle) / OBJECTIVES_FILE
            oracle = SequenceOracle.load(oracle)
            if objectives is None and names_file.is_file():
                objectives = json.loads(names_file.read_text())
        if not isinstance(oracle, SequenceOracle):
            raise RewardError(
                f"reward 'sequence_oracle' needs a SequenceOracle or the path of a saved one; got "
                f"a {type(oracle).__name__} — wrap other models in a Reward subclass"
            )
        self.oracle = oracle.eval().requires_grad_(False)
        k = oracle.outputs
        if objectives is not None:
            if len(objectives) != k:
                raise RewardError(
                    f"reward 'sequence_oracle' got {len(objectives)} objective names for an oracle "
                    f"with {k} outputs; give exactly {k}"
                )
            self.objectives = tuple(objectives)
        elif k > 1:
            self.objectives = tuple(f"{self.name}_{i}" for i in range(k))
        self.output: int | None = None
        if output is not None:
            names = self.objectives if len(self.objectives) == k else tuple(f"{self.name}_{i}" for i in range(k))
            if isinstance(output, str):
                if output not in names:
                    raise RewardError(
                        f"reward 'sequence_oracle' has no output named {output!r}; its {k} outputs are "
                        f"{list(names)} — pass one of them or an index 0..{k - 1}"
                    )
                self.output = names.index(output)
            elif isinstance(output, int) and not isinstance(output, bool) and 0 <= output < k:
                self.output = output
            else:
                raise RewardError(
                    f"reward 'sequence_oracle' output must be an index 0..{k - 1} or one of the names "
                    f"{list(names)} of the oracle's {k} outputs; got {output!r}"
                )
            self.objectives = (names[self.output],)

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        """``[B, L]`` ids or ``[B, L, V]`` probabilities -> ``[B]`` (or ``[B, K]``) predictions."""
        predictions = self.oracle(outputs)
        if self.output is None:
            return predictions
        return predictions if self.oracle.outputs == 1 else predictions[:, self.output]


# --------------------------------------------------------- closed form


class _AlphabetReward(Reward):
    """Shared input handling for closed-form rewards over a fixed alphabet."""

    modality = "sequence"
    kind = "instance"
    differentiable = True

    def __init__(self, alphabet: str) -> None:
        super().__init__()
        _check_alphabet(alphabet)
        self.alphabet = alphabet

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` ids or ``[B, L, V]`` -> float ``[B, L, V]`` (graph kept for float inputs)."""
        return _as_probabilities(outputs, len(self.alphabet), f"reward '{self.name}'")

    def _require(self, letters: str, why: str) -> None:
        missing = [c for c in letters if c not in self.alphabet]
        if missing:
            raise RewardError(
                f"reward '{self.name}' needs {why}, but {missing} are not in the alphabet "
                f"{self.alphabet!r}"
            )

    def extra_repr(self) -> str:
        return f"alphabet={self.alphabet!r}, " + super().extra_repr()


@register_reward("gc_content")
class GCContent(_AlphabetReward):
    """Fraction of G and C per sequence; on probabilities, the expected fraction. ``[B, L(, V)] -> [B]``."""

    def __init__(self, alphabet: str = DNA) -> None:
        super().__init__(alphabet)
        self._require("GC", "the letters G and C")

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        """``[B, L]`` ids or ``[B, L, V]`` -> ``[B]`` in [0, 1]."""
        probs = self.probabilities(outputs)
        gc = probs[..., self.alphabet.index("G")] + probs[..., self.alphabet.index("C")]
        return gc.mean(dim=1)


@register_reward("motif_count")
class MotifCount(_AlphabetReward):
    """Number of (possibly overlapping) occurrences of ``motif`` per sequence.

    On probabilities the count is the expected number of occurrences under
    independent positions, ``sum_i prod_j p[i + j, motif[j]]``: differentiable,
    and exactly the integer count on hard one-hot inputs.

    Args:
        motif: the pattern, e.g. ``"TATA"``; every letter must be in ``alphabet``.
        alphabet: token set (default :data:`DNA`).
    """

    def __init__(self, motif: str, alphabet: str = DNA) -> None:
        super().__init__(alphabet)
        if not isinstance(motif, str) or not motif:
            raise RewardError(f"reward 'motif_count' needs a non-empty motif string; got {motif!r}")
        motif = motif.upper()
        self._require(motif, f"every letter of the motif {motif!r}")
        self.motif = motif
        self.register_buffer(
            "motif_ids", torch.tensor([alphabet.index(c) for c in motif], dtype=torch.long), persistent=False
        )

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        """``[B, L]`` ids or ``[B, L, V]`` -> ``[B]`` (expected) occurrence counts."""
        probs = self.probabilities(outputs)
        m, length = len(self.motif), probs.shape[1]
        windows = length - m + 1
        if windows <= 0:
            return probs.new_zeros(probs.shape[0])
        # hit[b, i, j] = probability that position i holds the motif's j-th letter.
        hit = probs.index_select(2, self.motif_ids.to(probs.device))
        match = hit[:, 0:windows, 0]
        for j in range(1, m):
            match = match * hit[:, j : j + windows, j]
        return match.sum(dim=1)

    def extra_repr(self) -> str:
        return f"motif={self.motif!r}, " + super().extra_repr()


@register_reward("hydrophobicity")
class Hydrophobicity(_AlphabetReward):
    """Mean Kyte–Doolittle hydropathy per residue (GRAVY score); expected value on probabilities.

    Args:
        alphabet: amino-acid letters (default :data:`PROTEIN`); each must have a
            value in :data:`KYTE_DOOLITTLE`.
    """

    def __init__(self, alphabet: str = PROTEIN) -> None:
        super().__init__(alphabet)
        unknown = [c for c in alphabet if c not in KYTE_DOOLITTLE]
        if unknown:
            raise RewardError(
                f"reward 'hydrophobicity' has no Kyte-Doolittle value for {unknown}; use the 20 "
                f"standard amino acids, e.g. PROTEIN={PROTEIN!r}"
            )
        self.register_buffer(
            "scale", torch.tensor([KYTE_DOOLITTLE[c] for c in alphabet], dtype=torch.float32), persistent=False
        )

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        """``[B, L]`` ids or ``[B, L, V]`` -> ``[B]`` mean hydropathy (range -4.5..4.5)."""
        probs = self.probabilities(outputs)
        return (probs @ self.scale.to(device=probs.device, dtype=probs.dtype)).mean(dim=1)
