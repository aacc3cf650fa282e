"""Offline worlds: small data, models and gold evaluators that stand in for the real thing (DESIGN.md).

A gold evaluator judges generated outputs against what their conditions asked for, with a model no reward
uses, so reward hacking shows. It is called as ``gold(outputs, conditions) -> {name: float tensor [B]}``
(per-sample verdicts; pipelines log their means as ``eval_gold_<name>``).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

# Every built world folder describes itself (recipe, measured report, layout) in this file.
WORLD_FILE = "world.json"

# name -> (module, class); imported on use so that `import genalign.worlds` stays light.
GOLD_EVALUATORS: dict[str, tuple[str, str]] = {
    "shapes": ("genalign.worlds.shapes_judge", "ShapesGold"),
    "markov": ("genalign.worlds.markov", "MarkovGold"),
    "protein": ("genalign.worlds.protein", "ProteinGold"),
    "dna": ("genalign.worlds.dna", "DNAGold"),
    "tones": ("genalign.worlds.tones_gold", "TonesGold"),
}


def build_gold(name: str, **kwargs: Any):
    """A gold evaluator by name (see GOLD_EVALUATORS), constructed with ``kwargs``."""
    if name not in GOLD_EVALUATORS:
        raise ValueError(f"unknown gold evaluator {name!r}; known: {sorted(GOLD_EVALUATORS)}")
    module, cls = GOLD_EVALUATORS[name]
    return getattr(importlib.import_module(module), cls)(**kwargs)


def read_partial_world(folder: str | Path) -> dict:
    """The world.json of a world folder being built, or {} before its first stage."""
    path = Path(folder) / WORLD_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_world_file(folder: str | Path, data: dict) -> None:
    """Write world.json atomically (an interrupted build never leaves half a file)."""
    tmp = Path(folder) / f".{WORLD_FILE}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, Path(folder) / WORLD_FILE)


def read_world_file(folder: str | Path, world: str) -> dict:
    """The parsed world.json of a built `world` folder ("dna", "protein", …), or one error saying how to build it."""
    path = Path(folder) / WORLD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {world} world at '{folder}' (missing {WORLD_FILE}); build one with "
                                f"`python scripts/build_worlds.py {world}`, or use genalign/worlds/assets/{world}")
    return json.loads(path.read_text())
