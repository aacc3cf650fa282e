"""Relative trajectory balance — fine-tune a pretrained sampler p_pre towards the posterior p_pre(x)·r(x)^β with
the RTB loss (Venkatraman et al., NeurIPS 2024; spec ../shared/specs/gflownets.md, "RTB").

For a sampling trajectory τ = (s_0 → … → s_T = x) the loss is

    δ(τ) = log Z + Σ_t log p_φ(s_{t+1} | s_t) − Σ_t log p_pre(s_{t+1} | s_t) − β·log r(x),    L = mean δ(τ)²,

with a learned scalar log Z (its own parameter group at `log_z_learning_rate`, no weight decay; by default set
from the first micro-batch, see `log_z_init`). At δ ≡ 0 the
fine-tuned trajectory distribution is p_pre(τ)·r(x)^β / Z, whose marginal over x is the posterior. The
trajectories are detached, so RTB trains off-policy: each update draws `batch_size` trajectories, the first
`prior_fraction` of them (by global index) from the pretrained model (through the protocol's `reference()`) and
the rest from the current one. The reward is a black box (never differentiated); `reward_transform` says how a
score becomes log r: "identity" (the score is log r, i.e. r = exp(score), so β = 1/α targets the optimum of
DRAKES' E[r] − α·KL) or "log" (the score is r > 0).

Each update per micro-batch:

1. sample (recording every step's log-probability under the sampler that drew it) and score;
2. without gradients, evaluate the other model's log-probabilities — p_pre for on-policy rows, p_φ for prior
   rows — so that δ is known before any backward;
3. backpropagate ∇L = mean 2δ·(∇log Z + Σ_t ∇log p_φ(step t)) a chunk of `chunk_steps` steps at a time
   (2·δ.detach()·Σ_chunk log p_φ, and δ² through log Z with the first chunk), so memory does not grow with T.

Only the steps with a density belong to τ. A sampler whose last step is deterministic (a masked model's argmax
final step, DDIM's last step) leaves that step's output as a fixed function of its input: the balance then holds
for the state before it (set `sampling.final_step: sample` on masked models to include it).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch

from genalign.config import AtLeast, ConfigError, PositiveFloat, PositiveInt
from genalign.engine import Pipeline, PipelineConfig, on_every_process, reward_metrics, split_batch, total_reward
from genalign.generators.base import Generator, Rollout, Trajectory
from genalign.trainer import ParameterGroup, Trainer, launched_processes


@dataclass
class RTBConfig(PipelineConfig):
    pipeline: Literal["rtb"] = "rtb"
    batch_size: PositiveInt = 32  # trajectories per optimiser update, over all processes
    train_batch_size: PositiveInt = 8  # trajectories per sampler call (micro-batch)
    beta: PositiveFloat = 1.0  # the posterior's reward exponent: p_pre(x)·r(x)^β
    reward_transform: Literal["identity", "log"] = "identity"
    prior_fraction: Annotated[float, AtLeast(0)] = 0.0  # share of each batch drawn from p_pre
    log_z_learning_rate: Annotated[float, AtLeast(0)] = 0.1
    # "first_batch": a fresh run sets log Z to the value that minimises the loss on its first micro-batch,
    # mean(β·log r − log p_φ + log p_pre) over every process, before the first backward. With a large β·r the
    # residuals otherwise start far from 0 (e.g. −β·r ≈ −110 on the DNA world) and the first hundreds of updates
    # go to moving log Z. "zero": start at log Z = 0.
    log_z_init: Literal["first_batch", "zero"] = "first_batch"
    chunk_steps: PositiveInt = 16  # sampling steps whose log-probabilities are backpropagated together


class RTBPipeline(Pipeline):
    """Relative trajectory balance on any generator with per-step log-probabilities and `reference()`."""

    config_class = RTBConfig

    def __init__(self, config: RTBConfig, generator: Generator | None = None, reward=None) -> None:
        super().__init__(config, generator, reward)
        if config.prior_fraction > 1:
            raise ConfigError(f"prior_fraction is the share of each batch drawn from the pretrained model, in [0, 1]; "
                              f"got {config.prior_fraction}")
        if config.sampling.log_prob_reduction != "sum":
            raise ConfigError("RTB balances trajectory densities, and a mean over dimensions is not one: set "
                              "sampling.log_prob_reduction: sum")
        self.log_z = torch.nn.Parameter(torch.zeros((), dtype=torch.float32))

    def log_reward(self, scores: torch.Tensor) -> torch.Tensor:
        """log r [B] float64 from the reward's scores ([B] or [B, K], objectives summed)."""
        total = total_reward(scores).to(torch.float64)
        if self.config.reward_transform == "identity":
            return total
        if bool((total <= 0).any()):
            raise ConfigError(f"reward_transform: log takes log r of '{self.reward.name}', but it scored "
                              f"{float(total.min()):.4g} ≤ 0; use reward_transform: identity (the score is then log r)")
        return total.log()

    def _chunks(self, steps: np.ndarray) -> list[np.ndarray]:
        return [steps[i : i + self.config.chunk_steps] for i in range(0, len(steps), self.config.chunk_steps)]

    def train(self) -> dict[str, float]:
        c = self.config
        steps = self.trainable_steps()
        chunks = self._chunks(steps)
        _, micro_batches = split_batch(c.batch_size, launched_processes(), c.train_batch_size,
                                       names=("trajectories per update (batch_size)", "train_batch_size"))
        log_z = ParameterGroup({"log_z": self.log_z}, c.log_z_learning_rate, weight_decay=0.0)
        trainer, start, _ = self.start_training(accumulation_steps=micro_batches * len(chunks), total_updates=c.epochs,
                                                extra_parameters={"log_z": log_z}, keep_reference=True)
        if len(steps) < self.options.num_inference_steps:
            trainer.warn(f"{self.options.num_inference_steps - len(steps)} of the {self.options.num_inference_steps} "
                         "sampling steps have no density and are left out of the trajectory balance (see "
                         "pipelines/rtb.py); with a masked model set sampling.final_step: sample")
        n_prior = round(c.prior_fraction * c.batch_size)
        # accelerate divides every backward by the accumulation steps; scaling each chunk back by their number
        # makes the update's gradient the mean over micro-batches of the whole loss.
        scale = float(len(chunks))
        last: dict[str, float] = {}
        for epoch in trainer.epochs(start, c.epochs):
            tic = time.time()
            plan = self.epoch_plan(trainer, epoch, c.batch_size, samples_per_prompt=1)
            parts: dict[str, list[torch.Tensor]] = {"scores": [], "delta": [], "log_ratio": [], "prior": []}
            for first in range(0, len(plan.local), c.train_batch_size):
                chunk = plan.local[first : first + c.train_batch_size]
                trajectory, scores, prior = self._sample(trainer, plan, chunk, n_prior)
                with torch.no_grad(), trainer.autocast():
                    log_p, log_pre = self._trajectory_log_probs(trajectory, prior, steps)
                log_r = self.log_reward(scores).to(trainer.device)
                if epoch == 0 and first == 0 and c.log_z_init == "first_batch":
                    with torch.no_grad():
                        self.log_z.fill_(float(trainer.gather(c.beta * log_r - log_p + log_pre).mean()))
                delta = self.log_z.detach().double() + log_p - log_pre - c.beta * log_r
                for j, chunk_steps in enumerate(chunks):
                    with trainer.accumulate():
                        with trainer.autocast():
                            log_p_chunk = self._sum_log_probs(trajectory, chunk_steps)
                        loss = (2 * delta * log_p_chunk).mean()
                        if j == 0:  # δ² as a function of log Z alone: its gradient 2δ
                            loss = loss + (delta + (self.log_z.double() - self.log_z.detach().double())).pow(2).mean()
                        trainer.backward(scale * loss)
                        trainer.optimizer_step()
                parts["scores"].append(scores.detach().float().to(trainer.device))
                parts["delta"].append(delta)
                parts["log_ratio"].append(log_p - log_pre)
                parts["prior"].append(prior.to(trainer.device))
            gathered = {name: trainer.gather(torch.cat(values)) for name, values in parts.items()}
            on_policy = ~gathered["prior"]
            # The reward of the fine-tuned sampler's own trajectories (prior rows say nothing of it).
            scored = gathered["scores"][on_policy] if bool(on_policy.any()) else gathered["scores"]
            metrics = {
                **reward_metrics(scored, self.reward.objectives),
                "rtb_loss": float(gathered["delta"].pow(2).mean()),
                "log_z": float(self.log_z.detach()),
                # E_φ[log p_φ(τ) − log p_pre(τ)]: the trajectory KL of the fine-tuned sampler from the pretrained.
                "trajectory_kl": float(gathered["log_ratio"][on_policy].mean()) if bool(on_policy.any()) else 0.0,
            }
            last = self.finish_epoch(trainer, epoch, metrics, {}, tic, c.batch_size)
        return last

    def _sample(self, trainer: Trainer, plan, chunk: np.ndarray, n_prior: int
                ) -> tuple[Trajectory, torch.Tensor, torch.Tensor]:
        """Trajectories of the global samples `chunk` (those with index < n_prior from p_pre, placed first; the
        others from p_φ), their scores [n] or [n, K], and which rows are prior [n] bool."""
        prior_rows, policy_rows = chunk[chunk < n_prior], chunk[chunk >= n_prior]
        rollouts = []
        for rows, sampler in ((prior_rows, self.generator.reference), (policy_rows, contextlib.nullcontext)):
            if len(rows):
                with trainer.autocast(), sampler():
                    rollouts.append(self.generator.sample(self.conditions(plan, rows), self.options,
                                                          seeds=plan.seeds[rows].tolist(),
                                                          batch_size=self.config.sampling.batch_size))
        rollout = Rollout.cat(rollouts)
        scores = on_every_process(trainer, lambda: self.reward(rollout.outputs, rollout.texts).rewards)
        prior = torch.arange(len(chunk)) < len(prior_rows)
        return rollout.trajectory, scores, prior

    def _trajectory_log_probs(self, trajectory: Trajectory, prior: torch.Tensor, steps: np.ndarray
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_t log p_φ, Σ_t log p_pre) [B] float64 over the steps with a density: each row's own sampler's sum
        is its recorded log-probabilities, the other model's is evaluated here."""
        device = trajectory.log_probs.device
        recorded = trajectory.log_probs[:, torch.as_tensor(steps, device=device)].sum(1)
        prior = prior.to(device)
        log_p, log_pre = recorded.clone(), recorded.clone()
        if bool(prior.any()):
            log_p[prior] = self._sum_log_probs(trajectory[torch.nonzero(prior).squeeze(1)], steps).to(device)
        if bool((~prior).any()):
            with self.generator.reference():
                log_pre[~prior] = self._sum_log_probs(trajectory[torch.nonzero(~prior).squeeze(1)], steps).to(device)
        return log_p, log_pre

    def _sum_log_probs(self, trajectory: Trajectory, steps: np.ndarray) -> torch.Tensor:
        return sum(self.generator.step_log_prob(trajectory, int(k)) for k in steps)

