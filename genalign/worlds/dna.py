"""The DNA world's regulatory code: synthetic enhancer-like sequences with a known activity and accessibility.

Sequences over ACGT come from a background order-2 Markov chain with planted transcription-factor-like motifs
(each inserted a Poisson number of times at uniform positions, on a random strand). Because the code that
turns a sequence into activity is known, every score is exact for any sequence, generated or not:

* motif occurrences n_m(x): exact matches of motif m or its reverse complement, anywhere (position- and
  strand-independent; a palindrome counts once per position);
* activity in cell c (two "cell types", HepG2-like and K562-like, with different motif weights):
      a_c(x) = Σ_m w_{c,m} · sat(n_m(x)) + Σ_pairs bonus_{c,pair} · [n_first > 0]·[n_second > 0],
      sat(n) = (1 − ρ^n)/(1 − ρ)   (1, 1 + ρ, 1 + ρ + ρ², …: each extra copy adds less),
  so repeating one motif saturates and cooperating pairs matter: the activity is not linear in counts;
* measured labels = a_c(x) + N(0, σ²) (what oracles are trained on; DRAKES's oracles learn from noisy MPRA);
* accessibility (the ATAC-style check, a rule unrelated to the activity weights): GC fraction ≥ a threshold
  and no occurrence of the silencer motif, which has no activity weight in either cell.

`DNAWorld` reads a built world folder (`genalign/worlds/build_dna.py`; the committed one is `ASSETS`);
`DNAGold` is its gold evaluator (`eval.gold: {name: dna, kwargs: {world: genalign/worlds/assets/dna}}`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from genalign.worlds import read_world_file
from genalign.worlds.markov import MarkovGrammar, kmer_correlation

ALPHABET = "ACGT"
BACKGROUND_FILE = "background.json"
TOP_SEQUENCES_FILE = "top_sequences.txt"
SPLITS_FILE = "splits.safetensors"
MODEL_DIR, REWARD_ORACLE_DIR, EVAL_ORACLE_DIR = "model", "oracle_reward", "oracle_eval"
ACCESSIBILITY_DIR = "accessibility"
# The committed world (built by `python scripts/build_worlds.py dna --out genalign/worlds/assets/dna`).
ASSETS = Path(__file__).resolve().parent / "assets" / "dna"
# An accessibility classifier output above this means "accessible" (it is fit to the 0/1 rule by MSE).
ACCESSIBILITY_THRESHOLD = 0.5


@dataclass(frozen=True)
class Motif:
    """A planted motif.

    Attributes:
        name: a label (after the transcription-factor family it imitates).
        sequence: its consensus over ACGT, read on either strand.
        rate: mean number of planted copies per sequence (Poisson).
        weights: activity weight per cell (HepG2-like, K562-like).
    """

    name: str
    sequence: str
    rate: float
    weights: tuple[float, float]


@dataclass(frozen=True)
class Cooperation:
    """A cooperating motif pair: `bonus[c]` is added to cell c's activity when both motifs occur."""

    first: str
    second: str
    bonus: tuple[float, float]


@dataclass(frozen=True)
class RegulatoryCode:
    """Everything that decides data, activity and accessibility (saved in world.json with the recipe).

    Attributes:
        cells: the two cell-type names; gold keys are "activity_<cell>".
        motifs: the planted motifs (the silencer among them).
        cooperations: motif pairs with a cooperative bonus.
        saturation: ρ in sat(n) = (1 − ρ^n)/(1 − ρ).
        label_noise: σ of the Gaussian noise on measured activity labels.
        silencer: name of the motif whose presence closes chromatin.
        gc_threshold: the least GC fraction of an accessible sequence.
    """

    cells: tuple[str, str] = ("hepg2", "k562")
    motifs: tuple[Motif, ...] = (
        Motif("AP1", "TGACTCA", 0.70, (1.0, 0.3)),
        Motif("EBOX", "CACGTG", 0.60, (0.2, 0.9)),
        Motif("GATA", "AGATAAGA", 0.60, (-0.5, 1.2)),
        Motif("HNF4", "GGTCAAAGG", 0.50, (1.3, -0.2)),
        Motif("CEBP", "TTGCGCAA", 0.60, (0.8, 0.0)),
        Motif("ETS", "CCGGAAGT", 0.60, (0.4, 0.8)),
        Motif("OCT", "ATTTGCAT", 0.40, (0.0, 0.0)),
    )
    cooperations: tuple[Cooperation, ...] = (
        Cooperation("HNF4", "CEBP", (1.0, 0.0)),
        Cooperation("GATA", "EBOX", (0.0, 1.0)),
    )
    saturation: float = 0.6
    label_noise: float = 0.2
    silencer: str = "OCT"
    gc_threshold: float = 0.5

    def motif_index(self, name: str) -> int:
        names = [motif.name for motif in self.motifs]
        if name not in names:
            raise KeyError(f"no motif {name!r} in the regulatory code; motifs: {names}")
        return names.index(name)

    @classmethod
    def from_dict(cls, saved: dict) -> "RegulatoryCode":
        """Inverse of `dataclasses.asdict` (JSON turns tuples into lists)."""
        return cls(
            cells=tuple(saved["cells"]),
            motifs=tuple(Motif(m["name"], m["sequence"], float(m["rate"]), tuple(m["weights"]))
                         for m in saved["motifs"]),
            cooperations=tuple(Cooperation(c["first"], c["second"], tuple(c["bonus"])) for c in saved["cooperations"]),
            saturation=float(saved["saturation"]),
            label_noise=float(saved["label_noise"]),
            silencer=saved["silencer"],
            gc_threshold=float(saved["gc_threshold"]),
        )


