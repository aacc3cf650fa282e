"""DRAGON — Distributional Rewards Optimize Diffusion Generative Models (Bai et al., TMLR 2025; spec
../shared/specs/dragon.md).

Every round the current model generates on-policy demonstrations (optionally with fewer denoising steps than
evaluation), the reward scores them, a set-construction strategy splits them into a positive set D+ and a negative
set D−, and a preference loss against the frozen reference pulls the model toward D+ and away from D−:

- Diffusion-DPO (paired; Wallace et al. 2023): with the same t and noise for winner w and loser l,
  Δ = (‖ε − ε_θ(x_t^w)‖² − ‖ε − ε_ref(x_t^w)‖²) − (‖ε − ε_θ(x_t^l)‖² − ‖ε − ε_ref(x_t^l)‖²), L = −log σ(−β Δ).
- Diffusion-KTO (unpaired; Li et al. 2024): g = ‖ε − ε_ref‖² − ‖ε − ε_θ‖², z = the batch mean of g (no gradient),
  h = σ(β (g − z)) on D+ and σ(−β (g − z)) on D−, L = λ (1 − h).

The reference is the generator's `reference()` (LoRA adapters disabled; no second copy of the model). Instance and
instance-to-distribution rewards use the `paired` (best vs worst of each prompt) or `unpaired` (global top/bottom)
strategies on per-sample scores; set-level rewards use `two_sets`, `leave_one_out` or `greedy`, which call the
reward on subsets of the round's outputs (its `set_score`, or the mean reward for an instance reward).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from genalign.config import ConfigError, NonNegativeInt, PositiveFloat, PositiveInt
from genalign.engine import Pipeline, PipelineConfig, gather_in_order, gather_trajectory, reward_metrics, total_reward
from genalign.gallery import PromptRow, write_gallery
from genalign.generators.base import Generator, Trajectory
from genalign.trainer import Trainer
from genalign.writers import subset_gallery_samples

Strategy = Literal["paired", "unpaired", "two_sets", "leave_one_out", "greedy"]
SET_STRATEGIES = ("two_sets", "leave_one_out", "greedy")


@dataclass
class DRAGONConfig(PipelineConfig):
    pipeline: Literal["dragon"] = "dragon"
    prompts_per_epoch: PositiveInt = 4  # prompts per round (an epoch is one round)
    samples_per_prompt: PositiveInt = 4
    demo_steps: PositiveInt | None = None  # denoising steps of the demonstrations; null: sampling.num_inference_steps
    construction: Strategy = "paired"
    positive_fraction: float = 0.5  # unpaired, leave_one_out, greedy: |D+| = ⌊fraction · N⌋ (and |D−| for the splits)
    loss: Literal["dpo", "kto"] = "dpo"
    beta: PositiveFloat = 1000.0
    kto_desirable_weight: PositiveFloat = 1.0  # λ on D+
    kto_undesirable_weight: PositiveFloat = 1.0  # λ on D−
    updates_per_epoch: PositiveInt = 1  # optimiser updates per round on the same demonstrations
    train_batch_size: PositiveInt = 4  # pairs (DPO) or samples (KTO) per model call
    demo_gallery_round: NonNegativeInt | None = 0  # this round's D+ and D− go to run_dir/demonstrations (null: none)


# --------------------------------------------------------------------------------------------- losses


def diffusion_dpo_loss(
    policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO on K pairs.

    Args:
        policy_w, policy_l: [K] denoising errors ‖ε − ε_θ(x_t, t)‖² of winners and losers (same t and ε per pair).
        ref_w, ref_l: [K] the same errors under the reference model.
    Returns:
        (mean of −log σ(−β Δ), stats: the fraction of pairs the policy already ranks right (Δ < 0), mean Δ).
    """
    delta = (policy_w - ref_w) - (policy_l - ref_l)
    loss = -F.logsigmoid(-beta * delta).mean()
    return loss, {"implicit_accuracy": (delta.detach() < 0).float().mean(), "delta_mean": delta.detach().mean()}


