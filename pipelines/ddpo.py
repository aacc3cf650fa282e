"""DDPO — policy-gradient fine-tuning of a diffusion model (Black et al., 2023; spec 00).

Each epoch: sample prompts × images with per-step log-probs, score them, turn rewards into per-prompt
normalised advantages, then update the denoiser on a fraction of each trajectory's steps with the PPO-clip
loss ("is", importance sampling) or plain REINFORCE ("sf", score function, one step per rollout).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from genalign.config import ConfigError
from genalign.engine import DiffusionPipeline, DiffusionPipelineConfig, gather_in_order, reward_metrics, total_reward
from genalign.generators.diffusion import DiffusionGenerator, Trajectory
from genalign.stats import PerPromptStatTracker
from genalign.sampling import StepSchedule
from genalign.trainer import Trainer, launched_processes


@dataclass
class DDPOConfig(DiffusionPipelineConfig):
    pipeline: Literal["ddpo"] = "ddpo"
    prompts_per_epoch: int = 4
    samples_per_prompt: int = 4
    updates_per_epoch: int = 1
    inner_epochs: int = 1
    train_batch_size: int = 4
    timestep_fraction: float = 1.0
    variant: Literal["is", "sf"] = "is"
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    stat_buffer_size: int = 32
    stat_min_count: int = 16


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
        log_prob, old_log_prob, advantages: [B].
    Returns:
        (scalar loss, stats: ratio mean, clip fraction, approx KL ½·mean((log π_θ − log π_old)²)).
    """
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    stats = {
        "ratio": ratio.detach().mean(),
        "clipfrac": ((ratio.detach() - 1).abs() > clip_range).float().mean(),
        "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
    }
    if variant == "sf":
        return (-advantages * log_prob).mean(), stats
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), stats


