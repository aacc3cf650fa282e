"""Training data for controllable generation: images with their captions, control images and target conditions.

A control dataset hands out examples by index from a training split and a held-out split. The ControlNet sees
the control image; the reward model's prediction is compared with the target condition (segmentation: class
indices, edges and depth: maps; see `rewards.controllability`). The shapes world renders its examples exactly
(`genalign.worlds.shapes_control.ShapesControlDataset`); `FolderControlDataset` reads a user's folder.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

import numpy as np
import torch

from genalign.generators.base import Conditions
from genalign.generators.controlnet import CONTROL_KEY

Split = Literal["train", "eval"]


@dataclass
class ControlExamples:
    """B examples.

    Attributes:
        samples: [B, 3, H, W] float images in [0, 1] (what the diffusion loss trains toward).
        texts: B captions.
        control: [B, 3, H, W] float in [0, 1], what the ControlNet is conditioned on.
        target: the condition the reward model's prediction is compared with: long [B, H, W] class indices
            (segmentation) or float [B, 1, H, W] maps (edges, depth).
    """

    samples: torch.Tensor
    texts: list[str]
    control: torch.Tensor
    target: torch.Tensor

    def conditions(self) -> Conditions:
        """What a ControlNet generator samples from: the captions with their control images."""
        return Conditions(texts=self.texts, tensors={CONTROL_KEY: self.control})

    def __len__(self) -> int:
        return len(self.texts)


class ControlDataset(Protocol):
    condition: str  # "segmentation", "edges" or "depth" (rewards.controllability.CONDITION_TYPES)

    def size(self, split: Split) -> int: ...

    def examples(self, indices: Sequence[int], split: Split) -> ControlExamples: ...


class FolderControlDataset:
    """A folder with `train.jsonl` and `eval.jsonl`, one example per line:
    {"image": "img/0.png", "control": "ctrl/0.png", "target": "tgt/0.png", "text": "a caption"}
    (paths relative to the folder). Segmentation targets are single-channel PNGs of class indices (255 =
    unlabelled); edge and depth targets are grey PNGs read as [0, 1] maps."""

    def __init__(self, path: str, condition: str) -> None:
        self.root, self.condition = Path(path), condition
        self.rows: dict[str, list[dict[str, str]]] = {}
        for split in ("train", "eval"):
            index = self.root / f"{split}.jsonl"
            if not index.is_file():
                raise FileNotFoundError(f"control dataset '{self.root}' has no {split}.jsonl; write one line per "
                                        'example: {"image": ..., "control": ..., "target": ..., "text": ...}')
            self.rows[split] = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
            for row in self.rows[split]:
                missing = {"image", "control", "target", "text"} - set(row)
                if missing:
                    raise ValueError(f"{index}: an example lacks {sorted(missing)}: {row}")

    def size(self, split: Split) -> int:
        return len(self.rows[split])

    def examples(self, indices: Sequence[int], split: Split) -> ControlExamples:
        from PIL import Image

        def read(name: str, mode: str) -> np.ndarray:
            return np.asarray(Image.open(self.root / name).convert(mode))

        rows = [self.rows[split][int(i)] for i in indices]
        images = torch.stack([torch.from_numpy(read(r["image"], "RGB").copy()).permute(2, 0, 1) for r in rows]) / 255
        control = torch.stack([torch.from_numpy(read(r["control"], "RGB").copy()).permute(2, 0, 1) for r in rows]) / 255
        if self.condition == "segmentation":
            target = torch.stack([torch.from_numpy(read(r["target"], "L").astype(np.int64)) for r in rows])
        else:
            target = torch.stack([torch.from_numpy(read(r["target"], "L").copy())[None] for r in rows]).float() / 255
        return ControlExamples(images.float(), [r["text"] for r in rows], control.float(), target)


# name -> (module, class); imported on use.
CONTROL_DATASETS: dict[str, tuple[str, str]] = {
    "shapes": ("genalign.worlds.shapes_control", "ShapesControlDataset"),
    "folder": ("genalign.control_data", "FolderControlDataset"),
}


def build_control_dataset(name: str, condition: str, **kwargs: Any) -> ControlDataset:
    if name not in CONTROL_DATASETS:
        raise ValueError(f"unknown control dataset {name!r}; known: {sorted(CONTROL_DATASETS)}")
    module, cls = CONTROL_DATASETS[name]
    return getattr(importlib.import_module(module), cls)(condition=condition, **kwargs)
