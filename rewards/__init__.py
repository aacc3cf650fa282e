"""Reward functions for genalign: a shared contract plus a registry.

Usage::

    from rewards import build_reward
    reward = build_reward("jpeg_incompressibility", quality=95)
    reward(images).rewards          # images: [B, 3, H, W] in [0, 1] -> [B]
"""

from .base import (
    REWARDS,
    Reward,
    RewardError,
    RewardOutput,
    available_rewards,
    build_reward,
    register_reward,
)

# Imported for their side effect: registering the built-in rewards.
from . import audio, audio_aesthetic, clip_rewards, compose, controllability, distribution, embedders, ensemble, image, sequence, text  # noqa: E402,F401

__all__ = [
    "REWARDS",
    "Reward",
    "RewardError",
    "RewardOutput",
    "available_rewards",
    "build_reward",
    "register_reward",
]