REGULATORY_CODE = RegulatoryCode()


# ----------------------------------------------------------------------------------- exact scores


def reverse_complement(sequence: str) -> str:
    return sequence[::-1].translate(str.maketrans("ACGT", "TGCA"))


def _as_ids(sequences: torch.Tensor) -> torch.Tensor:
    """[B, L] ids, or [B, L, V] one-hots / probabilities read by argmax → [B, L] long on the CPU."""
    sequences = sequences.detach().cpu()
    return (sequences.argmax(-1) if sequences.is_floating_point() else sequences).long()


def count_occurrences(ids: torch.Tensor, sequence: str) -> torch.Tensor:
    """Occurrences [B] long of `sequence` or its reverse complement in ids [B, L] (overlaps count; a palindrome
    once per position)."""
    ids = _as_ids(ids)
    counts = torch.zeros(ids.shape[0], dtype=torch.long)
    if ids.shape[1] < len(sequence):
        return counts
    windows = ids.unfold(1, len(sequence), 1)  # [B, L − k + 1, k]
    for strand in {sequence, reverse_complement(sequence)}:
        pattern = torch.tensor([ALPHABET.index(base) for base in strand])
        counts += (windows == pattern).all(-1).sum(-1)
    return counts


def motif_counts(ids: torch.Tensor, code: RegulatoryCode = REGULATORY_CODE) -> torch.Tensor:
    """n_m(x) [B, M] long for ids [B, L] (or one-hots [B, L, 4]), motifs in `code.motifs` order."""
    return torch.stack([count_occurrences(ids, motif.sequence) for motif in code.motifs], dim=1)


def activity(ids: torch.Tensor, code: RegulatoryCode = REGULATORY_CODE) -> torch.Tensor:
    """Exact activity a_c(x) [B, 2] float64 in the two cells of ids [B, L] (or one-hots [B, L, 4]); see the
    module docstring for the formula."""
    counts = motif_counts(ids, code).double()
    rho = code.saturation
    saturated = (1.0 - rho**counts) / (1.0 - rho)
    weights = torch.tensor([motif.weights for motif in code.motifs], dtype=torch.float64)  # [M, 2]
    result = saturated @ weights
    present = counts > 0
    for pair in code.cooperations:
        both = (present[:, code.motif_index(pair.first)] & present[:, code.motif_index(pair.second)]).double()
        result += both[:, None] * torch.tensor(pair.bonus, dtype=torch.float64)
    return result


def gc_content(ids: torch.Tensor) -> torch.Tensor:
    """GC fraction [B] float64 of ids [B, L] (or one-hots)."""
    ids = _as_ids(ids)
    return ((ids == ALPHABET.index("G")) | (ids == ALPHABET.index("C"))).double().mean(-1)


def accessible(ids: torch.Tensor, code: RegulatoryCode = REGULATORY_CODE) -> torch.Tensor:
    """Exact accessibility [B] bool of ids [B, L] (or one-hots): GC ≥ threshold and no silencer."""
    silenced = count_occurrences(ids, code.motifs[code.motif_index(code.silencer)].sequence) > 0
    return (gc_content(ids) >= code.gc_threshold) & ~silenced


