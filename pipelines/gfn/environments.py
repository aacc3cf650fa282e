"""GFlowNet environments: states, actions, masks and objectives of the tasks (spec ../shared/specs/gflownets.md).

An environment is a DAG of states built by forward actions from one initial state. States of a batch are one
long tensor [B, D]; the last forward action index is "stop" where the environment has one (it ends the
trajectory in a sink, and its backward probability is 1). Every objective is maximised and strictly positive,
so that log R is defined for any scalarisation; each task documents the transform that makes it so.

* `HyperGrid` — the D-dimensional grid of side H (Bengio et al., 2021): increment one coordinate or stop. Its
  single-objective reward is the corner landscape R0 + R1·[all |x/(H−1) − ½| > ¼] + R2·[all ¼·1.2 < … < ¼·1.6];
  its multi-objective form (D = 2) has the Branin and Currin functions as objectives, as in MOGFN's grid task.
  Every terminal state can be enumerated, so the exact target distribution and the true Pareto front are known.
* `SequenceTask` — sequences over an alphabet built left to right (P_B = 1): the N-grams task (counts of given
  bigrams, variable length with a stop action) and the DNA world (fixed length, the reward oracle's two
  cell-type activities).
* `MutationTask` — up to M point mutations of a parent sequence, in increasing position order (P_B = 1): the
  protein world's RFP task (predicted stability vs ProteinMPNN naturalness on one backbone).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from genalign.config import ConfigError


class Environment:
    """What the samplers, policies and the pipeline know of a task.

    Attributes:
        num_actions: forward actions, the stop action (if any) last.
        num_backward_actions: backward actions (0 when every state has one parent, as in sequences).
        max_steps: T, the most transitions of a trajectory (the stop included).
        objective_names: one per objective; `objectives()` returns [B, K] in this order.
        has_stop: whether the last forward action is "stop".
    """

    num_actions: int
    num_backward_actions: int
    max_steps: int
    objective_names: tuple[str, ...]
    has_stop: bool

    def initial_states(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        """[B, D] long: s_0 for every trajectory."""
        raise NotImplementedError

    def forward_mask(self, states: Tensor) -> Tensor:
        """[B, num_actions] bool: the actions allowed in each state (none in a terminal one)."""
        raise NotImplementedError

    def backward_mask(self, states: Tensor) -> Tensor:
        """[B, num_backward_actions] bool: the parents of each state, as backward actions."""
        raise NotImplementedError

    def step(self, states: Tensor, actions: Tensor) -> Tensor:
        """The states after taking `actions` [B] (a stop leaves the state as it is: the object is complete)."""
        raise NotImplementedError

    def backward_action(self, actions: Tensor) -> Tensor:
        """[B] the backward action that undoes each forward action (ignored for stop actions)."""
        raise NotImplementedError

    def is_stop(self, actions: Tensor) -> Tensor:
        return actions == self.num_actions - 1 if self.has_stop else torch.zeros_like(actions, dtype=torch.bool)

    def is_terminal(self, states: Tensor) -> Tensor:
        """[B] bool: a state with no forward action but stop; without a stop action, a complete object."""
        raise NotImplementedError

    def objectives(self, terminals: Tensor) -> Tensor:
        """[B, K] float64, strictly positive, maximised: the objectives of terminal states (one reward call)."""
        raise NotImplementedError

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """[N] distances between paired terminal states, for the diversity metric."""
        raise NotImplementedError

    def describe(self, terminals: Tensor) -> list[str]:
        """Readable strings of terminal states (for galleries and logs)."""
        raise NotImplementedError

    def enumerate_terminals(self) -> Tensor | None:
        """Every terminal state, [N, D], when the task is small enough to enumerate; else None."""
        return None


# --------------------------------------------------------------------------------------------------- HyperGrid
def _branin(u: Tensor, v: Tensor) -> Tensor:
    """Branin on [0, 1]² (rescaled from [−5, 10] × [0, 15]); a function to minimise, range about [0.4, 308]."""
    x, y = 15 * u - 5, 15 * v
    return (y - 5.1 / (4 * math.pi**2) * x**2 + 5 / math.pi * x - 6) ** 2 + 10 * (1 - 1 / (8 * math.pi)) * torch.cos(x) + 10


def _currin(u: Tensor, v: Tensor) -> Tensor:
    """Currin's exponential function on [0, 1]² (to maximise; the v = 0 limit is 1·(2300u³ + …)/(100u³ + …))."""
    v = v.clamp_min(1e-9)
    return (1 - torch.exp(-1 / (2 * v))) * (2300 * u**3 + 1900 * u**2 + 2092 * u + 60) / (
        100 * u**3 + 500 * u**2 + 4 * u + 20)


