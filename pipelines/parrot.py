"""Parrot — Pareto-optimal multi-reward RL for text-to-image (Lee et al., ECCV 2024; spec ../shared/specs/parrot.md).

Every epoch, for each prompt c the prompt-expansion network (PEN, optional) writes one expansion ĉ per sample,
with the identifier "<reward k>" of the reward k that sample serves (the samples of a prompt cycle through the K
rewards); the generator samples from ĉ (from c without a PEN) and the K rewards score each output against c, the
prompt the user wrote. Batch-wise Pareto selection keeps the non-dominated samples P of the [N, K] reward matrix;
only they get gradient:

    ∇J_θ = (1/|P|) Σ_{i∈P} credit_i · Σ_t ∇_θ log p_θ(x^i_{t−1} | x^i_t, ĉ_i)
    ∇J_φ = (1/|P|) Σ_{i∈P} credit_i · ∇_φ log p_φ(ĉ_i | c_i, <reward k_i>)

credit_i is the served reward r_{k_i}(x_i) with a PEN, and Σ_k r_k(x_i) without one (every sample serves every
reward). `normalization: none` uses the raw rewards, the paper's REINFORCE form (it needs positive rewards); the
default normalises each reward within its prompt's group, as DDPO does. `policy_loss: ppo` replaces log p by
DDPO's clipped importance ratio, for several updates per epoch. `selection: all` with `weights` is the fixed
weighted-sum baseline: the same policy gradient on every sample with credit Σ_k w_k·a_k.

At inference the PEN reads all K identifiers, and original-prompt-centred guidance mixes the two texts:
ε̄ = w1·ε(c) + (1 − w1 − w2)·ε(∅) + w2·ε(ĉ) (the generator's `expansion_guidance_scale` w2, its `guidance_scale`
w1). The T2I side trains the UNet's cross-attention (`trainer.finetune_only: [attn2]` with LoRA off, the paper's
choice) or LoRA adapters; the PEN is fully fine-tuned, or trained through LoRA (`pen.lora`), in its own parameter
group.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch

from genalign.config import AtLeast, ConfigError, NonNegativeInt, PositiveFloat, PositiveInt
from genalign.engine import EpochPlan, Pipeline, PipelineConfig, SamplingConfig, evaluate, reward_metrics
from genalign.gallery import PromptRow, write_gallery
from genalign.generators.base import Conditions, Generator, Trajectory
from genalign.generators.prompt_expansion import Expansion, PromptExpansionNetwork
from genalign.trainer import LoRAConfig, ParameterGroup, Trainer, add_lora, trained_weights_file
from genalign.writers import gallery_samples, gold_label
from pipelines.ddpo import ddpo_loss
from rewards.pareto import hypervolume, non_dominated_mask


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class PENConfig:
    """The prompt-expansion network: a causal LM folder or hub id (null: none, "Parrot, T2I only")."""

    pretrained: str | None = None
    train: bool = True  # REINFORCE it jointly with the generator; false keeps it frozen
    learning_rate: Annotated[float, AtLeast(0)] = 3e-4
    # Full fine-tuning of the PEN by default (a tiny LM); enable for a hub LM (GPT-2 names its projections c_attn).
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(enabled=False, rank=8, alpha=8.0,
                                                                target_modules=["c_attn"]))
    dtype: Literal["float32", "float64"] = "float32"
    temperature: PositiveFloat | None = None  # null: the PEN's own
    greedy_at_inference: bool = False  # evaluation and galleries: argmax expansions instead of seeded samples


@dataclass
class ParrotConfig(PipelineConfig):
    pipeline: Literal["parrot"] = "parrot"
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(log_prob_reduction="mean"))
    prompts_per_epoch: PositiveInt = 8
    samples_per_prompt: PositiveInt = 8
    train_batch_size: PositiveInt = 8
    timestep_fraction: float = 1.0
    selection: Literal["pareto", "all"] = "pareto"
    pareto_scope: Literal["batch", "prompt"] = "batch"  # the paper selects over the whole batch
    normalization: Literal["none", "batch", "prompt"] = "prompt"
    weights: list[float] = field(default_factory=list)  # per reward, multiplies its credit; empty: all 1
    policy_loss: Literal["reinforce", "ppo"] = "reinforce"
    updates_per_epoch: PositiveInt = 1
    clip_range: PositiveFloat = 1e-4
    adv_clip_max: PositiveFloat = 5.0
    hypervolume_reference: list[float] = field(default_factory=list)  # a corner below every reward vector; logs HV
    pen: PENConfig = field(default_factory=PENConfig)
    gallery_prompts: NonNegativeInt = 8  # end of training, with a PEN: run_dir/expansions/index.html
    gallery_samples: PositiveInt = 2


# --------------------------------------------------------------------------------------------- selection and credit


def pareto_selection(rewards: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """[N] bool: the non-dominated rows of the [N, K] reward matrix (higher is better in every column); with
    `groups` [N], non-dominated within each group."""
    if groups is None:
        return non_dominated_mask(rewards)
    selected = torch.zeros(len(rewards), dtype=torch.bool, device=rewards.device)
    for group in torch.unique(groups):
        rows = torch.nonzero(groups == group).flatten()
        selected[rows] = non_dominated_mask(rewards[rows])
    return selected


def normalized_rewards(rewards: torch.Tensor, groups: torch.Tensor, normalization: str,
                       eps: float = 1e-6) -> torch.Tensor:
    """[N, K] float64: each reward as is ("none"), or standardised over the batch ("batch") or within each
    prompt's group ("prompt"; a group with zero spread in a reward gets 0 for it)."""
    values = rewards.double()
    if normalization == "none":
        return values
    if normalization == "batch":
        return (values - values.mean(0)) / (values.std(0, unbiased=False) + eps)
    out = torch.zeros_like(values)
    for group in torch.unique(groups):
        rows = groups == group
        chunk = values[rows]
        out[rows] = (chunk - chunk.mean(0)) / (chunk.std(0, unbiased=False) + eps)
    return out


