"""Saving and loading a world's aesthetic head (the LAION improved-aesthetic-predictor layout) together with the
rule and the vocabularies it was fitted to, so that a head from another rule or world is refused instead of
scoring confidently and wrongly. The shapes and tones worlds each define their rule and call these."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from rewards.clip_rewards import CLIP_AESTHETIC_HEAD_FILENAME, AestheticHead

CONFIG_FILE = "aesthetic_head.json"


def save_head(head: AestheticHead, folder: str | os.PathLike, rule: dict[str, Any],
              vocabularies: dict[str, Any]) -> Path:
    """Write ``aesthetic_head.safetensors`` (the LAION head's keys) and ``aesthetic_head.json`` (input width, the
    rule, which must hold its ``name`` and ``version``, and the world's vocabularies) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: value.detach().cpu().contiguous() for name, value in head.state_dict().items()},
              str(folder / CLIP_AESTHETIC_HEAD_FILENAME))
    config = {"in_features": head.in_features, "rule": rule, "vocabularies": vocabularies}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_head(folder: str | os.PathLike, rule_name: str, rule_version: int, vocabularies: dict[str, Any],
              world: str, retrain: str) -> AestheticHead:
    """The head in ``folder`` (on the CPU, in eval mode), refused with a ValueError naming ``retrain`` when it was
    fitted to another rule, version or vocabulary than ``world``'s."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    rule = config["rule"]
    if (rule["name"], rule["version"]) != (rule_name, rule_version) or config["vocabularies"] != vocabularies:
        raise ValueError(
            f"aesthetic head in {folder} was trained on rule {rule['name']} v{rule['version']} of a different "
            f"{world} world; this code scores {rule_name} v{rule_version}: retrain it with {retrain}"
        )
    head = AestheticHead(config["in_features"])
    head.load_state_dict(load_file(str(folder / CLIP_AESTHETIC_HEAD_FILENAME)))
    return head.eval()
