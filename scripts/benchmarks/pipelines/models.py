"""The models the reference loops load, freshly from the config's folders (they train them): the text-to-image model's
diffusers parts or the masked-diffusion backbone, and the reward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.pipelines.plain_diffusion import PlainDiffusion
from benchmarks.pipelines.plain_masked import PlainMasked


@dataclass
class ImageModels:
    parts: PlainDiffusion
    reward: Any


@dataclass
class MaskedModels:
    model: PlainMasked
    reward: Any


def _reward(config):
    from rewards import build_reward

    return build_reward(config.reward.name, **config.reward.kwargs)


def load_image_models(config) -> ImageModels:
    """The config's text-to-image model (with its ControlNet, if any) and reward."""
    return ImageModels(PlainDiffusion.load(config.model.pretrained, controlnet=config.model.controlnet),
                       _reward(config))


def load_masked_models(config) -> MaskedModels:
    """The config's masked-diffusion model and reward."""
    return MaskedModels(PlainMasked.load(config.model.pretrained), _reward(config))