def parrot_credit(
    rewards: torch.Tensor,
    groups: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    selection: str = "pareto",
    pareto_scope: str = "batch",
    normalization: str = "prompt",
    weights: torch.Tensor | None = None,
    clip: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's policy-gradient weight and whether it is selected.

    Args:
        rewards: [N, K] raw rewards (Pareto dominance is read on them).
        groups: [N] prompt index of each sample.
        targets: [N] the 0-based reward each sample's expansion served, or None (each serves all K).
        weights: [K] per-reward factors (the weighted-sum baseline); None = 1.
    Returns:
        (credit [N] float64, zero outside the selection; selected [N] bool).
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [N, K], got shape {tuple(rewards.shape)}")
    if selection == "pareto":
        selected = pareto_selection(rewards, groups if pareto_scope == "prompt" else None)
    else:
        selected = torch.ones(len(rewards), dtype=torch.bool, device=rewards.device)
    advantages = normalized_rewards(rewards, groups, normalization)
    if weights is not None:
        advantages = advantages * weights.to(advantages)
    if targets is None:
        credit = advantages.sum(1)
    else:
        credit = advantages.gather(1, targets.long().view(-1, 1).to(advantages.device)).squeeze(1)
    credit = credit.clamp(-clip, clip)
    return torch.where(selected, credit, torch.zeros_like(credit)), selected


# --------------------------------------------------------------------------------------------- the pipeline


class ParrotPipeline(Pipeline):
    """Parrot on any generator with per-step log-probs, with a multi-objective ([B, K]) reward from `rewards`
    (e.g. `stack`), optionally with a jointly trained prompt-expansion network."""

    config_class = ParrotConfig

    def __init__(self, config: ParrotConfig, generator: Generator | None = None, reward=None,
                 expander: PromptExpansionNetwork | None = None) -> None:
        super().__init__(config, generator, reward)
        c = config
        self.num_rewards = len(self.reward.objectives)
        self.pen = expander
        if self.pen is None and c.pen.pretrained:
            self.pen = PromptExpansionNetwork.from_pretrained(c.pen.pretrained, torch_dtype=_DTYPES[c.pen.dtype])
        if self.pen is not None:
            prepare_expander(self.pen, c.pen, self.num_rewards)
            self.attention.update({f"pen.{k}": v for k, v in self.pen.set_attention_backend(c.trainer.attention).items()})
        self._validate()
        self.train_options = self.options
        if hasattr(self.options, "expansion_guidance_scale"):
            # Training samples condition on the expansion alone; the centred guidance is for inference.
            self.train_options = dataclasses.replace(self.options, expansion_guidance_scale=0.0)

    def _validate(self) -> None:
        c = self.config
        if c.weights and len(c.weights) != self.num_rewards:
            raise ConfigError(f"weights has {len(c.weights)} entries for {self.num_rewards} rewards "
                              f"{list(self.reward.objectives)}; give one per reward (or none)")
        if c.hypervolume_reference and len(c.hypervolume_reference) != self.num_rewards:
            raise ConfigError(f"hypervolume_reference has {len(c.hypervolume_reference)} entries for "
                              f"{self.num_rewards} rewards; give one corner value per reward (or none)")
        if self.num_rewards < 2 and c.selection == "pareto":
            raise ConfigError(f"Pareto selection needs several rewards, and reward {self.reward.name!r} has one "
                              "objective; stack rewards (reward.name: stack) or use selection: all")
        if c.policy_loss == "reinforce" and c.updates_per_epoch != 1:
            raise ConfigError("policy_loss 'reinforce' takes one update per batch of samples: set "
                              "updates_per_epoch=1, or policy_loss=ppo for several")
        if not 0 < c.timestep_fraction <= 1:
            raise ConfigError(f"timestep_fraction must be in (0, 1], got {c.timestep_fraction}")
        if self.pen is not None and c.samples_per_prompt < self.num_rewards:
            raise ConfigError(f"with a PEN each prompt's samples cycle through the {self.num_rewards} rewards' "
                              f"identifiers: set samples_per_prompt ≥ {self.num_rewards}")
        w2 = getattr(self.options, "expansion_guidance_scale", 0.0)
        if self.pen is None and w2:
            raise ConfigError(f"sampling.expansion_guidance_scale={w2:g} guides toward PEN expansions, and no PEN "
                              "is configured; set pen.pretrained or remove sampling.expansion_guidance_scale")

    # ------------------------------------------------------------------ expansions
    def targets(self, plan: EpochPlan) -> np.ndarray:
        """[N] the 0-based reward each global sample serves: a prompt's samples cycle through the rewards."""
        return np.arange(len(plan)) % self.config.samples_per_prompt % self.num_rewards

    def expand(self, prompts: list[str], rewards: list[tuple[int, ...]], seeds: list[int],
               greedy: bool = False) -> Expansion:
        self.pen.to(self.generator.device)
        return self.pen.expand(prompts, rewards, seeds=seeds, greedy=greedy,
                               batch_size=self.config.sampling.batch_size)

    def inference_conditions(self, prompts: list[str], seeds: list[int]) -> Conditions:
        """The prompts with their PEN expansions (all reward identifiers), for centred guidance."""
        every_reward = tuple(range(1, self.num_rewards + 1))
        expansion = self.expand(prompts, [every_reward] * len(prompts), seeds, self.config.pen.greedy_at_inference)
        return Conditions(texts=prompts, expanded_texts=expansion.texts)

    def evaluate(self, trainer) -> dict[str, float]:
        """Held-out rewards (and gold) against the original prompts; with a PEN, sampled with its expansions and
        the configured guidance."""
        if self.pen is None:
            return super().evaluate(trainer)
        c = self.config
        with trainer.ema_weights():
            return evaluate(self.generator, self.reward, self.eval_prompts, self.options,
                            samples_per_prompt=c.eval.samples_per_prompt, seed=c.eval.seed,
                            batch_size=c.sampling.batch_size, trainer=trainer, gold=self.gold,
                            conditions=self.inference_conditions)

    # ------------------------------------------------------------------ training
    def train(self) -> dict[str, float]:
        c = self.config
        steps = self.trainable_steps()
        n_train_steps = max(1, round(c.timestep_fraction * len(steps)))
        extra = {}
        if self.pen is not None and c.pen.train:
            extra["pen"] = ParameterGroup(self.pen.trainable_parameters(), c.pen.learning_rate)
        trainer, start, _ = self.start_training(accumulation_steps=1, total_updates=c.epochs * c.updates_per_epoch,
                                                extra_parameters=extra)
        weights = torch.tensor(c.weights, dtype=torch.float64) if c.weights else None
        last: dict[str, float] = {}
        for epoch in trainer.epochs(start, c.epochs):
            tic = time.time()
            plan = self.epoch_plan(trainer, epoch, c.prompts_per_epoch, c.samples_per_prompt)
            targets = self.targets(plan)
            # 1. Expansions (one per sample, serving its reward), then samples from them, scored against c.
            expansion = conditions = None
            if self.pen is not None:
                prompts = self.conditions(plan, plan.local).texts
                seeds = [int(plan.stream("expansion", g).integers(2**31 - 1)) for g in plan.local]
                expansion = self.expand(prompts, [(int(targets[g]) + 1,) for g in plan.local], seeds)
                conditions = Conditions(texts=expansion.texts)
            samples = self.sample_and_score(trainer, plan, self.train_options, conditions)
            scores = samples.global_scores.reshape(len(plan), -1).cpu()
            # 2. Batch-wise Pareto selection and each selected sample's credit (the same on every process).
            credit, selected = parrot_credit(
                scores, torch.as_tensor(plan.prompt_index), None if self.pen is None else torch.as_tensor(targets),
                selection=c.selection, pareto_scope=c.pareto_scope, normalization=c.normalization, weights=weights,
                clip=c.adv_clip_max if c.normalization != "none" else math.inf,
            )
            # 3. Policy gradient on the selected samples only (and the PEN on its first update).
            stats = [self.update(trainer, samples.rollout.trajectory, expansion, plan, credit, selected, steps,
                                 n_train_steps, u) for u in range(c.updates_per_epoch)]
            metrics = {
                **reward_metrics(scores, self.reward.objectives),
                **{key: float(np.mean([s[key] for s in stats])) for key in stats[0]},
                "pareto_fraction": float(non_dominated_mask(scores).double().mean()),
                "selected_fraction": float(selected.double().mean()),
            }
            if c.hypervolume_reference:
                metrics["hypervolume"] = hypervolume(scores, torch.tensor(c.hypervolume_reference))
            if expansion is not None:
                metrics["expansion_tokens"] = float(expansion.mask.sum(1).double().mean())
            last = self.finish_epoch(trainer, epoch, metrics, {}, tic, len(plan))
        if self.pen is not None and trainer.is_main:
            self.pen.reward_names = list(self.reward.objectives)
            with trainer.ema_weights():
                self.pen.save_pretrained(trainer.run_dir / "pen")
                if c.gallery_prompts:
                    self.write_expansion_gallery(trainer.run_dir / "expansions")
        trainer.accelerator.wait_for_everyone()
        return last

    def update(self, trainer: Trainer, trajectory: Trajectory, expansion: Expansion | None, plan: EpochPlan,
               credit: torch.Tensor, selected: torch.Tensor, steps: np.ndarray, n_train_steps: int,
               update: int) -> dict[str, float]:
        """One optimiser update: Σ credit · Σ_t log p over this process's selected samples, normalised so that the
        processes together take (1/|P|) Σ_{i∈P}; then the PEN's REINFORCE term (first update of an epoch).

        Every process runs as many micro-batches as the one holding the most selected samples (zero-weight passes
        keep the distributed collectives in step); unselected samples never enter a forward pass.
        """
        c = self.config
        processes, rank = trainer.num_processes, trainer.process_index
        total = int(selected.sum())
        is_selected = selected.numpy()
        mine = np.flatnonzero(is_selected[plan.local])  # local rows of the selected samples
        most = max(int(is_selected[plan.order[p::processes]].sum()) for p in range(processes))
        scale = processes / total
        sums = {"policy_loss": 0.0, "clipfrac": 0.0}
        passes = 0
        for b in range(math.ceil(most / c.train_batch_size)):
            rows = mine[b * c.train_batch_size : (b + 1) * c.train_batch_size]
            weight = 1.0
            if len(rows) == 0:
                rows, weight = np.zeros(1, dtype=np.int64), 0.0
            batch = trajectory[torch.as_tensor(rows)]
            global_index = plan.local[rows]
            advantage = (credit[torch.as_tensor(global_index)] * (weight * scale)).to(trainer.device)
            train_steps = np.stack([plan.stream("timesteps", g, update).permutation(steps)[:n_train_steps]
                                    for g in global_index])
            for j in range(n_train_steps):
                step_index = torch.as_tensor(train_steps[:, j])
                old = batch.log_probs[torch.arange(len(batch)), step_index.to(batch.log_probs.device)]
                with trainer.autocast():
                    log_prob = self.generator.step_log_prob(batch, step_index)
                # ddpo_loss means over the micro-batch; the sum over samples is what the credit is scaled for.
                loss, s = ddpo_loss(log_prob, old.to(log_prob.device), advantage, c.clip_range,
                                    "is" if c.policy_loss == "ppo" else "sf")
                trainer.backward(loss * len(rows))
                sums["policy_loss"] += float(loss.detach()) * len(rows)
                sums["clipfrac"] += float(s["clipfrac"]) * weight
                passes += weight
        if expansion is not None and c.pen.train and update == 0:
            for b in range(0, len(mine), c.train_batch_size):
                rows = mine[b : b + c.train_batch_size]
                log_prob = self.pen.log_prob(expansion[torch.as_tensor(rows)])
                advantage = (credit[torch.as_tensor(plan.local[rows])] * scale).to(log_prob.device)
                pen_loss = -(advantage * log_prob).sum()
                trainer.backward(pen_loss)
                sums["pen_loss"] = sums.get("pen_loss", 0.0) + float(pen_loss.detach())
        trainer.optimizer_step()
        sums.setdefault("pen_loss", 0.0)
        sums["passes"] = float(passes)
        # Each process's losses carry the factor P of `scale` that DDP's gradient mean takes out: their mean over
        # processes is the loss of the whole batch.
        reduced = trainer.mean_across_processes(sums)
        out = {"policy_loss": reduced["policy_loss"],
               "clipfrac": reduced["clipfrac"] / max(reduced["passes"], 1.0)}
        if expansion is not None and c.pen.train:
            out["pen_loss"] = reduced["pen_loss"]
        return out

    # ------------------------------------------------------------------ gallery
    def write_expansion_gallery(self, folder: Path) -> Path:
        """Per held-out prompt: the prompt, its expansions, and samples from the expansion alone beside samples
        with original-prompt-centred guidance (same expansion and seed), each with every reward and the gold
        verdict."""
        c = self.config
        prompts = self.eval_prompts[: c.gallery_prompts]
        batch = [p for p in prompts for _ in range(c.gallery_samples)]
        seeds = [c.eval.seed + i for i in range(len(batch))]
        centred = self.inference_conditions(batch, seeds)
        w2 = getattr(self.options, "expansion_guidance_scale", 0.0) or 5.0
        sides = {
            "expansion_only": (Conditions(texts=centred.expanded_texts), self.train_options),
            "centred_guidance": (centred, dataclasses.replace(self.options, expansion_guidance_scale=w2)),
        }
        samples = {}
        summary: dict[str, float | str] = {"guidance w1": float(self.options.guidance_scale), "guidance w2": w2}
        for side, (conditions, options) in sides.items():
            rollout = self.generator.sample(conditions, options, seeds=seeds, batch_size=c.sampling.batch_size,
                                            return_trajectory=False)
            scores = self.reward(rollout.outputs, batch).rewards.float().reshape(len(batch), -1).cpu()
            verdicts = {k: v.cpu() for k, v in self.gold(rollout.outputs, batch).items()} if self.gold else {}
            labels = []
            for i in range(len(batch)):
                label = {"expansion": centred.expanded_texts[i], "seed": str(seeds[i])}
                label.update({name: f"{float(scores[i, k]):.3g}" for k, name in enumerate(self.reward.objectives)})
                if verdicts:
                    label["gold"] = gold_label({k: float(v[i]) for k, v in verdicts.items()})
                labels.append(label)
            samples[side] = gallery_samples(rollout, self.generator, scores.sum(1).tolist(), labels)
            for k, name in enumerate(self.reward.objectives):
                summary[f"{name} {side}"] = float(scores[:, k].mean())
            for key, value in verdicts.items():
                summary[f"gold {key} {side}"] = float(value.mean())
        n = c.gallery_samples
        rows = [PromptRow(prompt, samples["expansion_only"][p * n : (p + 1) * n],
                          samples["centred_guidance"][p * n : (p + 1) * n], sides=tuple(sides))
                for p, prompt in enumerate(prompts)]
        return write_gallery(folder, rows, title="Parrot: expansions, without and with original-prompt-centred "
                             "guidance", summary=summary)


def prepare_expander(pen: PromptExpansionNetwork, config: PENConfig, num_rewards: int) -> None:
    """Reward identifiers for every reward, the configured temperature, and what trains (full or LoRA)."""
    pen.ensure_reward_tokens(num_rewards)
    if config.temperature is not None:
        pen.temperature = config.temperature
    pen.model.requires_grad_(False)
    if config.train:
        if config.lora.enabled:
            add_lora(pen.model, config.lora)
        else:
            pen.model.requires_grad_(True)
    pen.model.eval()


def load_trained_expander(config: ParrotConfig, checkpoint: str | Path | None, num_rewards: int, *,
                          use_ema: bool = True) -> PromptExpansionNetwork | None:
    """A Parrot run's PEN with the weights of `checkpoint` (its `extra.pen.*` tensors; the EMA ones when the run
    kept an EMA and `use_ema`, as for its generator), or the base PEN for None; None when the run has no PEN."""
    if not config.pen.pretrained:
        return None
    from safetensors.torch import load_file

    pen = PromptExpansionNetwork.from_pretrained(config.pen.pretrained, torch_dtype=_DTYPES[config.pen.dtype])
    prepare_expander(pen, config.pen, num_rewards)
    if checkpoint is not None and config.pen.train:
        state = load_file(str(trained_weights_file(checkpoint, use_ema)))
        parameters = pen.trainable_parameters()
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(state[f"extra.pen.{name}"].to(parameter.dtype))
    return pen
