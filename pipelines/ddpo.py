"""DDPO — policy-gradient fine-tuning of a generator's sampling chain (Black et al., 2023; spec 00).

Each epoch: sample conditions × samples with per-step log-probs, score them, turn rewards into per-condition
normalised advantages, then update the model on a fraction of each trajectory's steps with the PPO-clip
loss ("is", importance sampling) or plain REINFORCE ("sf", score function, one step per rollout). Each inner
epoch reshuffles the samples into updates and draws each trajectory's training steps afresh.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from genalign.config import ConfigError, PositiveFloat, PositiveInt
from genalign.engine import (EpochPlan, Pipeline, PipelineConfig, SamplingConfig, gather_trajectory,
    reward_metrics, split_batch, total_reward)
from genalign.generators.base import Generator, Trajectory
from genalign.stats import PerPromptStatTracker
from genalign.trainer import Trainer, launched_processes


@dataclass
class DDPOConfig(PipelineConfig):
    pipeline: Literal["ddpo"] = "ddpo"
    # ε = 1e-4 is calibrated for the per-element (mean) log-ratio, as in the public DDPO code.
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(log_prob_reduction="mean"))
    prompts_per_epoch: PositiveInt = 4
    samples_per_prompt: PositiveInt = 4
    updates_per_epoch: PositiveInt = 1
    inner_epochs: PositiveInt = 1
    train_batch_size: PositiveInt = 4
    timestep_fraction: float = 1.0
    variant: Literal["is", "sf"] = "is"
    clip_range: PositiveFloat = 1e-4
    adv_clip_max: PositiveFloat = 5.0
    stat_buffer_size: PositiveInt = 32
    stat_min_count: PositiveInt = 16


def ddpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    variant: Literal["is", "sf"] = "is",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO loss for one step of a batch of trajectories.

    "is": mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))) with ρ = exp(log π_θ − log π_old).
    "sf": mean(−A·log π_θ).

    Args:
        log_prob, old_log_prob, advantages: [B] (log-probs in float64, so that ρ − 1 ≈ 1e-4 is resolved).
    Returns:
        (scalar loss, stats: ratio mean, largest |ρ − 1|, clip fraction, approx KL ½·mean((log π_θ − log π_old)²)).
    """
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    stats = {
        "ratio": ratio.detach().mean(),
        "ratio_max_deviation": (ratio.detach() - 1).abs().max(),
        "clipfrac": ((ratio.detach() - 1).abs() > clip_range).double().mean(),
        "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
    }
    if variant == "sf":
        return (-advantages * log_prob).mean(), stats
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), stats


