"""Ctrl-U — uncertainty-aware reward fine-tuning of a ControlNet (Zhang et al., ICLR 2025; spec ctrl_u.md).

One pipeline for every condition type: the condition's per-pixel math comes from `rewards.controllability`
(segmentation, edges, depth, or your own), the frozen reward model that predicts the condition back from an
image is a `ConditionReward`, and the data is a control dataset (`genalign.control_data`).

Each update, on a batch of training examples (image, caption, control image, target condition):
1. encode the samples; draw t ~ U[0, T) and noise ε per example, t2 = min(t + 1, T − 1);
2. noise two copies, one at t and one at t2 (same clean data, noise, text and control), and predict;
   L_diff = the ordinary diffusion loss over both copies;
3. for the examples with t ≤ t_max, decode both one-step estimates x̂_0 and run the reward model: ĉ1, ĉ2;
   U = u_scale · uncertainty(ĉ1, ĉ2) per pixel (KL for segmentation, |difference| for edges and depth);
   L_rew = mean over the batch of each example's mean over labelled pixels of exp(−U) · loss(ĉ1, c)
   (zero for examples with t > t_max);
4. loss = L_diff + λ_rew · ramp · L_rew + λ_u · mean(U), ramp = min(1, updates / ramp_updates); U is not
   detached, so the last term also pushes the two predictions to agree.
With `uncertainty: false` it is the ControlNet++-style baseline: loss = L_diff + λ_rew · ramp · L_rew, exp(−U) = 1.

Only the ControlNet trains (the generator's `trainable_modules()`); the UNet, VAE and text encoder are frozen.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from genalign.attention import set_attention_backend
from genalign.config import ConfigError, NonNegativeInt, PositiveInt
from genalign.control_data import ControlDataset, ControlExamples, build_control_dataset
from genalign.engine import (EpochPlan, Pipeline, PipelineConfig, RewardConfig, gather_rows, on_every_process,
    split_batch)
from genalign.gallery import GallerySample, PromptRow, to_pil, write_gallery
from genalign.generators.base import Generator
from genalign.trainer import Trainer, launched_processes
from rewards import build_reward as build_named_reward
from rewards.controllability import ConditionReward, ConditionType


@dataclass
class ControlDataConfig:
    """Which control dataset (`genalign.control_data.CONTROL_DATASETS`) and its arguments."""

    name: str = "shapes"
    kwargs: dict = field(default_factory=dict)


@dataclass
class CtrlUConfig(PipelineConfig):
    pipeline: Literal["ctrl_u"] = "ctrl_u"
    condition: Literal["segmentation", "edges", "depth"] = "segmentation"
    data: ControlDataConfig = field(default_factory=ControlDataConfig)
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(name="controllability"))
    # A different model of the same kind judges held-out controllability (logged as eval_controllability).
    evaluation: RewardConfig | None = None
    uncertainty: bool = True  # false: the ControlNet++-style baseline (plain reward loss)
    reward_weight: float = 0.1  # λ_rew
    uncertainty_weight: float = 1.0  # λ_u
    uncertainty_scale: float = 1.0  # u_scale, multiplies U inside exp(−U) and in λ_u · mean(U)
    max_reward_timestep: NonNegativeInt = 400  # t_max: larger t get no reward term
    ramp_updates: NonNegativeInt = 5000  # the reward term's weight grows linearly to 1 over these; 0 = no ramp
    batch_size: PositiveInt = 4  # examples per update (global)
    train_batch_size: PositiveInt = 4  # examples per forward pass and process (two noised copies each)
    eval_examples: PositiveInt = 16  # held-out examples sampled at every evaluation


def ctrl_u_loss(
    condition: ConditionType,
    first: torch.Tensor,
    second: torch.Tensor,
    target: torch.Tensor,
    *,
    use_uncertainty: bool,
    uncertainty_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's reward loss and uncertainty map (before λ's, ramp and the t_max mask).

    Args:
        first, second: the reward model's predictions from x̂_0 at t and at t2 ([B, ...], see
            rewards.controllability for the shapes per condition type); target: the condition.
    Returns:
        (reward loss [B]: mean over each example's labelled pixels of exp(−U) · loss(first, target);
         U [B, H, W], u_scale · the condition's uncertainty, zeros without uncertainty).
    """
    pixel_loss, labelled = condition.pixel_loss(first, target)
    if use_uncertainty:
        uncertainty = uncertainty_scale * condition.uncertainty(first, second)
        pixel_loss = torch.exp(-uncertainty) * pixel_loss
    else:
        uncertainty = torch.zeros_like(pixel_loss)
    weight = labelled.to(pixel_loss.dtype)
    per_example = (pixel_loss * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)
    return per_example, uncertainty


