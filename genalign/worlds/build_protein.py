"""Build the protein world (see `genalign.worlds.protein`) from one seeded recipe (2.6 CPU-minutes).

    build_protein_world("runs/worlds/protein")                                   # from the committed world's data
    build_protein_world("genalign/worlds/assets/protein", source="/path/to/rfp")  # import the raw RFP folder

Steps: copy the data (the six PDB files stripped to the ATOM lines of their backbone atoms, first model and
first alternate location only; the 1,563 labelled sequences as one CSV), read each backbone's native sequence,
split the labelled sequences at random into three disjoint parts (reward / eval / test), train one
`SequenceOracle` of FoldX stability on the reward part (the fine-tuning reward) and one on the eval part (the
evaluation oracle), and report how well each predicts the part it never saw.

Why FoldX is the label: it is an absolute stability (the negative FoldX energy of the modelled structure), so
it compares sequences of different backbones; the RaSP column behaves as a change from each family's parent
(about 0 at every native, similar spread in every family), so it cannot rank sequences across backbones. Its
sign agrees with FoldX (higher = more stable): within each family the two correlate positively.

Honest reading of the oracles: FoldX differs strongly between the RFP families (family means from ~27 to ~70),
so much of an oracle's Spearman over all sequences comes from telling families apart; the report also gives the
mean Spearman within families, which is what ranking designs for one backbone needs. The labelled sequences are
near-native mutants (at most a dozen mutations), while ProteinMPNN designs differ from the native at ~half of
the positions, so oracle scores of designs are extrapolations; comparing the two oracles on designs (the
reward one is what fine-tuning optimises, the eval one judges) is the world's guard against reward hacking.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from genalign.generators.proteinmpnn import BACKBONE_ATOMS, encode_protein, parse_backbone
from genalign.worlds import WORLD_FILE
from genalign.worlds.protein import (BACKBONE_DIR, DATA_FILE, DEFAULT_WORLD, EVAL_ORACLE_DIR, REWARD_ORACLE_DIR,
                                     read_sequences)
from rewards.sequence import SequenceOracle

BACKBONE_NAMES = ("2vad_A", "2vae_D", "3e5v_A", "3ned_A", "5lk4_A", "6aa7_A")
SPLITS = ("reward", "eval", "test")


@dataclass(frozen=True)
class ProteinRecipe:
    """Every number the build depends on. `full` is the committed world; `tiny` the test-sized one.

    Attributes:
        seed: seeds the split and both oracles' training (the eval oracle uses seed + 1).
        test_fraction: share of the labelled sequences held out from both oracles (for reporting).
        max_sequences: use only this many labelled sequences (a seeded subset; None = all).
        hidden, layers, kernel_size, dropout: the `SequenceOracle` architecture.
        epochs, batch_size, lr, weight_decay: AdamW training on standardised FoldX.
    """

    seed: int = 0
    test_fraction: float = 0.2
    max_sequences: int | None = None
    hidden: int = 32
    layers: int = 3
    kernel_size: int = 9
    dropout: float = 0.1
    epochs: int = 60
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-2


RECIPES: dict[str, ProteinRecipe] = {
    "full": ProteinRecipe(),
    "tiny": ProteinRecipe(max_sequences=160, hidden=8, layers=2, epochs=2),
}


# ----------------------------------------------------------------------------------- data import


def strip_pdb(source: Path, target: Path) -> None:
    """Write the backbone-atom ATOM lines (N, CA, C, O; selenomethionine HETATM lines as well) of `source`'s first
    model into `target`, keeping only the first alternate location of each atom."""
    seen, lines = set(), [f"REMARK   1 {source.stem.upper()}: BACKBONE ATOMS (N, CA, C, O) OF THE ORIGINAL PDB ENTRY\n"]
    for line in source.read_text(errors="ignore").splitlines():
        if line.startswith("ENDMDL"):
            break
        record = line[:6]
        if not (record == "ATOM  " or (record == "HETATM" and line[17:20] == "MSE")):
            continue
        key = (line[21], line[22:27], line[12:16].strip())
        if key[2] in BACKBONE_ATOMS and key not in seen:
            seen.add(key)
            lines.append(line.rstrip() + "\n")
    target.write_text("".join(lines) + "END\n")


def _read_labelled(source: Path) -> tuple[list[str], list[float], list[float]]:
    """(sequences, FoldX, RaSP) from a raw RFP folder or an existing world's CSV."""
    if (source / DATA_FILE).is_file():
        with (source / DATA_FILE).open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        return [r["sequence"] for r in rows], [float(r["foldx"]) for r in rows], [float(r["rasp"]) for r in rows]
    files = [source / f for f in ("rfp_sequences.txt", "rfp_foldx_scores.txt", "rfp_rasp_scores.txt")]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{source} holds neither a protein world ({DATA_FILE}) nor the raw RFP files "
                                f"(missing {', '.join(missing)})")
    sequences = read_sequences(files[0])
    foldx = [float(v) for v in files[1].read_text().split()]
    rasp = [float(v) for v in files[2].read_text().split()]
    if not len(sequences) == len(foldx) == len(rasp):
        raise ValueError(f"{source}: {len(sequences)} sequences but {len(foldx)} FoldX and {len(rasp)} RaSP scores")
    return sequences, foldx, rasp


