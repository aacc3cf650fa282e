"""DRaFT / AlignProp — fine-tuning by backpropagating a differentiable reward through sampling (spec 00).

Each step samples a batch with gradients through the last K sampling steps only (DRaFT-K; AlignProp draws
K at random per batch), scores it with a differentiable reward and minimises −reward. DRaFT-LV replaces the
tracked steps by `lv_rounds` re-noise/denoise rounds at the last timestep; `checkpoint_steps` wraps each
tracked step in activation checkpointing (both are options of the diffusion family's differentiable sampler).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from genalign.config import ConfigError, NonNegativeInt, PositiveInt
from genalign.engine import (Pipeline, PipelineConfig, RewardConfig, on_every_process, reward_metrics, split_batch,
    total_reward)
from genalign.generators.base import Generator
from genalign.trainer import launched_processes


@dataclass
class DRaFTConfig(PipelineConfig):
    pipeline: Literal["draft"] = "draft"
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(name="colorfulness"))
    batch_size: PositiveInt = 8
    train_batch_size: PositiveInt = 4
    grad_steps: PositiveInt = 1
    random_truncation: bool = False
    min_grad_steps: PositiveInt = 1
    lv_rounds: NonNegativeInt = 0
    checkpoint_steps: bool = True


def truncation_steps(config: DRaFTConfig, seed: int, epoch: int) -> int:
    """K for this epoch: fixed (DRaFT-K) or uniform in [min_grad_steps, grad_steps] (AlignProp)."""
    if not config.random_truncation:
        return config.grad_steps
    return int(np.random.default_rng([seed, epoch, 7]).integers(config.min_grad_steps, config.grad_steps + 1))


class DRaFTPipeline(Pipeline):
    """DRaFT-K, AlignProp (random truncation) and DRaFT-LV on a generator with a differentiable sampler."""

    config_class = DRaFTConfig
    sharding_strategies = ("fsdp", "deepspeed")

    def __init__(self, config: DRaFTConfig, generator: Generator | None = None, reward=None) -> None:
        super().__init__(config, generator, reward)
        if not self.reward.differentiable:
            raise ConfigError(
                f"DRaFT backpropagates through the reward, but '{self.reward.name}' is not differentiable; "
                "use a differentiable reward (e.g. reward.name=colorfulness) or the DDPO pipeline"
            )
        if config.lv_rounds and config.grad_steps != 1:
            raise ConfigError("DRaFT-LV (lv_rounds > 0) differentiates only the last step: set grad_steps=1")
        if not 1 <= config.min_grad_steps <= config.grad_steps <= config.sampling.num_inference_steps:
            raise ConfigError("need 1 ≤ min_grad_steps ≤ grad_steps ≤ sampling.num_inference_steps")

    def train(self) -> dict[str, float]:
        c = self.config
        _, micro_batches = split_batch(c.batch_size, launched_processes(), c.train_batch_size,
                                       names=("samples per epoch (batch_size)", "train_batch_size"))
        trainer, start, _ = self.start_training(accumulation_steps=micro_batches, total_updates=c.epochs)
        last: dict[str, float] = {}
        for epoch in trainer.epochs(start, c.epochs):
            tic = time.time()
            plan = self.epoch_plan(trainer, epoch, c.batch_size, samples_per_prompt=1)
            k = truncation_steps(c, c.trainer.seed, epoch)
            rewards = []
            for start_pos in range(0, len(plan.local), c.train_batch_size):
                chunk = plan.local[start_pos : start_pos + c.train_batch_size]
                with trainer.accumulate():
                    with trainer.autocast():
                        rollout = self.generator.sample_differentiable(
                            self.conditions(plan, chunk),
                            self.options,
                            grad_steps=k,
                            seeds=plan.seeds[chunk].tolist(),
                            checkpoint=c.checkpoint_steps,
                            lv_rounds=c.lv_rounds,
                        )
                        scores = on_every_process(trainer, lambda: self.reward(rollout.outputs, rollout.texts).rewards)
                    trainer.backward(-total_reward(scores).mean())
                    trainer.optimizer_step()
                rewards.append(scores.detach().float())
            gathered = trainer.gather(torch.cat(rewards))  # mean and spread only: no order needed
            metrics = {**reward_metrics(gathered, self.reward.objectives), "grad_steps": float(k)}
            last = self.finish_epoch(trainer, epoch, metrics, {}, tic, c.batch_size)
        return last
