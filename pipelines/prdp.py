"""PRDP — Proximal Reward Difference Prediction (Deng et al., CVPR 2024; spec ../shared/specs/prdp.md).

Each epoch freezes the current model as π_old, samples N conditions × B samples from it with per-step
log-probs, scores them, and takes K gradient steps on the Reward Difference Prediction loss: for every
pair (a, b) of one prompt's samples, the implied reward difference r̂_θ(a) − r̂_θ(b), where
r̂_θ(x̄) = Σ_t log π_θ(x_{t−1}|x_t, c) − log π_old(x_{t−1}|x_t, c), should equal the true one divided by β.
The proximal variant clips each step's log-ratio to [−ε, ε] and takes max(l, l_clip) per pair.

The loss couples every trajectory of a group through all its steps, but its gradient does not need them
in one graph: with the per-step log-ratios r̂[i, t] known (no gradient), G = ∂L/∂r̂ is a small [M, S]
tensor, and ∇_θ L = Σ_{i,t} G[i, t] · ∇_θ log π_θ(step t of i). So each update is a no-grad pass for the
values (skipped on an epoch's first update, where θ = θ_old makes every r̂ exactly 0), the exact loss and
G on those values (`rdp_loss` through autograd), then micro-batched backward passes of Σ G · log π.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from genalign.config import ConfigError, NonNegativeInt, PositiveFloat, PositiveInt
from genalign.engine import (EpochPlan, Pipeline, PipelineConfig, gather_in_order, reward_metrics, split_batch,
    total_reward)
from genalign.generators.base import Generator, Trajectory
from genalign.trainer import Trainer, launched_processes


@dataclass
class PRDPConfig(PipelineConfig):
    pipeline: Literal["prdp"] = "prdp"
    prompts_per_epoch: PositiveInt = 4  # N
    samples_per_prompt: PositiveInt = 4  # B: each prompt's group, whose pairs the loss compares
    updates_per_epoch: PositiveInt = 1  # K gradient steps on the same samples, all against θ_old
    beta: PositiveFloat = 3e-5  # β: KL weight; the target log-ratio difference is Δr / β
    clip_range: PositiveFloat | None = 1e-4  # ε on each step's log-ratio; null turns the proximal clipping off
    mean_over_steps: bool = False  # reference-code switch 1: r̂ averages the step log-ratios instead of summing
    positive_pairs_only: bool = False  # reference-code switch 2: average over ordered pairs with Δr > 0
    train_batch_size: PositiveInt = 4  # trajectories per model call in the update passes
    probe_prompts: NonNegativeInt = 2  # groups re-evaluated after the updates for the diagnostics; 0 turns them off


def rdp_loss(
    log_ratios: torch.Tensor,
    rewards: torch.Tensor,
    groups: torch.Tensor,
    beta: float,
    clip_range: float | None = None,
    mean_over_steps: bool = False,
    positive_pairs_only: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The (proximal) Reward Difference Prediction loss over all pairs within each group.

    Args:
        log_ratios: [M, S] per-step r̂_t = log π_θ − log π_old of M trajectories at their S trained steps.
        rewards: [M] true rewards.
        groups: [M] group (prompt) id of each trajectory; only pairs within a group are compared.
        beta: β > 0.
        clip_range: ε; None means no proximal clipping.
        mean_over_steps: r̂ = mean_t r̂_t instead of Σ_t r̂_t.
        positive_pairs_only: average l(a, b) over ordered pairs with r(a) − r(b) > 0 instead of
            Σ_n Σ_{i<j} l(i, j) / Σ_n B_n² (which is 1/(N·B²) for N groups of B).
    Returns:
        (scalar loss, stats: fraction of steps with |r̂_t| > ε, fraction of pairs on the clipped branch,
        number of pairs).
    """
    reduce = (lambda x: x.mean(dim=1)) if mean_over_steps else (lambda x: x.sum(dim=1))
    target = (rewards[:, None] - rewards[None, :]) / beta

    def pair_losses(per_step: torch.Tensor) -> torch.Tensor:
        implied = reduce(per_step)
        return (implied[:, None] - implied[None, :] - target) ** 2

    loss = pair_losses(log_ratios)
    clipped_steps = torch.zeros((), device=log_ratios.device)
    on_clipped_branch = torch.zeros_like(loss, dtype=torch.bool)
    if clip_range is not None:
        clipped_loss = pair_losses(torch.clamp(log_ratios, -clip_range, clip_range))
        on_clipped_branch = clipped_loss > loss
        loss = torch.maximum(loss, clipped_loss)
        clipped_steps = (log_ratios.detach().abs() > clip_range).float().mean()

    same_group = groups[:, None] == groups[None, :]
    if positive_pairs_only:
        pairs = same_group & (target > 0)
        normaliser = pairs.sum().clamp(min=1)
    else:
        pairs = same_group & torch.ones_like(same_group).triu(diagonal=1)
        normaliser = (torch.unique(groups, return_counts=True)[1] ** 2).sum()
    total = torch.where(pairs, loss, torch.zeros_like(loss)).sum() / normaliser
    stats = {
        "clipped_step_fraction": clipped_steps,
        "clipped_pair_fraction": (on_clipped_branch & pairs).sum() / pairs.sum().clamp(min=1),
        "pairs": pairs.sum(),
    }
    return total, stats


