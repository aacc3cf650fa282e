"""Build the offline worlds from their seeded recipes.

    python scripts/build_worlds.py shapes                       # the full shapes world -> runs/worlds/shapes
    python scripts/build_worlds.py shapes --recipe tiny --out /tmp/shapes-tiny
    python scripts/build_worlds.py shapes --stages t2i,report --force   # redo two stages
    python scripts/build_worlds.py shapes --out genalign/worlds/assets/shapes   # refresh the committed copy
    python scripts/build_worlds.py shapes-prompts --out configs/prompts   # shapes_train.txt, shapes_eval.txt
    python scripts/build_worlds.py markov --out genalign/worlds/assets/markov   # grammar + masked model (~2 min)
    python scripts/build_worlds.py dna --out genalign/worlds/assets/dna   # data, masked model, oracles (~10 min)
    python scripts/build_worlds.py dna --recipe tiny --out /tmp/dna-tiny    # the same recipe in seconds
    python scripts/build_worlds.py protein --out genalign/worlds/assets/protein  # RFP data + 2 oracles (~3 min)
    python scripts/build_worlds.py protein --source /path/to/rfp --out genalign/worlds/assets/protein  # re-import
    python scripts/build_worlds.py tones --out genalign/worlds/assets/tones   # CLAP, gold, exemplars, VAE, T2A
    python scripts/build_worlds.py tones --recipe tiny --out /tmp/tones-tiny   # the same recipe in seconds
    python scripts/build_worlds.py tones-prompts --out configs/prompts    # tones_train.txt, tones_eval.txt

An interrupted build resumes at its first unfinished stage when run again with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genalign.worlds.build_dna import RECIPES as DNA_RECIPES, build_dna_world  # noqa: E402
from genalign.worlds.build_markov import RECIPES as MARKOV_RECIPES, build_markov_world  # noqa: E402
from genalign.worlds.build_protein import RECIPES as PROTEIN_RECIPES, build_protein_world  # noqa: E402
from genalign.worlds.build_shapes import RECIPES, STAGES, build_shapes_world, shapes_prompts  # noqa: E402
from genalign.worlds.build_tones import RECIPES as TONES_RECIPES, STAGES as TONES_STAGES  # noqa: E402
from genalign.worlds.build_tones import build_tones_world  # noqa: E402

# Training captions for the shapes pipelines and held-out captions disjoint from them.
TRAIN_PROMPTS, EVAL_PROMPTS = 2000, 256
TONES_TRAIN_PROMPTS, TONES_EVAL_PROMPTS = 400, 32


def write_shapes_prompts(folder: Path) -> None:
    train = shapes_prompts(TRAIN_PROMPTS, seed=100)
    held_out = shapes_prompts(EVAL_PROMPTS, seed=200, exclude=train)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shapes_train.txt").write_text("\n".join(train) + "\n")
    (folder / "shapes_eval.txt").write_text("\n".join(held_out) + "\n")
    print(f"wrote {len(train)} training and {len(held_out)} held-out captions to {folder}")


def write_tones_prompts(folder: Path) -> None:
    from genalign.worlds.tones import tones_prompts

    train = tones_prompts(TONES_TRAIN_PROMPTS, seed=100)
    held_out = tones_prompts(TONES_EVAL_PROMPTS, seed=200, exclude=train)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tones_train.txt").write_text("\n".join(train) + "\n")
    (folder / "tones_eval.txt").write_text("\n".join(held_out) + "\n")
    print(f"wrote {len(train)} training and {len(held_out)} held-out tones captions to {folder}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("world", choices=["shapes", "shapes-prompts", "markov", "protein", "dna", "tones", "tones-prompts"], help="what to build")
    parser.add_argument("--out", default=None, help="world folder (default: runs/worlds/<world>)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="full")
    parser.add_argument("--stages", default=None,
                        help=f"comma-separated subset of {','.join(STAGES)} (tones: {','.join(TONES_STAGES)})")
    parser.add_argument("--force", action="store_true", help="rebuild the chosen stages even if finished")
    parser.add_argument("--source", default=None,
                        help="protein: raw RFP data folder or a protein world (default: the committed world)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; dna: 1 per process)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.world == "shapes-prompts":
        write_shapes_prompts(Path(args.out or "configs/prompts"))
        return 0
    if args.world == "tones-prompts":
        write_tones_prompts(Path(args.out or "configs/prompts"))
        return 0
    out = Path(args.out or f"runs/worlds/{args.world}")
    start = time.perf_counter()
    if args.world == "markov":
        world = build_markov_world(out, MARKOV_RECIPES[args.recipe])
        print(json.dumps(world["report"], indent=2))
        print(f"world: {out.resolve()} ({time.perf_counter() - start:.0f} s)")
        return 0
    if args.world == "dna":
        world = build_dna_world(out, DNA_RECIPES[args.recipe], threads=args.threads or 1)
        print(json.dumps(world["report"], indent=2))
        print(f"world: {out.resolve()} ({time.perf_counter() - start:.0f} s)")
        return 0
    if args.world == "protein":
        world = build_protein_world(out, PROTEIN_RECIPES[args.recipe], source=args.source)
        print(json.dumps(world["report"], indent=2))
        print(f"world: {out.resolve()} ({time.perf_counter() - start:.0f} s)")
        return 0
    stages = args.stages.split(",") if args.stages else None
    if args.world == "tones":
        world = build_tones_world(out, TONES_RECIPES[args.recipe], stages=stages, force=args.force)
        print(json.dumps(world["stages"].get("report", {}), indent=2))
        print(f"world: {out.resolve()} ({time.perf_counter() - start:.0f} s)")
        return 0
    world = build_shapes_world(out, RECIPES[args.recipe], stages=stages, force=args.force)
    print(json.dumps(world["stages"].get("report", {}), indent=2))
    print(f"world: {out.resolve()} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
