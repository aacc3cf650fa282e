"""Offline worlds: small data, models and gold evaluators that stand in for the real thing (DESIGN.md).

A gold evaluator judges generated outputs against what their conditions asked for, with a model no reward
uses, so reward hacking shows. It is called as ``gold(outputs, conditions) -> {name: float tensor [B]}``
(per-sample verdicts; pipelines log their means as ``eval_gold_<name>``).
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, class); imported on use so that `import genalign.worlds` stays light.
GOLD_EVALUATORS: dict[str, tuple[str, str]] = {
    "shapes": ("genalign.worlds.shapes_judge", "ShapesGold"),
    "markov": ("genalign.worlds.markov", "MarkovGold"),
    "protein": ("genalign.worlds.protein", "ProteinGold"),
    "dna": ("genalign.worlds.dna", "DNAGold"),
}


def build_gold(name: str, **kwargs: Any):
    """A gold evaluator by name (see GOLD_EVALUATORS), constructed with ``kwargs``."""
    if name not in GOLD_EVALUATORS:
        raise ValueError(f"unknown gold evaluator {name!r}; known: {sorted(GOLD_EVALUATORS)}")
    module, cls = GOLD_EVALUATORS[name]
    return getattr(importlib.import_module(module), cls)(**kwargs)