def diffusion_kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-KTO on M unpaired samples.

    Args:
        policy, reference: [M] denoising errors under the policy and the reference.
        desirable: [M] bool, True for D+.
    Returns:
        (mean of λ (1 − h), stats: mean g on D+ and on D−, the reference point z).
    """
    g = reference - policy
    z = g.detach().mean()
    h = torch.where(desirable, torch.sigmoid(beta * (g - z)), torch.sigmoid(-beta * (g - z)))
    weight = torch.where(desirable, torch.full_like(h, desirable_weight), torch.full_like(h, undesirable_weight))
    loss = (weight * (1 - h)).mean()
    nan = torch.tensor(float("nan"))
    stats = {
        "kto_g_positive": g.detach()[desirable].mean() if desirable.any() else nan,
        "kto_g_negative": g.detach()[~desirable].mean() if (~desirable).any() else nan,
        "kto_z": z,
    }
    return loss, stats


# ------------------------------------------------------------------------------- set construction


@dataclass
class Demonstrations:
    """One round's split of N samples (global indices).

    Attributes:
        positive: [P] D+, best first.
        negative: [Q] D−, worst first.
        pairs: [K, 2] (winner, loser) rows for DPO; strategies without a natural pairing pair the i-th best
            positive with the i-th worst negative.
    """

    positive: torch.Tensor
    negative: torch.Tensor
    pairs: torch.Tensor

    @classmethod
    def from_sets(cls, positive: torch.Tensor, negative: torch.Tensor) -> "Demonstrations":
        k = min(len(positive), len(negative))
        return cls(positive, negative, torch.stack([positive[:k], negative[:k]], dim=1))


def _descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices by score, best first; ties keep index order (so every strategy is deterministic)."""
    return torch.sort(scores, descending=True, stable=True).indices


def paired_per_prompt(scores: torch.Tensor, samples_per_prompt: int) -> Demonstrations:
    """Per prompt, its best sample wins against its worst (first index among ties); prompts whose samples all
    score the same give no pair.

    Args:
        scores: [N] per-sample scores, prompt after prompt (N = prompts · samples_per_prompt).
    """
    grouped = scores.view(-1, samples_per_prompt)
    offsets = torch.arange(grouped.shape[0]) * samples_per_prompt
    best = torch.sort(grouped, dim=1, descending=True, stable=True).indices[:, 0]
    worst = torch.sort(grouped, dim=1, descending=False, stable=True).indices[:, 0]
    keep = grouped.max(dim=1).values > grouped.min(dim=1).values
    pairs = torch.stack([best + offsets, worst + offsets], dim=1)[keep]
    return Demonstrations(pairs[:, 0], pairs[:, 1], pairs)