def reward_ramp(updates: int, ramp_updates: int) -> float:
    """min(1, updates / ramp_updates): the reward term's weight after `updates` optimiser updates."""
    return 1.0 if ramp_updates == 0 else min(1.0, updates / ramp_updates)


class CtrlUPipeline(Pipeline):
    """Ctrl-U (and, with `uncertainty: false`, the ControlNet++-style baseline) on a generator with a ControlNet."""

    config_class = CtrlUConfig
    sharding_strategies = ("fsdp", "deepspeed")
    takes_prompts = False  # the captions come with the data

    def __init__(self, config: CtrlUConfig, generator: Generator | None = None, reward=None,
                 evaluation_reward=None, data=None) -> None:
        super().__init__(config, generator, reward)
        if "controlnet" not in self.generator.trainable_modules():
            raise ConfigError("Ctrl-U trains a ControlNet, and this model has none; load one with "
                              "model.controlnet=unet (initialised from the UNet) or a ControlNet folder")
        self.data = data or build_control_dataset(config.data.name, config.condition, **config.data.kwargs)
        self.evaluation_reward = evaluation_reward
        if self.evaluation_reward is None and config.evaluation is not None:
            self.evaluation_reward = build_named_reward(config.evaluation.name, **config.evaluation.kwargs)
        self.attention.update(set_attention_backend({"evaluation_reward": self.evaluation_reward},
                                                    config.trainer.attention))
        for name, judge in (("reward", self.reward), ("evaluation", self.evaluation_reward)):
            if judge is None:
                continue
            if not isinstance(judge, ConditionReward):
                raise ConfigError(f"Ctrl-U's {name} must predict the condition back from a sample (a "
                                  f"ConditionReward, e.g. name: controllability); got '{judge.name}'")
            if judge.condition.name != config.condition:
                raise ConfigError(f"the {name} model predicts {judge.condition.name} but condition is "
                                  f"{config.condition}; use a {config.condition} model")
            if getattr(self.data, "condition", config.condition) != config.condition:
                raise ConfigError(f"the data holds {self.data.condition} conditions but condition is "
                                  f"{config.condition}")

    def train(self) -> dict[str, float]:
        c = self.config
        per_process, micro_batches = split_batch(c.batch_size, launched_processes(), c.train_batch_size,
                                                 names=("examples per update (batch_size)", "train_batch_size"))
        trainer, start, _ = self.start_training(accumulation_steps=micro_batches, total_updates=c.epochs)
        last: dict[str, float] = {}
        for epoch in trainer.epochs(start, c.epochs):
            tic = time.time()
            plan = self.epoch_plan(trainer, epoch, c.batch_size, samples_per_prompt=1)
            sums: dict[str, float] = {}
            for begin in range(0, per_process, c.train_batch_size):
                rows = plan.local[begin : begin + c.train_batch_size]
                with trainer.accumulate():
                    with trainer.autocast():
                        loss, stats = self.loss(trainer, plan, rows)
                    trainer.backward(loss)
                    trainer.optimizer_step()
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value / micro_batches
            metrics = trainer.mean_across_processes(sums)
            last = self.finish_epoch(trainer, epoch, metrics, {}, tic, c.batch_size)
        return last

    def epoch_plan(self, trainer: Trainer, epoch: int, prompts_per_epoch: int, samples_per_prompt: int) -> EpochPlan:
        """This update's examples: indices into the data's training split (in place of prompts), with seeds."""
        return EpochPlan.make(seed=self.config.trainer.seed, epoch=epoch, num_prompts=self.data.size("train"),
                              prompts_per_epoch=prompts_per_epoch, samples_per_prompt=samples_per_prompt,
                              num_processes=trainer.num_processes, process_index=trainer.process_index)

    def loss(self, trainer: Trainer, plan: EpochPlan, rows: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch (global sample indices `rows` of the plan) and its statistics."""
        c = self.config
        examples = self.data.examples(plan.prompt_index[rows].tolist(), "train")
        seeds = [int(s) for s in plan.seeds[rows]]
        clean = self.generator.encode(examples.samples, seeds=seeds)
        draws = [torch.Generator().manual_seed(s + 1) for s in seeds]
        steps = self.generator.num_train_timesteps
        t = torch.cat([torch.randint(steps, (1,), generator=g) for g in draws])
        noise = torch.stack([torch.randn(clean.shape[1:], generator=g) for g in draws]).to(clean)
        later = (t + 1).clamp(max=steps - 1)
        rewarded = t <= c.max_reward_timestep
        both = self.generator.noised_prediction(
            torch.cat([clean, clean]), _twice(examples).conditions(), torch.cat([t, later]),
            torch.cat([noise, noise]), decode=torch.cat([rewarded, rewarded]),
        )
        diffusion_loss = both.loss.mean()
        n = len(rows)
        reward_loss = uncertainty_mean = torch.zeros((), device=diffusion_loss.device)
        uncertainty_map = None
        if bool(rewarded.any()):
            first, second = self.reward.predict(both.outputs).chunk(2)
            per_example, uncertainty_map = ctrl_u_loss(
                self.reward.condition, first, second, examples.target[rewarded].to(first.device),
                use_uncertainty=c.uncertainty, uncertainty_scale=c.uncertainty_scale,
            )
            # Mean over the whole micro-batch: examples with t > t_max contribute zero, as in the public code.
            reward_loss = per_example.sum() / n
            uncertainty_mean = uncertainty_map.flatten(1).mean(1).sum() / n
        ramp = reward_ramp(trainer.updates, c.ramp_updates)
        loss = diffusion_loss + c.reward_weight * ramp * reward_loss
        if c.uncertainty:
            loss = loss + c.uncertainty_weight * uncertainty_mean
        stats = {"loss": float(loss.detach()), "diffusion_loss": float(diffusion_loss.detach()),
                 "reward_loss": float(reward_loss.detach()), "uncertainty_mean": float(uncertainty_mean.detach()),
                 "rewarded_fraction": float(rewarded.double().mean()), "ramp": ramp}
        return loss, stats

    def evaluate(self, trainer) -> dict[str, float]:
        """Held-out controllability of fixed-seed samples from the first `eval_examples` held-out examples, by the
        training reward model (eval_reward_mean) and by the evaluation model (eval_controllability), sharded
        over the processes (EMA weights if any)."""
        c = self.config
        total = min(c.eval_examples, self.data.size("eval"))
        mine = list(range(trainer.process_index, total, trainer.num_processes))

        def score_shard() -> torch.Tensor:
            if not mine:
                return torch.zeros((0, 2), device=trainer.device)
            examples = self.data.examples(mine, "eval")
            rollout = self.generator.sample(examples.conditions(), self.options,
                                            seeds=[c.eval.seed + i for i in mine], batch_size=c.sampling.batch_size,
                                            return_trajectory=False)
            targets = list(examples.target)
            judged = [self.reward(rollout.outputs, targets).rewards.float()]
            if self.evaluation_reward is not None:
                judged.append(self.evaluation_reward(rollout.outputs, targets).rewards.float())
            else:
                judged.append(torch.full_like(judged[0], float("nan")))
            return torch.stack(judged, dim=1)

        with trainer.ema_weights(), trainer.gathered_weights():  # gathered: shards may be uneven or empty
            scores = on_every_process(trainer, score_shard, what="held-out evaluation")
        scores = gather_rows(trainer, scores.to(trainer.device), mine, total)
        metrics = {"eval_reward_mean": float(scores[:, 0].mean()), "eval_reward_std": float(scores[:, 0].std())}
        if self.evaluation_reward is not None:
            metrics["eval_controllability"] = float(scores[:, 1].mean())
        return metrics


def _twice(examples: ControlExamples) -> ControlExamples:
    """The batch followed by itself (the copies noised at t and at t2)."""
    return ControlExamples(torch.cat([examples.samples] * 2), examples.texts * 2,
                           torch.cat([examples.control] * 2), torch.cat([examples.target] * 2))


# ---------------------------------------------------------------------------------------------------- gallery

@torch.no_grad()
def uncertainty_maps(generator: Generator, reward: ConditionReward, examples: ControlExamples, seeds: list[int],
                     timestep: int, scale: float = 1.0) -> torch.Tensor:
    """U as Ctrl-U's training step sees it: each example noised at `timestep` and `timestep + 1` with the same
    seeded noise, both one-step estimates read by the reward model, u_scale · the condition's uncertainty.
    Returns [B, H, W]."""
    clean = generator.encode(examples.samples, seeds=seeds)
    noise = torch.stack([torch.randn(clean.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    later = min(timestep + 1, generator.num_train_timesteps - 1)
    t = torch.tensor([timestep] * len(seeds) + [later] * len(seeds))
    both = generator.noised_prediction(torch.cat([clean, clean]), _twice(examples).conditions(), t,
                                       torch.cat([noise, noise]).to(clean))
    first, second = reward.predict(both.outputs).chunk(2)
    return scale * reward.condition.uncertainty(first, second)


def _heat(u: torch.Tensor, top: float) -> torch.Tensor:
    """A [H, W] map as a black → red → yellow → white picture [3, H, W], `top` mapped to white."""
    x = (u.float().cpu() / max(top, 1e-12)).clamp(0, 1)
    return torch.stack([(3 * x).clamp(0, 1), (3 * x - 1).clamp(0, 1), (3 * x - 2).clamp(0, 1)])


def write_control_gallery(
    folder: str | Path,
    models: Mapping[str, Generator],
    data: ControlDataset,
    reward: ConditionReward,
    judge: ConditionReward | None,
    options,
    *,
    examples: int = 8,
    samples: int = 2,
    seed: int = 0,
    batch_size: int = 64,
    uncertainty_timestep: int = 200,
    uncertainty_scale: float = 1.0,
    title: str = "Ctrl-U",
) -> Path:
    """Per held-out example: its control image, each model's samples side by side (same seeds; at least two
    models, in order, e.g. base | ControlNet++-style | Ctrl-U), each labelled with its controllability by
    `judge` (the evaluation model; the reward model when None) and by the reward model, and the uncertainty map
    U of the last model at `uncertainty_timestep` (one map per seed, shared colour scale). Returns the index."""
    if len(models) < 2:
        raise ValueError("a control gallery compares at least two models, e.g. {'base': ..., 'ctrl_u': ...}")
    judge = judge or reward
    count = min(examples, data.size("eval"))
    batch = data.examples([i for i in range(count) for _ in range(samples)], "eval")
    seeds = [seed + i for i in range(len(batch))]
    targets = list(batch.target)
    grids: dict[str, list[GallerySample]] = {}
    summary: dict[str, float | str] = {"condition": reward.condition.name, "examples": count,
                                       "samples per example": samples}
    for name, generator in models.items():
        rollout = generator.sample(batch.conditions(), options, seeds=seeds, batch_size=batch_size,
                                   return_trajectory=False)
        judged = judge(rollout.outputs, targets).rewards.float().cpu()
        by_reward = reward(rollout.outputs, targets).rewards.float().cpu()
        grids[name] = [GallerySample(item, reward=float(judged[i]),
                                     labels={"seed": str(seeds[i]), "reward model": f"{float(by_reward[i]):.3f}"})
                       for i, item in enumerate(rollout.outputs.detach().float().cpu())]
        summary[f"controllability {name}"] = float(judged.mean())
        summary[f"reward model {name}"] = float(by_reward.mean())
    last = list(models.values())[-1]
    u = uncertainty_maps(last, reward, batch, seeds, uncertainty_timestep, uncertainty_scale)
    top = float(u.max())
    summary[f"mean U ({list(models)[-1]}, t = {uncertainty_timestep})"] = float(u.mean())
    heat = [GallerySample(_heat(m, top), labels={"mean U": f"{float(m.mean()):.3g}"}) for m in u]
    names = list(models)
    rows = []
    for e in range(count):
        part = slice(e * samples, (e + 1) * samples)
        rows.append(PromptRow(
            batch.texts[e * samples], grids[names[0]][part], grids[names[1]][part], sides=(names[0], names[1]),
            more=[*((name, grids[name][part]) for name in names[2:]), (f"uncertainty_{names[-1]}", heat[part])],
            figures=[("control", _to_pil(batch.control[e * samples]))],
        ))
    return write_gallery(folder, rows, title=title, summary=summary)


def _to_pil(picture: torch.Tensor, min_side: int = 128):
    shown = to_pil(picture.float().cpu())
    factor = max(1, min_side // min(shown.size))
    return shown.resize((shown.width * factor, shown.height * factor), resample=0)  # nearest: crisp pixels