def measured_activity(ids: torch.Tensor, code: RegulatoryCode = REGULATORY_CODE, *, seed: int = 0) -> torch.Tensor:
    """Noisy activity labels [B, 2] float64: `activity` + N(0, label_noise²), seeded."""
    exact = activity(ids, code)
    noise = torch.randn(exact.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return exact + code.label_noise * noise


def motif_rates(ids: torch.Tensor, code: RegulatoryCode = REGULATORY_CODE) -> dict[str, float]:
    """Mean occurrences per sequence of every motif over ids [B, L] (or one-hots)."""
    means = motif_counts(ids, code).double().mean(0)
    return {motif.name: float(mean) for motif, mean in zip(code.motifs, means)}


# ----------------------------------------------------------------------------------- the data


def plant_motifs(background: torch.Tensor, code: RegulatoryCode = REGULATORY_CODE, *, seed: int = 0) -> torch.Tensor:
    """Insert motifs into background ids [N, L]: for every motif a Poisson(rate) number of copies per sequence,
    each at a uniform position on a random strand. Motifs are planted in `code.motifs` order, so a later copy
    may overwrite an earlier one; scores are computed from the final sequence, so that only shifts the rates.
    Returns new ids [N, L]."""
    generator = torch.Generator().manual_seed(seed)
    ids = background.clone()
    N, L = ids.shape
    rows = torch.arange(N)
    for motif in code.motifs:
        k = len(motif.sequence)
        strands = torch.tensor([[ALPHABET.index(b) for b in s]
                                for s in (motif.sequence, reverse_complement(motif.sequence))])
        copies = torch.poisson(torch.full((N,), motif.rate, dtype=torch.float64), generator=generator).long()
        for copy in range(int(copies.max()) if N else 0):
            chosen = rows[copies > copy]
            start = torch.randint(L - k + 1, (len(chosen),), generator=generator)
            strand = torch.randint(2, (len(chosen),), generator=generator)
            ids[chosen[:, None], start[:, None] + torch.arange(k)] = strands[strand]
    return ids


def generate_sequences(background: MarkovGrammar, num: int, length: int,
                       code: RegulatoryCode = REGULATORY_CODE, *, seed: int = 0) -> torch.Tensor:
    """`num` world sequences [num, length] long: background chain samples with motifs planted."""
    return plant_motifs(background.sample(num, length, seed=seed), code, seed=seed + 1)


def world_dataset(background: MarkovGrammar, code: RegulatoryCode, num: int, length: int, *,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A world's data set from its recipe seed: ids [num, length] long (sequences seeded seed + 1 and + 2) and
    measured labels [num, 2] float64 (noise seeded seed + 3). The build and `DNAWorld.dataset` both call this."""
    ids = generate_sequences(background, num, length, code, seed=seed + 1)
    return ids, measured_activity(ids, code, seed=seed + 3)


def encode_sequences(lines: Sequence[str]) -> torch.Tensor:
    """Equal-length ACGT strings → ids [N, L] long."""
    table = {base: i for i, base in enumerate(ALPHABET)}
    return torch.tensor([[table[base] for base in line.strip().upper()] for line in lines], dtype=torch.long)


def decode_sequences(ids: torch.Tensor) -> list[str]:
    """ids [N, L] (or one-hots) → ACGT strings."""
    return ["".join(ALPHABET[i] for i in row) for row in _as_ids(ids).tolist()]


# ----------------------------------------------------------------------------------- a built world


class DNAWorld:
    """A built DNA world folder: its regulatory code, background chain, recipe and report, and paths of its parts.

    Folder layout (written by `genalign.worlds.build_dna.build_dna_world`):

    * world.json: the recipe (the regulatory code included) and the build's report;
    * background.json: the order-2 background chain (`MarkovGrammar`);
    * model/: the pre-trained masked diffusion model (`MaskedDiffusionGenerator.from_pretrained`);
    * oracle_reward/ and oracle_eval/: two-output `SequenceOracle`s ([B, 2]: hepg2, k562 activity; names in
      their objectives.json, so reward `sequence_oracle` takes `output: hepg2`) fit to the measured labels of
      disjoint halves of the data; the first is the fine-tuning reward, the second only evaluates;
    * accessibility/: a one-output `SequenceOracle` fit to the 0/1 accessibility rule (output above
      `ACCESSIBILITY_THRESHOLD` = 0.5 means predicted accessible), trained on the evaluation half;
    * splits.safetensors: the data indices ("reward", "eval") each oracle was trained on;
    * top_sequences.txt: the 0.1% of the data with the highest *measured* HepG2 activity label, one per line
      (the reference set of DRAKES's 3-mer correlation metric).

    The data set itself is not stored: `dataset()` regenerates it exactly from the recipe's seed.
    """

    def __init__(self, folder: str | Path = ASSETS) -> None:
        self.folder = Path(folder)
        saved = read_world_file(self.folder, "dna")
        self.recipe: dict = saved["recipe"]
        self.report: dict = saved["report"]
        self.code = RegulatoryCode.from_dict(self.recipe["code"])
        self.background = MarkovGrammar.load(self.folder / BACKGROUND_FILE)

    @property
    def length(self) -> int:
        return int(self.recipe["length"])

    @property
    def model_dir(self) -> Path:
        return self.folder / MODEL_DIR

    @property
    def reward_oracle_dir(self) -> Path:
        return self.folder / REWARD_ORACLE_DIR

    @property
    def eval_oracle_dir(self) -> Path:
        return self.folder / EVAL_ORACLE_DIR

    @property
    def accessibility_dir(self) -> Path:
        return self.folder / ACCESSIBILITY_DIR

    def load_generator(self, **kwargs):
        """The pre-trained masked diffusion model (kwargs go to `MaskedDiffusionGenerator.from_pretrained`)."""
        from genalign.generators.masked import MaskedDiffusionGenerator

        return MaskedDiffusionGenerator.from_pretrained(self.model_dir, **kwargs)

    def load_oracle(self, which: str = "reward"):
        """A `SequenceOracle`: "reward", "eval" (both [B, 2]) or "accessibility" ([B])."""
        from rewards.sequence import SequenceOracle

        folders = {"reward": self.reward_oracle_dir, "eval": self.eval_oracle_dir,
                   "accessibility": self.accessibility_dir}
        if which not in folders:
            raise KeyError(f"no oracle {which!r} in a DNA world; choose one of {sorted(folders)}")
        return SequenceOracle.load(folders[which])

    def predicted_accessible(self, ids: torch.Tensor) -> torch.Tensor:
        """The accessibility classifier's verdict [B] bool on ids [B, L] (or one-hots [B, L, 4])."""
        with torch.no_grad():
            return self.load_oracle("accessibility")(_as_ids(ids)) > ACCESSIBILITY_THRESHOLD

    def splits(self) -> dict[str, torch.Tensor]:
        """{"reward": indices, "eval": indices} [N/2] long into `dataset()`: what each oracle was trained on."""
        from safetensors.torch import load_file

        return {name: index.long() for name, index in load_file(str(self.folder / SPLITS_FILE)).items()}

    def top_sequences(self) -> torch.Tensor:
        """The most active training sequences [N_top, L] long (see the class docstring)."""
        return encode_sequences((self.folder / TOP_SEQUENCES_FILE).read_text().split())

    def top_kmer_correlation(self, ids: torch.Tensor, k: int = 3) -> float:
        """Pearson correlation of the k-mer frequencies of ids [B, L] (or one-hots) with the top sequences'
        (DRAKES's "3-mer correlation" for k = 3)."""
        return kmer_correlation(_as_ids(ids), self.top_sequences(), k, len(ALPHABET))

    def dataset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The data regenerated from the recipe's seed: ids [N, L] long, measured labels [N, 2] float64
        (columns in `code.cells` order). About a second for 50k sequences."""
        recipe = self.recipe
        return world_dataset(self.background, self.code, recipe["num_sequences"], recipe["length"],
                             seed=recipe["seed"])


class DNAGold:
    """The DNA world's gold evaluator: the known activity and accessibility, which no reward sees.

    ``gold(outputs, conditions) -> {"activity_<cell>": [B], "accessible": [B]}`` float tensors on the CPU, exact
    for [B, L] ids or [B, L, 4] one-hots (read by argmax); "accessible" is 0/1.

    Args:
        world: a built DNA world folder (e.g. genalign/worlds/assets/dna).
    """

    def __init__(self, world: str | Path) -> None:
        self.code = DNAWorld(world).code

    def __call__(self, outputs: torch.Tensor, conditions: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        exact = activity(outputs, self.code).float()
        verdict = {f"activity_{cell}": exact[:, c] for c, cell in enumerate(self.code.cells)}
        verdict["accessible"] = accessible(outputs, self.code).float()
        return verdict


def code_as_dict(code: RegulatoryCode) -> dict:
    """The code as JSON-ready nested dicts (what `RegulatoryCode.from_dict` reads)."""
    return asdict(code)