def loss_coefficients(
    log_ratios: torch.Tensor, rewards: torch.Tensor, groups: torch.Tensor, config: PRDPConfig
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, G = ∂loss/∂log_ratios [M, S], stats), computed in float64 (Δr/β reaches ~1e5)."""
    values = log_ratios.detach().double().requires_grad_(True)
    loss, stats = rdp_loss(
        values, rewards.double(), groups, config.beta, config.clip_range, config.mean_over_steps,
        config.positive_pairs_only,
    )
    (grad,) = torch.autograd.grad(loss, values)
    return loss.detach(), grad, stats


def implied_reward_diagnostics(
    log_ratios: torch.Tensor, rewards: torch.Tensor, groups: torch.Tensor, config: PRDPConfig
) -> dict[str, float]:
    """How well the updated model's implied reward predicts the true one on its own samples.

    Returns the Pearson correlation of β·Δr̂ with Δr over within-group ordered pairs, the RDP loss at these
    values, and KL(π_old ‖ π_θ) per trajectory estimated on π_old's samples as mean(e^{r̂} − 1 − r̂) (the
    non-negative "k3" estimator, with r̂ the summed log-ratio).
    """
    log_ratios, rewards = log_ratios.double(), rewards.double()
    implied = log_ratios.mean(dim=1) if config.mean_over_steps else log_ratios.sum(dim=1)
    # Both orientations of every pair, so that the correlation does not depend on the samples' order.
    i, j = torch.nonzero(groups[:, None] == groups[None, :], as_tuple=True)
    keep = i != j
    predicted = config.beta * (implied[i] - implied[j])[keep]
    actual = (rewards[i] - rewards[j])[keep]
    corr = float("nan")
    if len(actual) > 1 and predicted.std() > 0 and actual.std() > 0:
        corr = float(torch.corrcoef(torch.stack([predicted, actual]))[0, 1])
    loss, _ = rdp_loss(log_ratios, rewards, groups, config.beta, config.clip_range, config.mean_over_steps,
                       config.positive_pairs_only)
    summed = log_ratios.sum(dim=1)
    return {
        "implied_reward_corr": corr,
        "rdp_loss_after": float(loss),
        "kl_epoch_start": float((torch.expm1(summed) - summed).mean()),
    }


class PRDPPipeline(Pipeline):
    """PRDP on any generator with per-step log-probabilities, with any reward from `rewards` (several objectives
    are summed)."""

    config_class = PRDPConfig
    sharding_strategies = ("fsdp", "deepspeed")

    def __init__(self, config: PRDPConfig, generator: Generator | None = None, reward=None) -> None:
        super().__init__(config, generator, reward)
        c = config
        if c.samples_per_prompt < 2:
            raise ConfigError("PRDP compares pairs of one prompt's samples: set samples_per_prompt ≥ 2")
        if not c.beta > 0:
            raise ConfigError(f"beta must be > 0 (it divides the reward difference), got {c.beta}")
        if c.clip_range is not None and not c.clip_range > 0:
            raise ConfigError(f"clip_range must be > 0, or null for no clipping; got {c.clip_range}")
        if c.updates_per_epoch < 1:
            raise ConfigError(f"updates_per_epoch must be ≥ 1, got {c.updates_per_epoch}")
        if not 0 <= c.probe_prompts <= c.prompts_per_epoch:
            raise ConfigError(f"probe_prompts must be in [0, prompts_per_epoch={c.prompts_per_epoch}]")

    def train(self) -> dict[str, float]:
        c = self.config
        steps = self.trainable_steps()
        local_samples, micro_batches = split_batch(c.prompts_per_epoch * c.samples_per_prompt, launched_processes(),
                                                   c.train_batch_size)
        trainer, start, _ = self.start_training(
            accumulation_steps=micro_batches * len(steps), total_updates=c.epochs * c.updates_per_epoch
        )
        last: dict[str, float] = {}
        for epoch in trainer.epochs(start, c.epochs):
            tic = time.time()
            plan = self.epoch_plan(trainer, epoch, c.prompts_per_epoch, c.samples_per_prompt)
            # 1–2. θ_old samples this process's share and scores it; every process needs every reward, in global
            # order, for the pairs.
            samples = self.sample_and_score(trainer, plan)
            trajectory = samples.rollout.trajectory
            global_scores = samples.global_scores
            rewards = total_reward(global_scores)
            # Samples are drawn group after group: global sample g belongs to prompt group g // B.
            groups = torch.arange(len(rewards), device=trainer.device) // c.samples_per_prompt
            zero_spread = float((rewards.view(-1, c.samples_per_prompt).std(dim=1) == 0).float().mean())
            if zero_spread == 1.0:
                trainer.warn(f"epoch {epoch}: every prompt group has zero reward spread; every pair's target is 0 "
                             "and PRDP learns nothing (is the reward constant?)")
            # 3. K updates against θ_old.
            reference: torch.Tensor | None = None
            update_stats: list[dict[str, float]] = []
            for k in range(c.updates_per_epoch):
                if k == 0:
                    local_ratios = torch.zeros(local_samples, len(steps), device=trainer.device, dtype=torch.float64)
                else:
                    local_ratios = self._step_log_probs(trainer, trajectory, steps) - reference
                ratios = gather_in_order(trainer, local_ratios, plan)
                loss, coefficients, stats = loss_coefficients(ratios, rewards, groups, c)
                local_coefficients = coefficients[torch.as_tensor(plan.local, device=coefficients.device)]
                recorded = self._backward(trainer, trajectory, steps, local_coefficients)
                if reference is None:
                    reference = recorded
                update_stats.append({"rdp_loss": float(loss), **{key: float(v) for key, v in stats.items()}})
            mismatch = float((reference - trajectory.log_probs[:, steps].to(reference)).abs().max())
            # Against the proximal ε: a larger mismatch alone would push steps onto the clipped branch.
            tolerance = (c.clip_range or 1e-4) / 10
            if mismatch > tolerance:
                trainer.warn(f"epoch {epoch}: log-probs re-evaluated at θ_old differ from the sampled ones by "
                             f"{mismatch:.3g} (more than {tolerance:g}); sampling and training compute different "
                             "densities (dropout? a different dtype or autocast?)")
            metrics = {
                **reward_metrics(global_scores, self.reward.objectives),
                **{key: float(np.mean([s[key] for s in update_stats])) for key in update_stats[0]},
                "rdp_loss_first": update_stats[0]["rdp_loss"],
                "reference_logprob_mismatch": mismatch,
                "zero_spread_fraction": zero_spread,
            }
            if c.probe_prompts:
                probe_total = c.probe_prompts * c.samples_per_prompt
                metrics.update(self._probe(trainer, trajectory, steps, reference, probe_total, plan, rewards, groups))
            last = self.finish_epoch(trainer, epoch, metrics, {}, tic, len(plan))
        return last

    def _step_log_probs(self, trainer: Trainer, trajectory: Trajectory, steps: np.ndarray) -> torch.Tensor:
        """[M, S] log π_θ (float64) at each trained step of each local trajectory, without gradients."""
        c = self.config
        out = torch.empty(len(trajectory), len(steps), device=trainer.device, dtype=torch.float64)
        with torch.no_grad(), trainer.autocast():
            for start in range(0, len(trajectory), c.train_batch_size):
                batch = trajectory[start : start + c.train_batch_size]
                for j, step in enumerate(steps):
                    index = torch.full((len(batch),), int(step))
                    out[start : start + len(batch), j] = self.generator.step_log_prob(batch, index)
        return out

    def _backward(
        self, trainer: Trainer, trajectory: Trajectory, steps: np.ndarray, coefficients: torch.Tensor
    ) -> torch.Tensor:
        """One optimiser update with gradient Σ_{i,t} G[i, t] ∇ log π_θ(step t of i) = ∇L.

        Returns the [M, S] log-probs evaluated on the way (before the update), for use as π_old's.
        """
        c = self.config
        # accelerate divides each backward by the accumulation steps and DDP averages over processes;
        # the surrogate is scaled back so that the gradients add up to exactly ∇L.
        scale = trainer.accelerator.gradient_accumulation_steps * trainer.num_processes
        evaluated = torch.empty_like(coefficients)
        for start in range(0, len(trajectory), c.train_batch_size):
            rows = slice(start, start + c.train_batch_size)
            batch = trajectory[rows]
            for j, step in enumerate(steps):
                index = torch.full((len(batch),), int(step))
                with trainer.accumulate():
                    with trainer.autocast():
                        log_prob = self.generator.step_log_prob(batch, index)
                    trainer.backward(scale * (coefficients[rows, j] * log_prob).sum())
                    trainer.optimizer_step()
                evaluated[rows, j] = log_prob.detach()
        return evaluated

    def _probe(
        self,
        trainer: Trainer,
        trajectory: Trajectory,
        steps: np.ndarray,
        reference: torch.Tensor,
        probe_total: int,
        plan: EpochPlan,
        rewards: torch.Tensor,
        groups: torch.Tensor,
    ) -> dict[str, float]:
        """Implied-reward diagnostics of the updated model on the epoch's first `probe_prompts` groups."""
        mine = torch.as_tensor(np.flatnonzero(plan.local < probe_total))
        ratios = torch.zeros_like(reference)
        with trainer.gathered_weights():  # processes probe different numbers of samples
            if len(mine):
                ratios[mine] = self._step_log_probs(trainer, trajectory[mine], steps) - reference[mine]
        # Each process probes however many of its samples fall in those groups: gather all rows and a mask.
        selected = torch.zeros(len(reference), dtype=torch.bool, device=reference.device)
        selected[mine] = True
        keep = gather_in_order(trainer, selected, plan)
        ratios = gather_in_order(trainer, ratios, plan)[keep]
        return implied_reward_diagnostics(ratios, rewards[keep], groups[keep], self.config)