def _pdb_source(source: Path, name: str) -> Path:
    for candidate in (source / BACKBONE_DIR / f"{name}.pdb", source / f"{name}.pdb"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {name}.pdb in {source} (nor in {source / BACKBONE_DIR})")


# ----------------------------------------------------------------------------------- oracles


def train_stability_oracle(sequences: list[str], targets: list[float], recipe: ProteinRecipe, seed: int,
                           progress: bool = False) -> tuple[SequenceOracle, list[float]]:
    """A `SequenceOracle` over the 20 amino acids fit by MSE to standardised `targets`. Sequences may differ in
    length (the oracle mean-pools over positions): each batch is drawn from one length. Returns the oracle (eval
    mode) and the mean training loss of each epoch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        oracle = SequenceOracle(20, hidden=recipe.hidden, layers=recipe.layers, kernel_size=recipe.kernel_size,
                                dropout=recipe.dropout)
        y = torch.tensor(targets, dtype=torch.float32)
        oracle.target_mean.fill_(float(y.mean()))
        oracle.target_std.fill_(float(y.std(correction=0).clamp_min(1e-8)))
        y = (y - oracle.target_mean) / oracle.target_std
        by_length: dict[int, list[int]] = {}
        for index, sequence in enumerate(sequences):
            by_length.setdefault(len(sequence), []).append(index)
        ids = {n: torch.tensor([encode_protein(sequences[i]) for i in rows]) for n, rows in by_length.items()}
        optimizer = torch.optim.AdamW(oracle.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        losses = []
        epochs = range(recipe.epochs)
        if progress:
            from tqdm.auto import tqdm

            epochs = tqdm(epochs, desc="stability oracle", leave=False)
        for _ in epochs:
            oracle.train()
            batches = []
            for n, rows in by_length.items():
                order = torch.randperm(len(rows), generator=generator)
                batches += [(n, order[start : start + recipe.batch_size])
                            for start in range(0, len(rows), recipe.batch_size)]
            total, count = 0.0, 0
            for b in torch.randperm(len(batches), generator=generator).tolist():
                n, local = batches[b]
                target = y[torch.tensor(by_length[n])[local]]
                loss = F.mse_loss(oracle.forward_normalized(ids[n][local]).squeeze(-1), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + loss.item() * len(local), count + len(local)
            losses.append(total / count)
    return oracle.eval(), losses


@torch.no_grad()
def predict(oracle: SequenceOracle, sequences: list[str]) -> torch.Tensor:
    """Oracle predictions [N] for amino-acid strings of any lengths (batched per length)."""
    out = torch.zeros(len(sequences))
    by_length: dict[int, list[int]] = {}
    for index, sequence in enumerate(sequences):
        by_length.setdefault(len(sequence), []).append(index)
    for rows in by_length.values():
        for start in range(0, len(rows), 256):
            chunk = rows[start : start + 256]
            out[chunk] = oracle(torch.tensor([encode_protein(sequences[i]) for i in chunk])).float()
    return out


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    if len(a) < 3:
        return float("nan")
    rank = lambda t: t.argsort().argsort().double()  # noqa: E731 (labels here have no ties that matter)
    return float(torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1])


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1]) if len(a) > 2 else float("nan")


def family_of(sequence: str, natives: dict[str, str], max_distance: int = 40) -> str | None:
    """The backbone whose native sequence is nearest to `sequence` (same length, Hamming ≤ max_distance), if any."""
    best, best_distance = None, max_distance + 1
    for name, native in natives.items():
        if len(native) == len(sequence):
            distance = sum(a != b for a, b in zip(native, sequence))
            if distance < best_distance:
                best, best_distance = name, distance
    return best


def _scores(pred: torch.Tensor, truth: torch.Tensor, families: list[str | None]) -> dict:
    within = {}
    for family in sorted({f for f in families if f is not None}):
        rows = [i for i, f in enumerate(families) if f == family]
        if len(rows) >= 10:
            within[family] = round(_spearman(pred[rows], truth[rows]), 4)
    return {"n": len(pred), "spearman": round(_spearman(pred, truth), 4), "pearson": round(_pearson(pred, truth), 4),
            "spearman_within_family": within,
            "spearman_within_family_mean": round(sum(within.values()) / len(within), 4) if within else None}


# ----------------------------------------------------------------------------------- the build


def build_protein_world(folder: str | os.PathLike, recipe: ProteinRecipe = RECIPES["full"], *,
                        source: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Build the world into `folder` (replacing it, also when it is the source); returns world.json's content.

    Args:
        source: a raw RFP folder (rfp_sequences.txt, rfp_foldx_scores.txt, rfp_rasp_scores.txt and the six PDB
            files) or a built protein world (default: the committed one, genalign/worlds/assets/protein).
    """
    folder = Path(folder)
    source = Path(source) if source is not None else DEFAULT_WORLD
    tmp = folder.with_name(f".tmp_{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / BACKBONE_DIR).mkdir(parents=True)
    (tmp / DATA_FILE).parent.mkdir(parents=True)

    backbones, natives = {}, {}
    for name in BACKBONE_NAMES:
        pdb = tmp / BACKBONE_DIR / f"{name}.pdb"
        strip_pdb(_pdb_source(source, name), pdb)
        structure = parse_backbone(pdb)
        natives[name] = structure.sequence
        backbones[name] = {"pdb": f"{BACKBONE_DIR}/{name}.pdb", "native": structure.sequence,
                           "length": len(structure), "chain": structure.chain, "dropped": structure.dropped}

    sequences, foldx, rasp = _read_labelled(source)
    for i, sequence in enumerate(sequences):
        encode_protein(sequence, where=f"labelled sequence {i + 1}")
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
    if recipe.max_sequences is not None:
        order = order[: recipe.max_sequences]
    # The natives (when labelled) go to the test split: neither oracle sees them, so both score them unseen.
    is_native = set(natives.values())
    order = [i for i in order if sequences[i] in is_native] + [i for i in order if sequences[i] not in is_native]
    n_test = round(len(order) * recipe.test_fraction)
    n_reward = (len(order) - n_test) // 2
    split = {}
    for rank, index in enumerate(order):
        split[index] = "test" if rank < n_test else ("reward" if rank < n_test + n_reward else "eval")
    with (tmp / DATA_FILE).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sequence", "foldx", "rasp", "split"])
        for i, sequence in enumerate(sequences):
            writer.writerow([sequence, repr(foldx[i]), repr(rasp[i]), split.get(i, "unused")])

    rows = {name: [i for i in order if split[i] == name] for name in SPLITS}
    families = [family_of(s, natives) for s in sequences]
    for name in BACKBONE_NAMES:
        backbones[name]["labelled_family_size"] = sum(f == name for f in families)
    truth = torch.tensor(foldx)
    oracles, losses = {}, {}
    for offset, (split_name, directory) in enumerate((("reward", REWARD_ORACLE_DIR), ("eval", EVAL_ORACLE_DIR))):
        oracle, history = train_stability_oracle([sequences[i] for i in rows[split_name]],
                                                 [foldx[i] for i in rows[split_name]], recipe, recipe.seed + offset,
                                                 progress)
        oracle.save(tmp / directory)
        oracles[split_name], losses[split_name] = oracle, history

    report: dict = {"label": "foldx", "split_sizes": {name: len(r) for name, r in rows.items()}}
    for split_name, oracle in oracles.items():
        other = "eval" if split_name == "reward" else "reward"
        entry = {"train_loss_first_last": [round(losses[split_name][0], 4), round(losses[split_name][-1], 4)]}
        for target in ("test", other, split_name):
            index = rows[target]
            entry[f"on_{target}" if target != split_name else "on_own_training_split"] = _scores(
                predict(oracle, [sequences[i] for i in index]), truth[index], [families[i] for i in index])
        report[f"oracle_{split_name}"] = entry
    test = rows["test"]
    both = torch.stack([predict(oracles["reward"], [sequences[i] for i in test]),
                        predict(oracles["eval"], [sequences[i] for i in test])])
    report["oracles_agree_on_test_spearman"] = round(_spearman(both[0], both[1]), 4)
    report["rasp_vs_foldx"] = _scores(torch.tensor(rasp), truth, families)
    report["natives"] = {}
    for name, native in natives.items():
        labelled = [i for i, s in enumerate(sequences) if s == native]
        report["natives"][name] = {
            "foldx_label": foldx[labelled[0]] if labelled else None,
            "split": split.get(labelled[0], "unused") if labelled else None,
            "oracle_reward": round(float(predict(oracles["reward"], [native])[0]), 3),
            "oracle_eval": round(float(predict(oracles["eval"], [native])[0]), 3),
        }
    world = {"format": "genalign.ProteinWorld", "version": 1, "label": "foldx", "recipe": asdict(recipe),
             "backbones": backbones, "report": report}
    (tmp / WORLD_FILE).write_text(json.dumps(_finite(world), indent=2, allow_nan=False) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return world


def _finite(value):
    """NaN (an undefined correlation, e.g. of a constant prediction) → None, recursively, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
