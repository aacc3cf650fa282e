"""Reward-guided sampling without training: best-of-N and SMC-style resampling, the inference-time baselines that
DRAKES is measured against (spec ../shared/specs/drakes.md), on any generator with the step-by-step methods
`prepare_conditions`, `initial_state`, `reverse_step` and `predict_x0` (the masked family).

The reward is a black box: any Python function from token ids [B, L] long to B scores (or a `rewards.Reward`),
never differentiated.

SMC (Wu et al. 2023's twisted SMC with the pretrained model as proposal; DRAKES's "SMC" baseline). Each
condition gets N particles, all sampled by the ordinary reverse process. After step k every particle's potential
is ψ_k = r(x̂_0(x_k))/λ, with x̂_0 the model's argmax prediction of the clean sequence (at the last step, the
sample itself), and its log-weight grows by ψ_k − ψ_{k−1}. The weights telescope, so whatever the intermediate
predictions are, the final weighted particles target p_pre(x)·exp(r(x)/λ). When a condition's effective sample
size 1/Σ w² falls below `ess_threshold`·N, its particles are resampled multinomially by weight (weights reset to
uniform); after the last step they are resampled once more, so the N returned samples are unweighted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from genalign.generators.base import Conditions, Rollout, per_sample_generators

SequenceReward = Callable[[torch.Tensor], torch.Tensor]


class GuidedSamplingError(ValueError):
    """Bad input to a guided sampler; the message names the problem and the fix."""


def sequence_reward(reward, conditions: Conditions | None = None) -> SequenceReward:
    """A black-box reward as ids [B, L] → scores [B] float64 (on the ids' device): a `rewards.Reward` (summed over
    its objectives, given the conditions' texts for the rows' order) or any callable of the ids."""
    from rewards import Reward

    def call(ids: torch.Tensor) -> torch.Tensor:
        try:
            if isinstance(reward, Reward):
                texts = None if conditions is None else conditions.texts
                scores = reward(ids, texts).rewards
                scores = scores.sum(-1) if scores.dim() == 2 else scores
            else:
                scores = reward(ids)
        except (TypeError, ValueError, IndexError, RuntimeError, AttributeError) as error:
            raise GuidedSamplingError(
                f"the reward failed on token sequences (ids [{ids.shape[0]}, {ids.shape[1]}] long): {error}; guided "
                "sampling needs a reward that accepts token ids [B, L] and returns B scores") from error
        scores = torch.as_tensor(scores, dtype=torch.float64).to(ids.device)
        if scores.shape != (ids.shape[0],):
            raise GuidedSamplingError(f"the reward returned shape {tuple(scores.shape)} for {ids.shape[0]} sequences; "
                                      "return one score per sequence, shape [B]")
        if not torch.isfinite(scores).all():
            raise GuidedSamplingError("the reward returned NaN or infinite scores; fix the reward (or clamp it)")
        return scores

    return call


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """1 / Σ_i w_i² of the normalised weights w = softmax(log_weights) along the last dim: [..., N] → [...]."""
    w = torch.softmax(log_weights.double(), dim=-1)
    return 1.0 / (w * w).sum(-1)


def multinomial_resample(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices [G, N] of N draws with replacement per row of log_weights [G, N], each with probability w_i."""
    w = torch.softmax(log_weights.double(), dim=-1).cpu()
    return torch.multinomial(w, w.shape[-1], replacement=True, generator=generator).to(log_weights.device)


@dataclass
class GuidedSamples:
    """What a guided sampler returns.

    Attributes:
        rollout: the chosen samples, outputs [B·n, L] long ids (n per condition, conditions in order), no trajectory.
        rewards: [B·n] float64 reward of each chosen sample.
        reward_calls: sequences scored in all (the reward budget spent).
        resample_steps: for SMC, the steps after which any condition resampled (excluding the final resampling).
    """

    rollout: Rollout
    rewards: torch.Tensor
    reward_calls: int
    resample_steps: list[int]