@dataclass
class HyperGrid(Environment):
    """The D-dimensional grid {0 … H−1}^D. Forward actions: increment coordinate d (d < D), or stop (D).
    Backward actions: decrement coordinate d. A trajectory has at most D·(H−1) increments and the stop.

    `objectives`:
      * "corners" (any D): the one objective R0 + R1·[∀d |x_d/(H−1) − ½| > ¼] + R2·[∀d 0.3 < |…| < 0.4];
      * "branin_currin" (D = 2): −Branin and Currin on the unit square, each min–max normalised over the grid to
        [floor, 1], so the smallest value is `floor` rather than 0 and log R stays finite.
    """

    ndim: int = 2
    height: int = 8
    reward: str = "corners"
    r0: float = 1e-3
    r1: float = 0.5
    r2: float = 2.0
    floor: float = 0.01

    def __post_init__(self) -> None:
        if self.ndim < 1 or self.height < 2:
            raise ConfigError(f"HyperGrid needs ndim ≥ 1 and height ≥ 2; got ndim={self.ndim}, height={self.height}")
        if self.reward not in ("corners", "branin_currin"):
            raise ConfigError(f"HyperGrid reward must be 'corners' or 'branin_currin'; got '{self.reward}'")
        if self.reward == "branin_currin" and self.ndim != 2:
            raise ConfigError(f"the branin_currin HyperGrid is two-dimensional; set ndim: 2 (got {self.ndim})")
        self.num_actions = self.ndim + 1
        self.num_backward_actions = self.ndim
        self.max_steps = self.ndim * (self.height - 1) + 1
        self.has_stop = True
        self.objective_names = ("reward",) if self.reward == "corners" else ("branin", "currin")
        if self.reward == "branin_currin":
            everything = self._raw_objectives(self.enumerate_terminals())
            self._low, self._high = everything.amin(0), everything.amax(0)

    def initial_states(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.zeros(batch, self.ndim, dtype=torch.long, device=device)

    def forward_mask(self, states: Tensor) -> Tensor:
        stop = torch.ones(len(states), 1, dtype=torch.bool, device=states.device)
        return torch.cat([states < self.height - 1, stop], dim=1)

    def backward_mask(self, states: Tensor) -> Tensor:
        return states > 0

    def step(self, states: Tensor, actions: Tensor) -> Tensor:
        increment = torch.nn.functional.one_hot(actions.clamp_max(self.ndim - 1), self.ndim)
        return states + increment * (actions < self.ndim)[:, None]

    def backward_action(self, actions: Tensor) -> Tensor:
        return actions.clamp_max(self.ndim - 1)

    def is_terminal(self, states: Tensor) -> Tensor:
        return (states == self.height - 1).all(1)

    def _raw_objectives(self, terminals: Tensor) -> Tensor:
        u = terminals.to(torch.float64) / (self.height - 1)
        return torch.stack([-_branin(u[:, 0], u[:, 1]), _currin(u[:, 0], u[:, 1])], dim=1)

    def objectives(self, terminals: Tensor) -> Tensor:
        if self.reward == "corners":
            centred = (terminals.to(torch.float64) / (self.height - 1) - 0.5).abs()
            outer = (centred > 0.25).all(1)
            ring = ((centred > 0.3) & (centred < 0.4)).all(1)
            return (self.r0 + self.r1 * outer + self.r2 * ring)[:, None]
        raw = self._raw_objectives(terminals)
        scaled = (raw - self._low.to(raw.device)) / (self._high - self._low).to(raw.device)
        return self.floor + (1 - self.floor) * scaled

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        return (a - b).abs().sum(1).to(torch.float64)

    def describe(self, terminals: Tensor) -> list[str]:
        return ["(" + ", ".join(str(int(v)) for v in row) + ")" for row in terminals]

    def enumerate_terminals(self) -> Tensor:
        axes = [torch.arange(self.height)] * self.ndim
        return torch.cartesian_prod(*axes).reshape(-1, self.ndim)


# --------------------------------------------------------------------------------------------------- sequences
@dataclass
class SequenceTask(Environment):
    """Sequences over `alphabet` written left to right. A state is [B, L] token ids with `pad` (= V) after its
    prefix; forward actions append a token (0 … V−1) or, for variable-length tasks, stop (V) once the prefix has
    `min_length` tokens; every state has one parent, so P_B = 1 and there are no backward actions.

    `score` maps complete sequences [B, L] (padded with V) to [B, K] strictly positive objectives.
    """

    alphabet: str
    max_length: int
    min_length: int
    score: Callable[[Tensor], Tensor]
    objective_names: tuple[str, ...]
    fixed_length: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.min_length <= self.max_length:
            raise ConfigError(f"need 1 ≤ min_length ≤ max_length; got {self.min_length}, {self.max_length}")
        self.vocab_size = len(self.alphabet)
        self.pad = self.vocab_size
        self.has_stop = not self.fixed_length
        self.num_actions = self.vocab_size + int(self.has_stop)
        self.num_backward_actions = 0
        self.max_steps = self.max_length + int(self.has_stop)

    def lengths(self, states: Tensor) -> Tensor:
        return (states != self.pad).sum(1)

    def initial_states(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.full((batch, self.max_length), self.pad, dtype=torch.long, device=device)

    def forward_mask(self, states: Tensor) -> Tensor:
        n = self.lengths(states)[:, None]
        tokens = (n < self.max_length).expand(-1, self.vocab_size)
        if not self.has_stop:
            return tokens
        return torch.cat([tokens, n >= self.min_length], dim=1)

    def backward_mask(self, states: Tensor) -> Tensor:
        return torch.zeros(len(states), 0, dtype=torch.bool, device=states.device)

    def step(self, states: Tensor, actions: Tensor) -> Tensor:
        n = self.lengths(states)
        writes = actions < self.vocab_size
        rows = torch.nonzero(writes).squeeze(1)
        out = states.clone()
        out[rows, n[rows]] = actions[rows]
        return out

    def backward_action(self, actions: Tensor) -> Tensor:
        return torch.zeros_like(actions)

    def is_terminal(self, states: Tensor) -> Tensor:
        return self.lengths(states) == self.max_length

    def objectives(self, terminals: Tensor) -> Tensor:
        return _checked_objectives(self.score(terminals), self.objective_names)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Levenshtein distance between the sequences (Hamming for fixed-length tasks)."""
        if self.fixed_length:
            return (a != b).sum(1).to(torch.float64)
        return torch.tensor([_levenshtein(x, y) for x, y in zip(self._tokens(a), self._tokens(b))], dtype=torch.float64)

    def _tokens(self, states: Tensor) -> list[list[int]]:
        return [[t for t in row.tolist() if t != self.pad] for row in states]

    def describe(self, terminals: Tensor) -> list[str]:
        return ["".join(self.alphabet[t] for t in row) for row in self._tokens(terminals)]

    def encode(self, texts: Sequence[str]) -> Tensor:
        """Strings → padded [B, L] ids; a letter outside the alphabet raises ValueError naming it."""
        out = torch.full((len(texts), self.max_length), self.pad, dtype=torch.long)
        for i, text in enumerate(texts):
            if len(text) > self.max_length:
                raise ValueError(f"sequence {i} has {len(text)} letters; this task's sequences have ≤ {self.max_length}")
            for j, letter in enumerate(text):
                if letter not in self.alphabet:
                    raise ValueError(f"sequence {i} has '{letter}' at position {j}, not in the alphabet '{self.alphabet}'")
                out[i, j] = self.alphabet.index(letter)
        return out

    def enumerate_terminals(self) -> Tensor | None:
        """Every sequence of min_length … max_length tokens when there are at most 20,000 of them."""
        if sum(self.vocab_size**n for n in range(self.min_length, self.max_length + 1)) > 20_000:
            return None
        rows = []
        for n in range(self.min_length, self.max_length + 1):
            body = torch.cartesian_prod(*[torch.arange(self.vocab_size)] * n).reshape(-1, n)
            rows.append(torch.cat([body, torch.full((len(body), self.max_length - n), self.pad)], dim=1))
        return torch.cat(rows)


def _checked_objectives(values: Tensor, names: Sequence[str]) -> Tensor:
    """A task's scores [B] or [B, K] as [B, K] float64, or ValueError when one is not finite and positive (log R is
    taken of each)."""
    values = values.to(torch.float64)
    if values.ndim == 1:
        values = values[:, None]
    if bool((values <= 0).any()) or not bool(torch.isfinite(values).all()):
        raise ValueError(f"the {'/'.join(names)} objectives must be finite and positive (log R is taken); got min "
                         f"{float(values.min())}")
    return values


def _levenshtein(a: list[int], b: list[int]) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def bigram_counts(states: Tensor, bigrams: Sequence[str], alphabet: str, pad: int) -> Tensor:
    """[B, K] occurrences (overlapping) of each bigram in the padded sequences [B, L]."""
    first, second = states[:, :-1], states[:, 1:]
    counts = []
    for bigram in bigrams:
        a, b = (alphabet.index(letter) for letter in bigram)
        counts.append(((first == a) & (second == b)).sum(1))
    return torch.stack(counts, dim=1)


def ngrams_task(alphabet: str = "ABCD", bigrams: Sequence[str] = ("AB", "BC", "CA"), max_length: int = 16,
                min_length: int = 2) -> SequenceTask:
    """The N-grams task: objective k = (count of bigram k + 1) / (max possible count + 1), in (0, 1] — shifted by
    one so that a sequence without the bigram scores 1/(c_max + 1) instead of 0 (log R stays finite)."""
    for bigram in bigrams:
        if len(bigram) != 2 or any(letter not in alphabet for letter in bigram):
            raise ConfigError(f"bigram '{bigram}' must be two letters of the alphabet '{alphabet}'")
    # A bigram "XX" can occur L − 1 times; "XY" with X ≠ Y at most ⌊L/2⌋ times.
    most = torch.tensor([max_length - 1 if b[0] == b[1] else max_length // 2 for b in bigrams], dtype=torch.float64)
    pad = len(alphabet)

    def score(states: Tensor) -> Tensor:
        counts = bigram_counts(states, bigrams, alphabet, pad).to(torch.float64)
        return (counts + 1) / (most.to(counts.device) + 1)

    return SequenceTask(alphabet=alphabet, max_length=max_length, min_length=min_length, score=score,
                        objective_names=tuple(bigrams))


def dna_task(world: str | Path | None = None, oracle: str = "reward", floor: float = 0.01) -> SequenceTask:
    """The DNA world's enhancers (fixed length, ACGT) with its oracle's two cell-type activities (HepG2, K562) as
    objectives. Each activity a is mapped to [floor, 1] by min–max over the world's training sequences (clipped):
    floor + (1 − floor)·clip((a − a_min)/(a_max − a_min), 0, 1), so log R is finite and 1 is the best activity
    seen in the data."""
    from genalign.worlds.dna import ASSETS, DNAWorld

    dna = DNAWorld(world or ASSETS)
    model = dna.load_oracle(oracle)
    sequences, _ = dna.dataset()
    with torch.no_grad():
        reference = _oracle_scores(model, sequences)
    low, high = reference.amin(0), reference.amax(0)

    def score(states: Tensor) -> Tensor:
        with torch.no_grad():
            values = _oracle_scores(model, states)
        scaled = ((values - low.to(values.device)) / (high - low).to(values.device)).clamp(0, 1)
        return floor + (1 - floor) * scaled

    return SequenceTask(alphabet="ACGT", max_length=dna.length, min_length=dna.length, score=score,
                        objective_names=("hepg2", "k562"), fixed_length=True)


# --------------------------------------------------------------------------------------------------- mutations
@dataclass
class MutationTask(Environment):
    """Designs made by 1 … `max_edits` point mutations of a parent sequence (LaMBO's and MOGFN's RFP setting:
    edit a known protein rather than write one from nothing). Mutations are made in increasing position order and
    each changes its residue, so every design has exactly one trajectory and P_B = 1, as for sequences.

    A state is [B, L + 1]: the residues, then the position after the last mutation (0 at the start). Forward
    actions: position·V + residue (a residue different from the parent's, at a position past the last
    mutation, while fewer than `max_edits` are made), then stop (once `min_edits` are made). `score` maps
    designs [B, L] to [B, K] strictly positive objectives.
    """

    parent: str
    alphabet: str
    max_edits: int
    score: Callable[[Tensor], Tensor]
    objective_names: tuple[str, ...]
    min_edits: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.min_edits <= self.max_edits or self.max_edits < 1:
            raise ConfigError(f"need 0 ≤ min_edits ≤ max_edits and max_edits ≥ 1; got {self.min_edits}, {self.max_edits}")
        bad = sorted(set(self.parent) - set(self.alphabet))
        if bad:
            raise ConfigError(f"the parent sequence has letters {bad} outside the alphabet '{self.alphabet}'")
        self.vocab_size = len(self.alphabet)
        self.length = len(self.parent)
        self.parent_ids = torch.tensor([self.alphabet.index(c) for c in self.parent])
        self.has_stop = True
        self.num_actions = self.length * self.vocab_size + 1
        self.num_backward_actions = 0
        self.max_steps = self.max_edits + 1

    def designs(self, states: Tensor) -> Tensor:
        """[B, L] the residues of states [B, L + 1]."""
        return states[:, : self.length]

    def edits(self, states: Tensor) -> Tensor:
        """[B] the number of mutations made."""
        return (self.designs(states) != self.parent_ids.to(states.device)).sum(1)

    def initial_states(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        start = torch.cat([self.parent_ids, torch.zeros(1, dtype=torch.long)])
        return start.to(device)[None].expand(batch, -1).clone()

    def forward_mask(self, states: Tensor) -> Tensor:
        b, n, v = len(states), self.length, self.vocab_size
        edits = self.edits(states)
        position = torch.arange(n, device=states.device)[None, :]
        open_positions = (position >= states[:, n : n + 1]) & (edits < self.max_edits)[:, None]  # [B, L]
        different = torch.nn.functional.one_hot(self.parent_ids.to(states.device), v).bool().logical_not()  # [L, V]
        mutations = (open_positions[:, :, None] & different[None]).reshape(b, n * v)
        return torch.cat([mutations, (edits >= self.min_edits)[:, None]], dim=1)

    def backward_mask(self, states: Tensor) -> Tensor:
        return torch.zeros(len(states), 0, dtype=torch.bool, device=states.device)

    def step(self, states: Tensor, actions: Tensor) -> Tensor:
        rows = torch.nonzero(~self.is_stop(actions)).squeeze(1)
        position, residue = actions[rows] // self.vocab_size, actions[rows] % self.vocab_size
        out = states.clone()
        out[rows, position] = residue
        out[rows, self.length] = position + 1
        return out

    def backward_action(self, actions: Tensor) -> Tensor:
        return torch.zeros_like(actions)

    def is_terminal(self, states: Tensor) -> Tensor:
        return (self.edits(states) >= self.max_edits) | (states[:, self.length] >= self.length)

    def objectives(self, terminals: Tensor) -> Tensor:
        return _checked_objectives(self.score(self.designs(terminals)), self.objective_names)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        return (self.designs(a) != self.designs(b)).sum(1).to(torch.float64)

    def enumerate_terminals(self) -> Tensor | None:
        """Every design (min_edits … max_edits mutations) when there are at most 20,000 of them."""
        counts = [math.comb(self.length, k) * (self.vocab_size - 1) ** k
                  for k in range(self.min_edits, self.max_edits + 1)]
        if sum(counts) > 20_000:
            return None
        rows = []
        for k in range(self.min_edits, self.max_edits + 1):
            for positions in itertools.combinations(range(self.length), k):
                choices = [[v for v in range(self.vocab_size) if v != int(self.parent_ids[p])] for p in positions]
                for residues in itertools.product(*choices):
                    row = torch.cat([self.parent_ids, torch.tensor([positions[-1] + 1 if positions else 0])])
                    row[list(positions)] = torch.tensor(residues, dtype=torch.long)
                    rows.append(row)
        return torch.stack(rows)

    def trajectory_actions(self, terminals: Tensor) -> tuple[Tensor, Tensor]:
        """The unique trajectory of each design: actions [N, T] (its mutations by position, then stop; −1 after)
        and lengths [N]."""
        designs = self.designs(terminals)
        changed = designs != self.parent_ids.to(terminals.device)
        actions = torch.full((len(terminals), self.max_steps), -1, dtype=torch.long, device=terminals.device)
        lengths = changed.sum(1) + 1
        for row in range(len(terminals)):
            positions = torch.nonzero(changed[row]).squeeze(1)
            actions[row, : len(positions)] = positions * self.vocab_size + designs[row, positions]
            actions[row, len(positions)] = self.num_actions - 1
        return actions, lengths

    def describe(self, terminals: Tensor) -> list[str]:
        """Each design as its mutations from the parent, e.g. "K45R,G67A" (1-based positions)."""
        parent = self.parent_ids.to(terminals.device)
        out = []
        for row in self.designs(terminals):
            changed = torch.nonzero(row != parent).squeeze(1).tolist()
            out.append(",".join(f"{self.parent[i]}{i + 1}{self.alphabet[int(row[i])]}" for i in changed) or "parent")
        return out


def rfp_task(backbone: str = "2vad_A", world: str | Path | None = None, oracle: str = "reward", max_edits: int = 8,
             floor: float = 0.01) -> MutationTask:
    """The protein world's RFP design task: up to `max_edits` mutations of a backbone's native sequence, with two
    objectives —

    * stability: the world's stability oracle ("reward" for training, "eval" for evaluation) of predicted FoldX
      stability, min–max scaled over the world's labelled FoldX range to [floor, 1] (clipped);
    * naturalness: exp(mean_i log q_i(x_i)), the geometric-mean probability of the design's residues under
      ProteinMPNN's structure-only profile q_i of the backbone (every position masked; one forward per task), in
      (0, 1]: how well the design fits the fold, as ProteinMPNN reads it.
    """
    from genalign.generators.proteinmpnn import PROTEIN_ALPHABET, ProteinMPNNDenoiser
    from genalign.worlds.protein import DEFAULT_WORLD, ProteinWorld
    from rewards.sequence import SequenceOracle

    protein = ProteinWorld(world or DEFAULT_WORLD)
    if backbone not in protein.natives:
        raise ConfigError(f"unknown backbone '{backbone}'; the protein world has {', '.join(sorted(protein.natives))}")
    if oracle not in ("reward", "eval"):
        raise ConfigError(f"oracle must be 'reward' or 'eval'; got '{oracle}'")
    model = SequenceOracle.load(protein.reward_oracle_dir if oracle == "reward" else protein.eval_oracle_dir)
    model.requires_grad_(False)
    foldx = torch.tensor(protein.dataset()["foldx"], dtype=torch.float64)
    low, high = foldx.min(), foldx.max()
    mpnn = ProteinMPNNDenoiser.from_package()
    length = len(protein.natives[backbone])
    with torch.no_grad():
        masked = torch.full((1, length), mpnn.vocab_size, dtype=torch.long)
        logits = mpnn(masked, mpnn.condition_tensors([backbone]))[0, :, : mpnn.vocab_size]
    profile = torch.log_softmax(logits.double(), dim=-1)  # [L, V] in PROTEIN_ALPHABET order
    positions = torch.arange(length)

    def score(designs: Tensor) -> Tensor:
        with torch.no_grad():
            stability = _oracle_scores(model, designs).reshape(-1)
        scaled = ((stability - low.to(stability.device)) / (high - low).to(stability.device)).clamp(0, 1)
        natural = profile.to(designs.device)[positions.to(designs.device), designs].mean(1).exp()
        return torch.stack([floor + (1 - floor) * scaled, natural], dim=1)

    return MutationTask(parent=protein.natives[backbone], alphabet=PROTEIN_ALPHABET, max_edits=max_edits,
                        score=score, objective_names=("stability", "naturalness"))


def _oracle_scores(model, ids: Tensor, chunk: int = 512) -> Tensor:
    model = model.to(ids.device)
    return torch.cat([model(ids[i : i + chunk]).to(torch.float64) for i in range(0, len(ids), chunk)])


TASKS: dict[str, Callable[..., Environment]] = {
    "hypergrid": HyperGrid,
    "ngrams": ngrams_task,
    "dna": dna_task,
    "rfp": rfp_task,
}


def build_task(name: str, kwargs: dict) -> Environment:
    """The task registered under `name` with its settings; an unknown name or setting raises ConfigError."""
    if name not in TASKS:
        raise ConfigError(f"unknown GFlowNet task '{name}'; available: {', '.join(sorted(TASKS))}")
    try:
        return TASKS[name](**kwargs)
    except TypeError as error:
        raise ConfigError(f"task '{name}': {error} (see pipelines/gfn/environments.py for its settings)") from None