class DDPOPipeline(DiffusionPipeline):
    """DDPO on a `DiffusionGenerator` with any reward from `rewards`."""

    config_class = DDPOConfig

    def __init__(self, config: DDPOConfig, generator: DiffusionGenerator | None = None, reward=None) -> None:
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

    def _local_layout(self, num_processes: int) -> tuple[int, int]:
        """(local samples per update, micro-batches per update); errors if the batch does not split."""
        c = self.config
        total = c.prompts_per_epoch * c.samples_per_prompt
        if total % (num_processes * c.updates_per_epoch):
            raise ConfigError(
                f"{total} samples per epoch must split evenly over {num_processes} process(es) × "
                f"{c.updates_per_epoch} updates; change prompts_per_epoch or samples_per_prompt"
            )
        per_update = total // num_processes // c.updates_per_epoch
        if per_update % c.train_batch_size:
            raise ConfigError(
                f"each process trains on {per_update} samples per update, not a multiple of "
                f"train_batch_size={c.train_batch_size}; pick a divisor of {per_update}"
            )
        return per_update, per_update // c.train_batch_size

    def _schedule_and_train_steps(self) -> tuple[StepSchedule, int]:
        """The sampling schedule and how many of its stochastic steps each trajectory trains on."""
        options = self.config.sampling.options()
        schedule = StepSchedule.from_scheduler(self.generator.scheduler, options.num_inference_steps, options.eta)
        stochastic = int(schedule.stochastic.sum())
        if stochastic == 0:
            raise ConfigError("no stochastic sampling steps: DDPO needs eta > 0 (DDIM) or a DDPM scheduler")
        return schedule, max(1, round(self.config.timestep_fraction * stochastic))

    def train(self) -> dict[str, float]:
        c = self.config
        schedule, n_train_steps = self._schedule_and_train_steps()
        per_update, micro_batches = self._local_layout(launched_processes())
        trainer, start, state = self.start_training(
            accumulation_steps=micro_batches * n_train_steps,
            total_updates=c.epochs * c.updates_per_epoch * c.inner_epochs,
        )
        if "stats" in state:
            self.tracker.load_state_dict(state["stats"])
        options = c.sampling.options()
        stochastic_steps = np.flatnonzero(schedule.stochastic.numpy())
        last: dict[str, float] = {}
        for epoch in trainer.epochs(start, c.epochs):
            tic = time.time()
            plan = self.epoch_plan(trainer, epoch, c.prompts_per_epoch, c.samples_per_prompt)
            # 1. Sample this process's share with per-sample seeds.
            local_prompts = [self.prompts[plan.prompt_index[i]] for i in plan.local]
            # Under the same autocast as training, so that recorded and re-evaluated log-probs agree.
            with trainer.autocast():
                rollout = self.generator.sample(
                    local_prompts, options, seeds=plan.seeds[plan.local].tolist(), batch_size=c.sampling.batch_size
                )
            # 2. Score, gather in global order, and normalise per prompt on every process alike.
            scores = self.reward(rollout.images, rollout.prompts).rewards.float()
            global_scores = gather_in_order(trainer, scores, plan)
            global_prompts = [self.prompts[i] for i in plan.prompt_index]
            advantages, flat_fraction = self.tracker.update(global_prompts, total_reward(global_scores).cpu().numpy())
            advantages = np.clip(advantages, -c.adv_clip_max, c.adv_clip_max)
            local_adv = torch.as_tensor(advantages[plan.local], dtype=torch.float32, device=trainer.device)
            if flat_fraction == 1.0:
                trainer.warn(f"epoch {epoch}: every prompt group has zero reward spread; advantages are 0 "
                             "and nothing is learned (is the reward constant?)")
            # 3. Update on a random subset of each trajectory's stochastic steps.
            train_steps = np.stack([
                plan.stream("timesteps", g).permutation(stochastic_steps)[:n_train_steps] for g in plan.local
            ])
            step_stats = self._update(trainer, rollout.trajectory, local_adv, train_steps, per_update, epoch)
            samples = len(plan.prompt_index)
            last = {
                **reward_metrics(global_scores, self.reward.objectives),
                "zero_spread_fraction": flat_fraction,
                "samples_per_s": samples / (time.time() - tic),
                "lr": trainer.learning_rate,
                "grad_norm": trainer.last_grad_norm,
                **step_stats,
            }
            if (epoch + 1) % c.eval.every == 0 or epoch + 1 == c.epochs:
                last.update(self.evaluate(trainer))
            trainer.log(last, step=epoch)
            trainer.maybe_checkpoint(epoch, c.epochs, {"stats": self.tracker.state_dict()})
        return last

    def _update(
        self,
        trainer: Trainer,
        trajectory: Trajectory,
        advantages: torch.Tensor,
        train_steps: np.ndarray,
        per_update: int,
        epoch: int,
    ) -> dict[str, float]:
        c = self.config
        sums: dict[str, float] = {}
        count = 0
        first_ratio = None
        positions = np.arange(len(trajectory))
        for inner in range(c.inner_epochs):
            if inner > 0:
                positions = np.random.default_rng([c.trainer.seed, epoch, inner]).permutation(len(trajectory))
            for u in range(c.updates_per_epoch):
                update_positions = positions[u * per_update : (u + 1) * per_update]
                for start in range(0, per_update, c.train_batch_size):
                    idx = torch.as_tensor(update_positions[start : start + c.train_batch_size])
                    batch = trajectory[idx]
                    for j in range(train_steps.shape[1]):
                        step_index = torch.as_tensor(train_steps[idx.numpy(), j])
                        old = batch.log_probs[torch.arange(len(batch)), step_index.to(batch.log_probs.device)]
                        with trainer.accumulate():
                            with trainer.autocast():
                                log_prob = self.generator.step_log_prob(
                                    batch, step_index, reduction=c.sampling.log_prob_reduction
                                )
                            loss, stats = ddpo_loss(log_prob, old.float(), advantages[idx], c.clip_range, c.variant)
                            trainer.backward(loss)
                            trainer.optimizer_step()
                        if first_ratio is None:
                            first_ratio = float(stats["ratio"])
                        for key, value in {"loss": loss.detach(), **stats}.items():
                            sums[key] = sums.get(key, 0.0) + float(value)
                        count += 1
        if first_ratio is not None and abs(first_ratio - 1) > 1e-3:
            trainer.warn(f"epoch {epoch}: importance ratio before the first update is {first_ratio:.6f}, not 1; "
                         "sampling and training compute different log-probs (dropout? dtype?)")
        out = {key: value / count for key, value in sums.items()}
        out["ratio_first"] = first_ratio if first_ratio is not None else float("nan")
        # How far this epoch moved the policy, on one micro-batch: with one update per epoch every ratio
        # seen during training is exactly 1, so this is the only KL signal.
        probe = torch.as_tensor(positions[: c.train_batch_size])
        batch = trajectory[probe]
        step_index = torch.as_tensor(train_steps[probe.numpy(), 0])
        with torch.no_grad(), trainer.autocast():
            new = self.generator.step_log_prob(batch, step_index, reduction=c.sampling.log_prob_reduction)
        log_ratio = new.float() - batch.log_probs[torch.arange(len(batch)), step_index.to(new.device)].float()
        out["approx_kl_after_update"] = float(0.5 * (log_ratio**2).mean())
        return trainer.mean_across_processes(out)
