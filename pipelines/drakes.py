"""DRAKES — reward fine-tuning of masked discrete diffusion by backpropagating through relaxed sampling
(Wang et al., ICLR 2025; spec ../shared/specs/drakes.md).

Each update samples a batch with the generator's relaxed sampler: the first T − K steps hard and detached, the
last K as Gumbel-softmax steps whose soft states carry gradients, straight-through to one-hot at the end so the
reward reads hard tokens. The loss is

    L = −mean r(x_0) + α · mean Σ_t KL_t,
    KL_t = Σ_{i masked at t} ((m_t − m_s)/m_t) · KL(p_θ(·|x_t)_i ‖ p_pre(·|x_t)_i),

the exact per-step KL between the fine-tuned and the pretrained reverse processes over every step of the
trajectory, with the pretrained model computed through the generator's `reference()` (LoRA adapters off, or a
frozen copy under full fine-tuning). The public code's KL, as we read it, weights only already-unmasked positions,
where both models agree by construction; it is zero on hard states. α = 0 is the "without KL" ablation (the KL
is then not computed at all).

The KL of the K relaxed steps depends on their soft states and is part of the reward's graph. The KL of each hard
step depends on the model but not on the other steps (the states are detached), so those terms are evaluated
and backpropagated `kl_chunk_steps` steps at a time: memory does not grow with T − K.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from genalign.config import AtLeast, ConfigError, PositiveFloat, PositiveInt
from genalign.engine import Pipeline, PipelineConfig, on_every_process, reward_metrics, split_batch, total_reward
from genalign.generators.base import Generator
from genalign.trainer import launched_processes


@dataclass
class DRAKESConfig(PipelineConfig):
    pipeline: Literal["drakes"] = "drakes"
    batch_size: PositiveInt = 32  # samples per optimiser update, over all processes
    train_batch_size: PositiveInt = 8  # samples per relaxed-sampler call (micro-batch)
    grad_steps: PositiveInt = 50  # K: relaxed steps at the end of the T sampling steps
    tau: PositiveFloat = 1.0  # Gumbel-softmax temperature
    alpha: Annotated[float, AtLeast(0)] = 1e-3  # KL weight; 0 = the no-KL ablation
    kl_chunk_steps: PositiveInt = 16  # hard steps whose KL terms are backpropagated together


class DRAKESPipeline(Pipeline):
    """DRAKES on a generator with a relaxed differentiable sampler and `step_kl` (the masked family)."""

    config_class = DRAKESConfig
    sharding_strategies = ("fsdp", "deepspeed")

    def __init__(self, config: DRAKESConfig, generator: Generator | None = None, reward=None) -> None:
        super().__init__(config, generator, reward)
        if not self.reward.differentiable:
            raise ConfigError(f"DRAKES backpropagates through the reward, but '{self.reward.name}' is not "
                              "differentiable; use a differentiable reward such as a sequence oracle")
        steps = self.options.num_inference_steps
        if config.grad_steps > steps:
            raise ConfigError(f"grad_steps={config.grad_steps} exceeds sampling.num_inference_steps={steps}")

    def _kl_chunks(self) -> list[range]:
        """The hard steps 0 … T−K−1 in chunks of `kl_chunk_steps` (none when α = 0)."""
        c = self.config
        hard = self.options.num_inference_steps - c.grad_steps
        if c.alpha == 0 or hard == 0:
            return []
        return [range(start, min(start + c.kl_chunk_steps, hard)) for start in range(0, hard, c.kl_chunk_steps)]

    def train(self) -> dict[str, float]:
        c = self.config
        _, micro_batches = split_batch(c.batch_size, launched_processes(), c.train_batch_size,
                                       names=("samples per update (batch_size)", "train_batch_size"))
        chunks = self._kl_chunks()
        backward_calls = 1 + len(chunks)  # per micro-batch: the reward + relaxed KL, then each hard-step chunk
        trainer, start, _ = self.start_training(accumulation_steps=micro_batches * backward_calls,
                                                total_updates=c.epochs, keep_reference=c.alpha > 0)
        # accelerate divides every backward by the accumulation steps; scaling each part back by the backward
        # calls per micro-batch makes the update's gradient the mean over micro-batches of the whole loss.
        scale = float(backward_calls)
        last: dict[str, float] = {}
        for epoch in trainer.epochs(start, c.epochs):
            tic = time.time()
            plan = self.epoch_plan(trainer, epoch, c.batch_size, samples_per_prompt=1)
            rewards, kls = [], []
            for first in range(0, len(plan.local), c.train_batch_size):
                chunk = plan.local[first : first + c.train_batch_size]
                with trainer.accumulate():
                    with trainer.autocast():
                        rollout = self.generator.sample_differentiable(
                            self.conditions(plan, chunk), self.options, grad_steps=c.grad_steps,
                            seeds=plan.seeds[chunk].tolist(), tau=c.tau, kl_to_reference=c.alpha > 0,
                        )
                        scores = on_every_process(trainer, lambda: self.reward(rollout.outputs, rollout.texts).rewards)
                    loss = -total_reward(scores).mean()
                    kl = torch.zeros(len(chunk), dtype=torch.float64, device=trainer.device)
                    if c.alpha > 0:
                        kl = rollout.extras["kl_relaxed"]
                        loss = loss + c.alpha * kl.mean()
                    trainer.backward(scale * loss)
                    trainer.optimizer_step()
                kl = kl.detach() + self._hard_step_kl(trainer, rollout, chunks, scale)
                rewards.append(scores.detach().float())
                kls.append(kl)
            metrics = {
                **reward_metrics(trainer.gather(torch.cat(rewards)), self.reward.objectives),
                "kl": float(trainer.gather(torch.cat(kls)).mean()),
            }
            last = self.finish_epoch(trainer, epoch, metrics, {}, tic, c.batch_size)
        return last

    def _hard_step_kl(self, trainer, rollout, chunks: list[range], scale: float) -> torch.Tensor:
        """Backpropagate α·mean Σ_t KL_t over the hard steps, chunk by chunk; returns the per-sample sums [B]."""
        c = self.config
        total = torch.zeros(len(rollout), dtype=torch.float64, device=trainer.device)
        if not chunks:
            return total
        states = rollout.extras["hard_states"]
        conditioning = {name: t.to(trainer.device) for name, t in rollout.conditions.tensors.items()}
        for steps in chunks:
            with trainer.accumulate():
                with trainer.autocast():
                    kl = sum(self.generator.step_kl(states[:, k], torch.full((len(rollout),), k, device=states.device),
                                                    self.options, conditioning) for k in steps)
                trainer.backward(scale * c.alpha * kl.mean())
                trainer.optimizer_step()
            total += kl.detach()
        return total
