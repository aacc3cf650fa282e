"""A Markov grammar world: seeded order-k Markov chains over a small alphabet, for masked-diffusion tests/configs.

The chain is known exactly, so a model trained on its samples can be judged against the truth: the exact
log-likelihood of any sequence, and k-mer frequency statistics (3-mer correlation is one of DRAKES's DNA
metrics). Transitions are drawn from a sparse Dirichlet, so they are strongly non-uniform and learning is
visible quickly; a small floor keeps every sequence possible (finite log-likelihood).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


@dataclass
class MarkovGrammar:
    """An order-`order` Markov chain over `alphabet`.

    Attributes:
        alphabet: the V token characters; id i is alphabet[i].
        order: how many preceding tokens the next one depends on (1 or 2).
        transitions: [V**order, V] float64, row c = P(next | context c), where the context index of the
            previous tokens (x_{i−order}, …, x_{i−1}) is Σ_j x_{i−order+j}·V**(order−1−j).
    The first `order` tokens of a sequence are uniform.
    """

    alphabet: str
    order: int
    transitions: torch.Tensor

    @classmethod
    def random(cls, alphabet: str = "ACGT", order: int = 1, *, concentration: float = 0.3, floor: float = 0.02,
               seed: int = 0) -> "MarkovGrammar":
        """Rows ~ (1 − floor)·Dirichlet(concentration) + floor/V: small concentrations give peaked rows."""
        if order < 1:
            raise ValueError(f"order must be at least 1; got {order}")
        V = len(alphabet)
        rows = torch.from_numpy(np.random.default_rng(seed).dirichlet(np.full(V, concentration), size=V**order))
        return cls(alphabet, order, (1.0 - floor) * rows + floor / V)

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def _contexts(self, ids: torch.Tensor) -> torch.Tensor:
        """[N, L] ids → [N, L − order] context index of every position from `order` on."""
        L = ids.shape[1]
        index = torch.zeros_like(ids[:, self.order :])
        for j in range(self.order):
            index = index * self.vocab_size + ids[:, j : L - self.order + j]
        return index

    def sample(self, num: int, length: int, *, seed: int = 0) -> torch.Tensor:
        """[num, length] long ids drawn from the chain."""
        if length < self.order:
            raise ValueError(f"length {length} is shorter than the chain's order {self.order}")
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(self.vocab_size, (num, length), generator=generator)
        for i in range(self.order, length):
            context = self._contexts(ids[:, i - self.order : i + 1])[:, 0]
            ids[:, i] = torch.multinomial(self.transitions[context], 1, generator=generator).squeeze(1)
        return ids

    def log_likelihood(self, ids: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) [N] float64 of ids [N, L]."""
        ids = ids.cpu().long()
        head = -self.order * torch.log(torch.tensor(float(self.vocab_size), dtype=torch.float64))
        steps = torch.log(self.transitions[self._contexts(ids), ids[:, self.order :]]).sum(-1)
        return head + steps

    def decode(self, ids: torch.Tensor) -> list[str]:
        return ["".join(self.alphabet[i] for i in row) for row in ids.tolist()]

    def save(self, path: str | Path) -> Path:
        """Write the chain as JSON (alphabet, order, transition rows)."""
        path = Path(path)
        path.write_text(json.dumps({"alphabet": self.alphabet, "order": self.order,
                                    "transitions": self.transitions.tolist()}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "MarkovGrammar":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no Markov grammar at '{path}'; pass the grammar.json of a built Markov world, "
                                    "e.g. genalign/worlds/assets/markov/grammar.json (scripts/build_worlds.py markov)")
        saved = json.loads(path.read_text())
        return cls(saved["alphabet"], int(saved["order"]), torch.tensor(saved["transitions"], dtype=torch.float64))


class MarkovGold:
    """The Markov world's gold evaluator: how natural sequences are under the true grammar, which no reward
    sees. ``gold(ids, conditions) -> {"log_likelihood_per_token": [B]}`` (exact log p(x) / L, float on the CPU).

    A reward that a model hacks by repeating one pattern shows here as a falling log-likelihood.

    Args:
        grammar: a grammar.json written by `MarkovGrammar.save`, or the world folder holding one.
    """

    def __init__(self, grammar: str | Path) -> None:
        path = Path(grammar)
        self.grammar = MarkovGrammar.load(path / "grammar.json" if path.is_dir() else path)

    def __call__(self, outputs: torch.Tensor, conditions: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        ids = outputs.argmax(-1) if outputs.is_floating_point() else outputs
        return {"log_likelihood_per_token": (self.grammar.log_likelihood(ids) / ids.shape[1]).float()}


def kmer_frequencies(ids: torch.Tensor, k: int, vocab_size: int) -> torch.Tensor:
    """Relative frequencies [V**k] float64 of every k-mer over all windows of ids [N, L] (index as base-V number)."""
    ids = ids.cpu().long()
    windows = ids.unfold(1, k, 1).reshape(-1, k)  # [N·(L−k+1), k]
    index = torch.zeros(windows.shape[0], dtype=torch.long)
    for j in range(k):
        index = index * vocab_size + windows[:, j]
    counts = torch.bincount(index, minlength=vocab_size**k).to(torch.float64)
    return counts / counts.sum()


def kmer_total_variation(a: torch.Tensor, b: torch.Tensor, k: int, vocab_size: int) -> float:
    """Total-variation distance ½·Σ|f_a − f_b| between the k-mer frequencies of two id sets [N, L], in [0, 1]."""
    return 0.5 * float((kmer_frequencies(a, k, vocab_size) - kmer_frequencies(b, k, vocab_size)).abs().sum())


def kmer_correlation(a: torch.Tensor, b: torch.Tensor, k: int, vocab_size: int) -> float:
    """Pearson correlation of the k-mer frequencies of two id sets [N, L] (DRAKES's 3-mer metric for k = 3)."""
    fa, fb = kmer_frequencies(a, k, vocab_size), kmer_frequencies(b, k, vocab_size)
    return float(torch.corrcoef(torch.stack([fa, fb]))[0, 1])


def write_dataset(path: str | Path, grammar: MarkovGrammar, num: int, length: int, *, seed: int = 0) -> Path:
    """Write `num` sampled sequences to `path`, formatted by its suffix: .fasta/.fa (FASTA), .csv (columns
    `sequence`, `log_likelihood`), anything else one sequence per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = grammar.sample(num, length, seed=seed)
    sequences = grammar.decode(ids)
    suffix = path.suffix.lower()
    if suffix in (".fasta", ".fa"):
        path.write_text("".join(f">seq{i}\n{s}\n" for i, s in enumerate(sequences)))
    elif suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sequence", "log_likelihood"])
            writer.writerows(zip(sequences, (f"{v:.6f}" for v in grammar.log_likelihood(ids).tolist())))
    else:
        path.write_text("".join(s + "\n" for s in sequences))
    return path
