"""DRaFT / AlignProp — fine-tuning by backpropagating a differentiable reward through sampling (spec 00).

Each step samples a batch with gradients through the last K denoiser calls only (DRaFT-K; AlignProp draws
K at random per batch), decodes, scores with a differentiable reward and minimises −reward. DRaFT-LV
replaces the tracked steps by `lv_rounds` re-noise/denoise rounds at the last timestep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from genalign.config import ConfigError, NonNegativeInt, PositiveInt
from genalign.engine import (
    DiffusionPipeline,
    DiffusionPipelineConfig,
    RewardConfig,
    SamplingConfig,
    on_every_process,
    reward_metrics,
    total_reward,
)
from genalign.generators.diffusion import DiffusionGenerator
from genalign.trainer import launched_processes


def _default_reward() -> RewardConfig:
    return RewardConfig(name="colorfulness")


def _default_sampling() -> SamplingConfig:
    return SamplingConfig(eta=0.0)


@dataclass
class DRaFTConfig(DiffusionPipelineConfig):
    pipeline: Literal["draft"] = "draft"
    reward: RewardConfig = field(default_factory=_default_reward)
    sampling: SamplingConfig = field(default_factory=_default_sampling)
    batch_size: PositiveInt = 8
    train_batch_size: PositiveInt = 4
    grad_steps: PositiveInt = 1
    random_truncation: bool = False
    min_grad_steps: PositiveInt = 1
    lv_rounds: NonNegativeInt = 0
    checkpoint_denoiser: bool = True


def truncation_steps(config: DRaFTConfig, seed: int, epoch: int) -> int:
    """K for this epoch: fixed (DRaFT-K) or uniform in [min_grad_steps, grad_steps] (AlignProp)."""
    if not config.random_truncation:
        return config.grad_steps
    return int(np.random.default_rng([seed, epoch, 7]).integers(config.min_grad_steps, config.grad_steps + 1))


class DRaFTPipeline(DiffusionPipeline):
    """DRaFT-K, AlignProp (random truncation) and DRaFT-LV on a `DiffusionGenerator`."""

    config_class = DRaFTConfig

    def __init__(self, config: DRaFTConfig, generator: DiffusionGenerator | None = None, reward=None) -> None:
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
        world = launched_processes()
        if c.batch_size % (world * c.train_batch_size):
            raise ConfigError(
                f"batch_size={c.batch_size} must be a multiple of processes ({world}) × "
                f"train_batch_size ({c.train_batch_size})"
            )
        micro_batches = c.batch_size // world // c.train_batch_size
        trainer, start, _ = self.start_training(accumulation_steps=micro_batches, total_updates=c.epochs)
        options = c.sampling.options()
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
                            [self.prompts[plan.prompt_index[i]] for i in chunk],
                            options,
                            grad_steps=k,
                            seeds=plan.seeds[chunk].tolist(),
                            checkpoint=c.checkpoint_denoiser,
                            lv_rounds=c.lv_rounds,
                        )
                        scores = on_every_process(trainer, lambda: self.reward(rollout.images, rollout.prompts).rewards)
                    trainer.backward(-total_reward(scores).mean())
                    trainer.optimizer_step()
                rewards.append(scores.detach().float())
            last = {
                **reward_metrics(trainer.gather(torch.cat(rewards)), self.reward.objectives),
                "grad_steps": float(k),
                "grad_norm": trainer.last_grad_norm,
                "lr": trainer.learning_rate,
                "samples_per_s": c.batch_size / (time.time() - tic),
            }
            if (epoch + 1) % c.eval.every == 0 or epoch + 1 == c.epochs:
                last.update(self.evaluate(trainer))
            trainer.log(last, step=epoch)
            trainer.maybe_checkpoint(epoch, c.epochs, {})
        return last