def _repeat(conditions: Conditions, n: int) -> Conditions:
    return conditions[[i for i in range(len(conditions)) for _ in range(n)]]


def best_of_n(generator, conditions: Conditions | Sequence[str], options, reward, *, n: int,
              seeds: Sequence[int] | None = None, batch_size: int | None = None) -> GuidedSamples:
    """Draw n samples per condition with `generator.sample` and keep the one the reward scores highest.

    Args:
        seeds: one per drawn sample (len(conditions)·n), or None for the global RNG.
    Returns:
        GuidedSamples with one sample per condition.
    """
    if n < 1:
        raise GuidedSamplingError(f"best-of-N needs n ≥ 1; got n={n}")
    conditions = generator.prepare_conditions(conditions)
    drawn = _repeat(conditions, n)
    rollout = generator.sample(drawn, options, seeds=seeds, batch_size=batch_size, return_trajectory=False)
    scores = sequence_reward(reward, drawn)(rollout.outputs)
    best = scores.view(len(conditions), n).argmax(-1) + torch.arange(len(conditions), device=scores.device) * n
    chosen = Rollout(outputs=rollout.outputs[best], modality=rollout.modality, conditions=conditions)
    return GuidedSamples(rollout=chosen, rewards=scores[best], reward_calls=len(drawn), resample_steps=[])


def smc(generator, conditions: Conditions | Sequence[str], options, reward, *, num_particles: int,
        lam: float = 1.0, ess_threshold: float = 0.5, seed: int = 0) -> GuidedSamples:
    """SMC-style resampling guided by the reward of the predicted x_0 (see the module docstring).

    Args:
        num_particles: N per condition; all N resampled particles are returned, so B·N samples.
        lam: λ, the temperature of the target p_pre·exp(r/λ) (smaller = greedier).
        ess_threshold: resample a condition when its ESS < ess_threshold·N (0: only at the end; 1: every step).
        seed: seeds particle i's draws with seed·(B·N) + i and the resampling with `seed`.
    """
    if num_particles < 1 or lam <= 0 or not 0.0 <= ess_threshold <= 1.0:
        raise GuidedSamplingError(f"SMC needs num_particles ≥ 1, lam > 0 and ess_threshold in [0, 1]; got "
                                  f"{num_particles}, {lam}, {ess_threshold}")
    conditions = generator.prepare_conditions(conditions)
    G, N = len(conditions), num_particles
    particles = _repeat(conditions, N)
    score = sequence_reward(reward, particles)
    generators = per_sample_generators([seed * G * N + i for i in range(G * N)], G * N)
    resampler = torch.Generator().manual_seed(seed)
    x = generator.initial_state(particles, options)
    potential = score(generator.predict_x0(x, options, particles)) / lam
    log_w = torch.zeros(G, N, dtype=torch.float64, device=x.device)
    calls, resampled = G * N, []
    T = options.num_inference_steps
    rows = torch.arange(G * N, device=x.device).view(G, N)
    for k in range(T):
        x = generator.reverse_step(x, k, options, particles, generators)
        clean = x if k == T - 1 else generator.predict_x0(x, options, particles)
        new_potential = score(clean) / lam
        calls += G * N
        log_w += (new_potential - potential).view(G, N)
        potential = new_potential
        low = effective_sample_size(log_w) < ess_threshold * N
        if k == T - 1 or not low.any():
            continue
        index = torch.where(low[:, None], rows.gather(1, multinomial_resample(log_w, resampler)), rows).flatten()
        x, potential = x[index], potential[index]
        log_w[low] = 0.0
        resampled.append(k)
    final = rows.gather(1, multinomial_resample(log_w, resampler)).flatten()
    outputs = x[final]
    rollout = Rollout(outputs=outputs, modality="sequence", conditions=particles)
    return GuidedSamples(rollout=rollout, rewards=potential[final] * lam, reward_calls=calls, resample_steps=resampled)