def global_split(scores: torch.Tensor, fraction: float) -> Demonstrations:
    """The top ⌊fraction · N⌋ samples form D+ and the bottom as many D− (at most N // 2 each). Samples scoring
    exactly the boundary value on both sides carry no preference and are left out of both sets."""
    n = len(scores)
    k = min(int(math.floor(fraction * n)), n // 2)
    order = _descending(scores)
    positive, negative = order[:k], order[n - k :].flip(0)
    if k and scores[positive[-1]] == scores[negative[-1]]:
        tie = scores[positive[-1]]
        positive, negative = positive[scores[positive] != tie], negative[scores[negative] != tie]
    return Demonstrations.from_sets(positive, negative)


SetScore = Callable[[torch.Tensor], float]


def two_set_comparison(set_score: SetScore, samples_per_prompt: int, num_samples: int) -> Demonstrations:
    """Split each prompt's samples alternately into D1 and D2 (so both cover every prompt), and label the set
    with the better set score positive; equal scores give no demonstrations. Pairs are the two sets' samples of
    the same prompt. An odd sample per prompt is left out."""
    position = torch.arange(num_samples) % samples_per_prompt
    usable = position < samples_per_prompt - samples_per_prompt % 2
    first = torch.nonzero(usable & (position % 2 == 0)).flatten()
    second = first + 1
    score_1, score_2 = set_score(first), set_score(second)
    if score_1 == score_2:
        empty = torch.empty(0, dtype=torch.long)
        return Demonstrations(empty, empty, torch.empty(0, 2, dtype=torch.long))
    positive, negative = (first, second) if score_1 > score_2 else (second, first)
    return Demonstrations(positive, negative, torch.stack([positive, negative], dim=1))


def leave_one_out_credit(set_score: SetScore, num_samples: int) -> torch.Tensor:
    """[N] marginal credit of each sample: R(all) − R(all without it)."""
    everything = torch.arange(num_samples)
    total = set_score(everything)
    return torch.tensor([total - set_score(everything[everything != i]) for i in range(num_samples)],
                        dtype=torch.float64)


def greedy_positive_set(set_score: SetScore, num_samples: int, size: int) -> Demonstrations:
    """Grow D+ greedily: start from the pair with the best set score (set rewards such as a Fréchet distance need
    two points), then add the sample that gives the best set score until |D+| = size; D− is the rest, in the
    reverse order of their score when added alone to the final D+ (worst first). Ties go to the lower index."""
    if not 2 <= size < num_samples:
        raise ValueError(f"greedy D+ needs 2 ≤ size < N; got size {size} of {num_samples} samples")
    best_pair, best = None, -math.inf
    for i in range(num_samples):
        for j in range(i + 1, num_samples):
            value = set_score(torch.tensor([i, j]))
            if value > best:
                best_pair, best = [i, j], value
    chosen = list(best_pair)
    while len(chosen) < size:
        rest = [i for i in range(num_samples) if i not in chosen]
        gains = [set_score(torch.tensor(chosen + [i])) for i in rest]
        chosen.append(rest[int(np.argmax(gains))])
    rest = [i for i in range(num_samples) if i not in chosen]
    added = torch.tensor([set_score(torch.tensor(chosen + [i])) for i in rest], dtype=torch.float64)
    negative = torch.tensor(rest)[torch.sort(added, stable=True).indices]
    return Demonstrations.from_sets(torch.tensor(chosen), negative)


# --------------------------------------------------------------------------------------------- pipeline


class DRAGONPipeline(Pipeline):
    """DRAGON on a diffusion generator (images or audio) with any reward from `rewards`: instance,
    instance-to-distribution or distribution-to-distribution."""

    config_class = DRAGONConfig
    # Not DeepSpeed: an update's micro-batches are backward calls outside trainer.accumulate() (their number
    # varies by round), and the engine would step after each.
    sharding_strategies = ("fsdp",)

    def __init__(self, config: DRAGONConfig, generator: Generator | None = None, reward=None) -> None:
        super().__init__(config, generator, reward)
        c = config
        if not hasattr(self.generator, "denoising_error"):
            raise ConfigError(f"DRAGON's losses compare denoising errors; {type(self.generator).__name__} has no "
                              "denoising_error (use a diffusion model)")
        if c.construction == "paired" and c.samples_per_prompt < 2:
            raise ConfigError("construction 'paired' compares a prompt's samples: set samples_per_prompt ≥ 2")
        if c.construction == "two_sets" and c.samples_per_prompt < 2:
            raise ConfigError("construction 'two_sets' splits each prompt's samples in two: samples_per_prompt ≥ 2")
        kind = getattr(self.reward, "kind", "instance")
        if kind == "distribution_to_distribution" and c.construction not in SET_STRATEGIES:
            raise ConfigError(f"reward {self.reward.name!r} scores whole sets, so construction {c.construction!r} has no "
                              f"per-sample scores to split; use one of {list(SET_STRATEGIES)}")
        if not 0 < c.positive_fraction <= 0.5:
            raise ConfigError(f"positive_fraction must be in (0, 0.5], got {c.positive_fraction}")
        self.demo_options = self.options
        if c.demo_steps is not None:
            self.demo_options = replace(self.options, num_inference_steps=c.demo_steps)

    def train(self) -> dict[str, float]:
        c = self.config
        trainer, start, _ = self.start_training(accumulation_steps=1, total_updates=c.epochs * c.updates_per_epoch,
                                                keep_reference=True)
        last: dict[str, float] = {}
        for epoch in trainer.epochs(start, c.epochs):
            tic = time.time()
            plan = self.epoch_plan(trainer, epoch, c.prompts_per_epoch, c.samples_per_prompt)
            # 1. On-policy demonstrations from the current model, scored.
            samples = self.sample_and_score(trainer, plan, self.demo_options)
            scores = total_reward(samples.global_scores).cpu()
            trajectory = gather_trajectory(trainer, samples.rollout.trajectory, plan)
            # 2. D+ and D−.
            outputs = None
            if c.construction in SET_STRATEGIES or epoch == c.demo_gallery_round:
                outputs = gather_in_order(trainer, samples.rollout.outputs, plan)
            demos, set_metrics = self.demonstrations(samples, outputs, scores)
            if epoch == c.demo_gallery_round and trainer.is_main:
                self.write_demonstrations(trainer.run_dir / "demonstrations" / f"round_{epoch:04d}", samples,
                                          outputs, scores, demos)
            # 3. Preference updates against the reference.
            update_stats = [self.update(trainer, trajectory, demos, epoch, k) for k in range(c.updates_per_epoch)]
            metrics = {
                **reward_metrics(samples.global_scores, self.reward.objectives),
                **{key: float(np.nanmean([s.get(key, math.nan) for s in update_stats]))
                   for key in dict.fromkeys(k for s in update_stats for k in s)},
                **set_metrics,
                "positives": len(demos.positive),
                "negatives": len(demos.negative),
                "pairs": len(demos.pairs),
                "positive_reward_mean": float(scores[demos.positive].mean()) if len(demos.positive) else math.nan,
                "negative_reward_mean": float(scores[demos.negative].mean()) if len(demos.negative) else math.nan,
            }
            last = self.finish_epoch(trainer, epoch, metrics, {}, tic, len(plan))
        return last

    def demonstrations(self, samples, outputs: torch.Tensor | None, scores: torch.Tensor
                       ) -> tuple[Demonstrations, dict]:
        """This round's D+ / D− by the configured strategy, and what the strategy measured on the way.

        Args:
            outputs: every process's outputs in global order (needed by the set strategies).
            scores: [N] per-sample rewards in global order.
        """
        c = self.config
        n = len(scores)
        if c.construction == "paired":
            return paired_per_prompt(scores, c.samples_per_prompt), {}
        if c.construction == "unpaired":
            return global_split(scores, c.positive_fraction), {}
        set_score = self._set_scorer(samples, outputs, scores)
        if c.construction == "two_sets":
            demos = two_set_comparison(set_score, c.samples_per_prompt, n)
        elif c.construction == "leave_one_out":
            demos = global_split(leave_one_out_credit(set_score, n), c.positive_fraction)
        else:
            demos = greedy_positive_set(set_score, n, max(2, int(math.floor(c.positive_fraction * n))))
        metrics = {"set_score_all": set_score(torch.arange(n))}
        if len(demos.positive) >= 2 and len(demos.negative) >= 2:
            metrics.update(set_score_positive=set_score(demos.positive), set_score_negative=set_score(demos.negative))
        return demos, metrics

    def _set_scorer(self, samples, outputs: torch.Tensor, scores: torch.Tensor) -> SetScore:
        """R(subset of the round's samples), the same on every process (it sees every process's outputs).

        A reward with embeddings (`rewards.distribution`) embeds the outputs once, and every subset is scored on
        slices of those embeddings (`set_score`); any other reward scores a set by its mean per-sample reward,
        from the scores already computed."""
        if hasattr(self.reward, "score_embeddings"):
            with torch.no_grad():
                embeddings = self.reward.embed(outputs)

            def set_score(indices: torch.Tensor) -> float:
                with torch.no_grad():
                    return float(self.reward.set_score(embeddings[indices.to(embeddings.device)]))

            return set_score
        if getattr(self.reward, "kind", "instance") == "distribution_to_distribution":
            texts = [self.prompts[int(i)] for i in samples.plan.prompt_index]

            def set_score(indices: torch.Tensor) -> float:  # a set reward without embeddings: score each subset
                with torch.no_grad():
                    result = self.reward(outputs[indices.to(outputs.device)], [texts[int(i)] for i in indices])
                value = (result.metadata or {}).get("set_score")
                return float(total_reward(result.rewards.float()).mean() if value is None else value)

            return set_score
        return lambda indices: float(scores[indices].mean())

    def write_demonstrations(self, folder: Path, samples, outputs: torch.Tensor, scores: torch.Tensor,
                             demos: Demonstrations) -> Path:
        """One round's demonstrations as a gallery: per prompt, its samples in D+ and in D− with their rewards."""
        prompt_index = np.asarray(samples.plan.prompt_index)
        positive, negative = set(demos.positive.tolist()), set(demos.negative.tolist())
        rows = []
        for prompt in dict.fromkeys(prompt_index.tolist()):
            mine = np.flatnonzero(prompt_index == prompt)
            sides = []
            for members, label in ((positive, "D+"), (negative, "D−")):
                index = [int(i) for i in mine if int(i) in members]
                labels = [{"set": label, "seed": str(int(samples.plan.seeds[i]))} for i in index]
                sides.append(subset_gallery_samples(samples.rollout, outputs[index], self.generator,
                                                    scores[index].tolist(), labels))
            rows.append(PromptRow(self.prompts[prompt], sides[0], sides[1], sides=("positive", "negative")))
        summary = {"construction": self.config.construction, "loss": self.config.loss, "D+": len(positive),
                   "D−": len(negative), "pairs": len(demos.pairs)}
        return write_gallery(folder, rows, title="DRAGON demonstrations: D+ and D− of one round", summary=summary)

    def update(self, trainer: Trainer, trajectory: Trajectory, demos: Demonstrations, epoch: int,
                update: int) -> dict[str, float]:
        """One optimiser update on this round's demonstrations; the items (pairs or samples) are dealt
        round-robin to the processes, each process running the same number of micro-batches."""
        c = self.config
        if c.loss == "dpo":
            items = demos.pairs
        else:
            items = torch.cat([demos.positive, demos.negative])
            desirable_all = torch.cat([torch.ones(len(demos.positive), dtype=torch.bool),
                                       torch.zeros(len(demos.negative), dtype=torch.bool)])
        total = len(items)
        if total == 0:
            trainer.warn(f"round {epoch}: no demonstrations (every score tied); no update")
            return {"dragon_loss": math.nan}
        # One seed per item for its timestep and noise, from (run seed, round, update): resuming repeats them.
        seeds = np.random.SeedSequence([c.trainer.seed, epoch, update, 11]).generate_state(total).astype(np.int64)
        mine = torch.arange(trainer.process_index, total, trainer.num_processes)
        per_process = math.ceil(total / trainer.num_processes)
        micro_batches = math.ceil(per_process / c.train_batch_size)
        # DDP averages gradients over processes; each micro-batch's loss is scaled so that they add up to the
        # mean over all items.
        scale = trainer.num_processes / total
        sums: dict[str, float] = {}  # weighted sums of the loss and its statistics, reduced over processes below
        for b in range(micro_batches):
            rows = mine[b * c.train_batch_size : (b + 1) * c.train_batch_size]
            weight = len(rows)
            if weight == 0:  # fewer items here than on other processes: a zero-weight pass keeps DDP in step
                rows, weight = mine[:1] if len(mine) else torch.zeros(1, dtype=torch.long), 0
            if c.loss == "dpo":  # winners then losers, each pair sharing its seed
                index = torch.cat([items[rows, 0], items[rows, 1]])
                item_seeds = np.concatenate([seeds[rows.numpy()]] * 2)
            else:
                index, item_seeds = items[rows], seeds[rows.numpy()]
            batch = trajectory[index]
            with torch.no_grad(), self.generator.reference(), trainer.autocast():
                ref = self.generator.denoising_error(batch, item_seeds)
            with trainer.autocast():
                policy = self.generator.denoising_error(batch, item_seeds)
            if c.loss == "dpo":
                k = len(rows)
                loss, s = diffusion_dpo_loss(policy[:k], policy[k:], ref[:k], ref[k:], c.beta)
            else:
                loss, s = diffusion_kto_loss(policy, ref, desirable_all[rows].to(policy.device), c.beta,
                                             c.kto_desirable_weight, c.kto_undesirable_weight)
            trainer.backward(loss * weight * scale)
            for key, value in {"dragon_loss": loss, **s}.items():
                value = float(value.detach())
                if weight and math.isfinite(value):
                    sums[key] = sums.get(key, 0.0) + value * weight
                    sums[f"{key}/count"] = sums.get(f"{key}/count", 0.0) + weight
        trainer.optimizer_step()
        keys = ("dragon_loss", "implicit_accuracy", "delta_mean", "kto_g_positive", "kto_g_negative", "kto_z")
        sums = trainer.mean_across_processes({k: sums.get(k, 0.0) for key in keys for k in (key, f"{key}/count")})
        # Means over every process's items (each process's sums were averaged, so the ratio is unchanged).
        return {key: sums[key] / sums[f"{key}/count"] for key in keys if sums[f"{key}/count"] > 0}
