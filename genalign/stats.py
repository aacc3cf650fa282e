"""Per-prompt reward statistics for advantage normalisation (DDPO and friends)."""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np


class PerPromptStatTracker:
    """Normalises rewards by a running mean/std kept separately for each prompt.

    A prompt's statistics come from its last `buffer_size` rewards; until it has `min_count` of them, the
    batch's global mean/std are used instead, so early advantages are not built from two samples.
    Call `update` with the whole (gathered, globally ordered) batch on every process so all agree.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError("buffer_size and min_count must be ≥ 1")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: np.ndarray) -> tuple[np.ndarray, float]:
        """Add the batch, return (advantages [B], fraction of prompts in the batch with zero reward spread)."""
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts but {len(rewards)} rewards")
        advantages = np.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std()
        unique = list(dict.fromkeys(prompts))
        flat = 0
        for prompt in unique:
            members = np.array([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[members].tolist())
            if rewards[members].std() == 0:
                flat += 1
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = np.fromiter(buffer, dtype=np.float64)
                mean, std = values.mean(), values.std()
            advantages[members] = (rewards[members] - mean) / (std + 1e-6)
        return advantages, flat / len(unique)

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {p: list(b) for p, b in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size = state["buffer_size"]
        self.min_count = state["min_count"]
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state["buffers"].items()}
