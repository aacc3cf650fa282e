"""The protein world: real red fluorescent protein (RFP) data for inverse folding with ProteinMPNN.

Real parts, small enough to ship (`genalign/worlds/assets/protein`, built by `genalign/worlds/build_protein.py`):

* six single-chain RFP crystal structures (PDB 2VAD, 2VAE, 3E5V, 3NED, 5LK4, 6AA7), stripped to the ATOM lines
  of their backbone atoms; each one's native sequence is read from its ATOM records (the chromophore, a HETATM
  residue, is not part of it, as in the labelled sequences);
* 1,563 labelled RFP sequences (the LaMBO RFP benchmark, via poli-core): FoldX stability (the negative FoldX
  energy, higher = more stable, comparable across backbones) and a RaSP score (same sign: it correlates
  positively with FoldX within each family, Spearman 0.29–0.74; about 0 at each parent, so it measures change
  from the parent rather than absolute stability);
* two `SequenceOracle` stability predictors of FoldX trained on disjoint splits: `oracle_reward` (the
  fine-tuning reward) and `oracle_eval` (evaluation only), with a third split that neither saw for reporting;
* the pretrained prior is not stored here: it is ProteinMPNN's original weights from the `proteinmpnn` package,
  `MaskedDiffusionGenerator.from_pretrained("proteinmpnn:v_48_020")`, whose conditions are backbone names of
  this world ("2vad_A") or PDB paths.

`ProteinGold` judges generated sequences with the evaluation oracle and against each backbone's native sequence.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from genalign.generators.proteinmpnn import PROTEIN_ALPHABET, encode_protein, parse_backbone
from genalign.worlds import WORLD_FILE, read_world_file

DATA_FILE = "data/rfp_stability.csv"
BACKBONE_DIR = "backbones"
REWARD_ORACLE_DIR, EVAL_ORACLE_DIR = "oracle_reward", "oracle_eval"
DEFAULT_WORLD = Path(__file__).resolve().parent / "assets" / "protein"


def read_sequences(path: str | Path) -> list[str]:
    """Amino-acid sequences, one per line (blank lines and FASTA '>' headers skipped), checked against the 20
    amino acids: a letter outside them raises ValueError naming the file, line and position."""
    path = Path(path)
    sequences = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(">"):
            continue
        encode_protein(line, where=f"{path}, line {number}")
        sequences.append(line.upper())
    return sequences


class ProteinWorld:
    """A built protein world folder.

    Attributes:
        folder: the world folder (default: the committed genalign/worlds/assets/protein).
        backbones: name → PDB path of each design backbone ("2vad_A" → …/backbones/2vad_A.pdb).
        natives: name → native sequence (its ATOM-record residues with all backbone atoms).
        recipe, report: what world.json holds (the build's settings and measured numbers).
    """

    def __init__(self, folder: str | Path = DEFAULT_WORLD) -> None:
        self.folder = Path(folder)
        saved = read_world_file(self.folder, "protein")
        self.recipe: dict = saved["recipe"]
        self.report: dict = saved["report"]
        self.label: str = saved["label"]
        entries = saved["backbones"]
        self.backbones: dict[str, Path] = {name: self.folder / entry["pdb"] for name, entry in entries.items()}
        self.natives: dict[str, str] = {name: entry["native"] for name, entry in saved["backbones"].items()}

    @property
    def reward_oracle_dir(self) -> Path:
        return self.folder / REWARD_ORACLE_DIR

    @property
    def eval_oracle_dir(self) -> Path:
        return self.folder / EVAL_ORACLE_DIR

    def dataset(self) -> dict[str, list]:
        """The labelled RFP data: {"sequence": [str], "foldx": [float], "rasp": [float], "split": [str]} with
        split in {"reward", "eval", "test"} (the oracles' disjoint training splits and the held-out one)."""
        with (self.folder / DATA_FILE).open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        return {"sequence": [r["sequence"] for r in rows], "foldx": [float(r["foldx"]) for r in rows],
                "rasp": [float(r["rasp"]) for r in rows], "split": [r["split"] for r in rows]}


def resolve_backbone(text: str, world: str | Path | None = None) -> Path:
    """The PDB file a condition text names: an existing path, or a backbone name of the protein world.

    Raises:
        ValueError: neither, listing the world's backbone names.
    """
    path = Path(text)
    if text and path.is_file():
        return path
    folder = Path(world) if world is not None else DEFAULT_WORLD
    if (folder / WORLD_FILE).is_file():
        backbones = ProteinWorld(folder).backbones
        if text in backbones:
            return backbones[text]
        known = ", ".join(sorted(backbones))
    else:
        known = f"none (no protein world at {folder})"
    raise ValueError(f"condition {text!r} names no protein backbone: it is neither a PDB file nor a backbone of the "
                     f"protein world (known: {known})")


class ProteinGold:
    """The protein world's evaluator: the evaluation oracle (which no reward uses) and native sequence recovery.

    ``gold(outputs, conditions) -> {name: [B] float}`` for outputs [B, L] ids (or [B, L, 20] one-hots, read by
    argmax) in PROTEIN_ALPHABET order, whose condition texts name each sample's backbone (a world backbone name or
    a PDB path); a sample padded past its backbone's length is read up to that length.

    * "stability": the evaluation oracle's predicted FoldX stability (higher = more stable);
    * "recovery": the fraction of positions equal to the backbone's native residue;
    * "more_stable_than_native": 1 where the evaluation oracle scores the sample above the native sequence of
      its backbone (the oracle's own score of the native, so both sides carry the same oracle error).

    Args:
        world: a built protein world folder (default: the committed one).
    """

    def __init__(self, world: str | Path = DEFAULT_WORLD) -> None:
        from rewards.sequence import SequenceOracle

        self.world = ProteinWorld(world)
        self.oracle = SequenceOracle.load(self.world.eval_oracle_dir).requires_grad_(False)
        self._natives: dict[str, tuple[torch.Tensor, float]] = {}

    def _native(self, text: str) -> tuple[torch.Tensor, float]:
        """(native ids [L], the evaluation oracle's score of the native) of the backbone `text` names."""
        if text not in self._natives:
            if text in self.world.natives:
                sequence = self.world.natives[text]
            else:
                sequence = parse_backbone(resolve_backbone(text, self.world.folder)).sequence
            ids = torch.tensor([PROTEIN_ALPHABET.find(c) for c in sequence])  # −1 (never matched) for 'X'
            with torch.no_grad():
                score = float(self.oracle(ids.clamp(min=0)[None])[0]) if (ids >= 0).all() else float("nan")
            self._natives[text] = (ids, score)
        return self._natives[text]

    @torch.no_grad()
    def __call__(self, outputs: torch.Tensor, conditions=None) -> dict[str, torch.Tensor]:
        texts = getattr(conditions, "texts", conditions)
        if texts is None or isinstance(texts, str) or len(texts) != len(outputs):
            raise ValueError("ProteinGold needs one condition text per sample naming its backbone (e.g. '2vad_A')")
        ids = (outputs.argmax(-1) if outputs.is_floating_point() else outputs).detach().cpu().long()
        B = ids.shape[0]
        stability, recovery, better = torch.zeros(B), torch.zeros(B), torch.zeros(B)
        for text in dict.fromkeys(texts):
            rows = [b for b, t in enumerate(texts) if t == text]
            native, native_score = self._native(text)
            n = len(native)
            if ids.shape[1] < n:
                raise ValueError(f"samples for backbone {text!r} have length {ids.shape[1]}, shorter than its "
                                 f"{n} residues")
            designed = ids[rows, :n]
            scores = self.oracle(designed).float()
            stability[rows] = scores
            recovery[rows] = (designed == native).float().mean(-1)
            better[rows] = (scores > native_score).float()
        return {"stability": stability, "recovery": recovery, "more_stable_than_native": better}
