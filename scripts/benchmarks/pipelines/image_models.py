"""The models the image pipelines' reference loops load: the text-to-image model's diffusers parts and the reward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.pipelines.plain_diffusion import PlainDiffusion


@dataclass
class ImageModels:
    parts: PlainDiffusion
    reward: Any


def load_image_models(config) -> ImageModels:
    """The config's model (with its ControlNet, if any) and reward, freshly loaded."""
    from rewards import build_reward

    parts = PlainDiffusion.load(config.model.pretrained, controlnet=config.model.controlnet)
    return ImageModels(parts, build_reward(config.reward.name, **config.reward.kwargs))