class DDPOPipeline(Pipeline):
    """DDPO on any generator with per-step log-probabilities, with any reward from `rewards`."""

    config_class = DDPOConfig
    sharding_strategies = ("fsdp", "deepspeed")

    def __init__(self, config: DDPOConfig, generator: Generator | None = None, reward=None) -> None:
        super().__init__(config, generator, reward)
        self._validate()
        self.tracker = PerPromptStatTracker(config.stat_buffer_size, config.stat_min_count)

    def _validate(self) -> None:
        c = self.config
        if c.variant == "sf" and (c.updates_per_epoch != 1 or c.inner_epochs != 1):
            raise ConfigError("variant 'sf' (REINFORCE) takes one gradient step per rollout: "
                              "set updates_per_epoch=1 and inner_epochs=1")
        if not 0 < c.timestep_fraction <= 1:
            raise ConfigError(f"timestep_fraction must be in (0, 1], got {c.timestep_fraction}")

    def train(self) -> dict[str, float]:
        c = self.config
        stochastic_steps = self.trainable_steps()
        n_train_steps = max(1, round(c.timestep_fraction * len(stochastic_steps)))
        per_update, micro_batches = split_batch(c.prompts_per_epoch * c.samples_per_prompt, launched_processes(),
                                                c.train_batch_size, parts=c.updates_per_epoch)
        trainer, start, state = self.start_training(
            accumulation_steps=micro_batches * n_train_steps,
            total_updates=c.epochs * c.updates_per_epoch * c.inner_epochs,
        )
        if c.variant == "is" and c.sampling.log_prob_reduction == "sum":
            trainer.warn(f"clip_range ε = {c.clip_range:g} is calibrated for sampling.log_prob_reduction=mean; "
                         "with sum the log-ratio is summed over every element of the state, so ρ leaves [1−ε, 1+ε] after "
                         "the smallest update and almost every sample is clipped")
        if "stats" in state:
            self.tracker.load_state_dict(state["stats"])
        last: dict[str, float] = {}
        for epoch in trainer.epochs(start, c.epochs):
            tic = time.time()
            plan = self.epoch_plan(trainer, epoch, c.prompts_per_epoch, c.samples_per_prompt)
            # 1–2. Sample this process's share, score it, gather every process's rewards in global order.
            samples = self.sample_and_score(trainer, plan)
            global_scores = samples.global_scores
            # Normalise per condition on every process alike.
            keys = self.conditions(plan, range(len(plan))).keys
            advantages, flat_fraction = self.tracker.update(keys, total_reward(global_scores).cpu().numpy())
            advantages = torch.as_tensor(
                np.clip(advantages, -c.adv_clip_max, c.adv_clip_max), dtype=torch.float64, device=trainer.device
            )
            if flat_fraction == 1.0:
                trainer.warn(f"epoch {epoch}: every prompt group has zero reward spread; advantages are 0 "
                             "and nothing is learned (is the reward constant?)")
            # 3. Update on a random subset of each trajectory's stochastic steps.
            step_stats = self._update(trainer, samples.rollout.trajectory, plan, advantages, stochastic_steps,
                                      n_train_steps, per_update, epoch)
            metrics = {
                **reward_metrics(global_scores, self.reward.objectives),
                "zero_spread_fraction": flat_fraction,
                **step_stats,
            }
            last = self.finish_epoch(trainer, epoch, metrics, {"stats": self.tracker.state_dict()}, tic, len(plan))
        return last

    def _update(
        self,
        trainer: Trainer,
        trajectory: Trajectory,
        plan: EpochPlan,
        advantages: torch.Tensor,
        stochastic_steps: np.ndarray,
        n_train_steps: int,
        per_update: int,
        epoch: int,
    ) -> dict[str, float]:
        """The epoch's `inner_epochs` × `updates_per_epoch` optimiser updates.

        Inner epoch 0 trains in the plan's order; each later one draws a fresh global permutation of the
        samples and fresh training steps per trajectory. An update takes the same global samples for any
        number of processes, which needs every process to see every trajectory once a reshuffled update can
        hold samples drawn elsewhere (updates_per_epoch > 1 on several processes: the trajectories are gathered).
        """
        c = self.config
        n = len(plan.prompt_index)
        processes, rank = trainer.num_processes, trainer.process_index
        gathered = c.inner_epochs > 1 and c.updates_per_epoch > 1 and processes > 1
        if gathered:
            trajectory = gather_trajectory(trainer, trajectory, plan)
            row_of = np.arange(n)
        else:
            row_of = np.full(n, -1)
            row_of[plan.local] = np.arange(len(plan.local))
        sums: dict[str, float] = {}
        count = 0
        first_update_deviation = 0.0
        for inner in range(c.inner_epochs):
            order = plan.order if inner == 0 else np.random.default_rng([c.trainer.seed, epoch, inner]).permutation(n)
            # This process's samples, in training order: its round-robin share of the order, or (when it holds
            # only its own trajectories) the order restricted to them, which is the same set in every update.
            mine = order[rank::processes] if gathered or inner == 0 else order[row_of[order] >= 0]
            train_steps = np.stack([
                plan.stream("timesteps", g, inner).permutation(stochastic_steps)[:n_train_steps] for g in mine
            ])
            for u in range(c.updates_per_epoch):
                for start in range(u * per_update, (u + 1) * per_update, c.train_batch_size):
                    chosen = slice(start, start + c.train_batch_size)
                    batch = trajectory[torch.as_tensor(row_of[mine[chosen]])]
                    batch_advantages = advantages[torch.as_tensor(mine[chosen], device=advantages.device)]
                    for j in range(n_train_steps):
                        step_index = torch.as_tensor(train_steps[chosen, j])
                        old = batch.log_probs[torch.arange(len(batch)), step_index.to(batch.log_probs.device)]
                        with trainer.accumulate():
                            with trainer.autocast():
                                log_prob = self.generator.step_log_prob(batch, step_index)
                            loss, stats = ddpo_loss(log_prob, old, batch_advantages, c.clip_range, c.variant)
                            trainer.backward(loss)
                            trainer.optimizer_step()
                        if inner == 0 and u == 0:
                            first_update_deviation = max(first_update_deviation, float(stats["ratio_max_deviation"]))
                        for key, value in {"loss": loss.detach(), **stats}.items():
                            sums[key] = sums.get(key, 0.0) + float(value)
                        count += 1
        out = {key: value / count for key, value in sums.items()}
        # How far this epoch moved the policy, on one micro-batch: with one update per epoch every ratio
        # seen during training is exactly 1, so this is the only KL signal.
        probe = mine[: c.train_batch_size]
        batch = trajectory[torch.as_tensor(row_of[probe])]
        step_index = torch.as_tensor(train_steps[: len(probe), 0])
        with torch.no_grad(), trainer.autocast():
            new = self.generator.step_log_prob(batch, step_index)
        log_ratio = new - batch.log_probs[torch.arange(len(batch)), step_index.to(new.device)]
        out["approx_kl_after_update"] = float(0.5 * (log_ratio**2).mean())
        out = trainer.mean_across_processes(out)
        # The largest deviation on any process, not the mean of the processes' largest.
        deviation = trainer.gather(torch.tensor([first_update_deviation], device=trainer.device)).max()
        out["ratio_first_max_deviation"] = float(deviation)
        if out["ratio_first_max_deviation"] > c.clip_range / 10:
            trainer.warn(f"epoch {epoch}: before the first update the importance ratio is off 1 by up to "
                         f"{out['ratio_first_max_deviation']:.3g}, not round-off below clip_range/10 = "
                         f"{c.clip_range / 10:g}; sampling and training compute different log-probs (dropout? "
                         "a different dtype or autocast?)")
        return out
