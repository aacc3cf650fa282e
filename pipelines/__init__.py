"""One module per method; each defines a config dataclass and a pipeline class with `train()`."""

from __future__ import annotations

import difflib
import importlib

from genalign.config import ConfigError

PIPELINES: dict[str, str] = {
    "ctrl_u": "pipelines.ctrl_u:CtrlUPipeline",
    "ddpo": "pipelines.ddpo:DDPOPipeline",
    "draft": "pipelines.draft:DRaFTPipeline",
    "dragon": "pipelines.dragon:DRAGONPipeline",
    "drakes": "pipelines.drakes:DRAKESPipeline",
    "gflownet": "pipelines.gflownet:GFlowNetPipeline",
    "parrot": "pipelines.parrot:ParrotPipeline",
    "prdp": "pipelines.prdp:PRDPPipeline",
    "rtb": "pipelines.rtb:RTBPipeline",
}


def get_pipeline(name: str) -> type:
    """The pipeline class registered under `name` (imported on demand)."""
    if name not in PIPELINES:
        close = difflib.get_close_matches(name, list(PIPELINES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown pipeline '{name}'{hint} Available: {', '.join(sorted(PIPELINES))}")
    module, cls = PIPELINES[name].split(":")
    return getattr(importlib.import_module(module), cls)
