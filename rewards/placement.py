"""Where and in how large batches a reward runs: its model on a device of its own, and calls of bounded size.

A heavy reward model (a CLIP-H, an aesthetic head on it, a protein oracle) can leave the generator's device to
the generator: `Placed(reward, device="cuda:1")` moves each batch of outputs there, scores it, and returns the
rewards on the outputs' device (through `.to`, so a differentiable reward's gradient flows back across
devices). `batch_size` bounds a call, so that scoring an epoch's samples fits the reward model's memory. From a
config: `reward.device` and `reward.batch_size` (`genalign.engine.RewardConfig`).

Only instance rewards are placed: a distributional reward scores the set it is given (batches would score other
sets), and the pipelines that use one reach for its embeddings and set scores directly, which a wrapper would
hide; its embedder runs on the device of the samples it embeds.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .base import Reward, RewardError, RewardOutput
from .compose import _Wrapper


class Placed(_Wrapper):
    """`reward` scored on `device` (None: the outputs' own) in calls of at most `batch_size` samples (None: one
    call); the rewards come back on the outputs' device. Shapes, kind and objectives are the wrapped reward's."""

    name = "placed"

    def __init__(self, reward: Reward | Mapping[str, Any], device: str | torch.device | None = None,
                 batch_size: int | None = None) -> None:
        super().__init__(reward)
        if batch_size is not None and batch_size < 1:
            raise RewardError(f"reward batch_size must be ≥ 1, got {batch_size}")
        if self.inner.kind != "instance":
            raise RewardError(
                f"reward '{self.inner.name}' scores a set ({self.inner.kind}): batches would score other sets, and "
                "it embeds on the samples' device; remove reward.device and reward.batch_size")
        self.name = self.inner.name
        self.target = None if device is None else torch.device(device)
        self.batch_size = batch_size
        if self.target is not None:
            self.inner.to(self.target)

    def score(self, outputs: torch.Tensor, conditions) -> torch.Tensor | RewardOutput:
        target = self.target or outputs.device
        size = self.batch_size or len(outputs)
        parts = []
        for start in range(0, len(outputs), size):
            chunk = outputs[start : start + size].to(target)
            result = self.inner(chunk, None if conditions is None else conditions[start : start + size])
            if size >= len(outputs):  # one call: the wrapped reward's metadata is about this very batch
                return RewardOutput(result.rewards.to(outputs.device), result.metadata)
            parts.append(result.rewards.to(outputs.device))
        return torch.cat(parts)

    def extra_repr(self) -> str:
        return f"device={self.target}, batch_size={self.batch_size}"
