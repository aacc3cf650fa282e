"""Combining and transforming rewards: weighted sums, objective stacks, per-prompt normalisation, clipping,
and the log-sigmoid transform of "Transforming and Combining Rewards for Aligning LLMs" (Wang et al., 2024).

Every combinator is itself a `Reward`, so it nests and goes anywhere a reward goes. From YAML::

    reward:
      name: weighted_sum
      kwargs:
        components:
          - {name: pickscore, weight: 10.0}
          - {name: hpsv2, weight: 2.0}
          - {name: laion_aesthetic, weight: 0.05}

`stack` takes the same `components` and returns one column per component ([B, K]) for Pareto methods. A
component's optional `label` names its column (default: the reward's name), so one reward can appear twice::

          - {name: motif_count, label: ATA, kwargs: {motif: ATA}}
          - {name: motif_count, label: CGC, kwargs: {motif: CGC}}
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .base import Reward, RewardError, RewardOutput, build_reward, register_reward

_KIND_ORDER = ("instance", "instance_to_distribution", "distribution_to_distribution")


def _build_components(
    components: Sequence[Reward | Mapping[str, Any]],
) -> tuple[list[Reward], list[float], list[str]]:
    """Rewards, weights and labels from Reward objects or {name, weight, label, kwargs} mappings (YAML)."""
    if not components:
        raise RewardError("a composed reward needs at least one component; pass components=[{name: ..., weight: ...}]")
    rewards, weights, labels = [], [], []
    for item in components:
        if isinstance(item, Reward):
            rewards.append(item)
            weights.append(1.0)
            labels.append(item.name)
            continue
        unknown = set(item) - {"name", "weight", "label", "kwargs"}
        if "name" not in item or unknown:
            raise RewardError(
                f"reward component {dict(item)!r} must be a mapping with 'name' and optional 'weight', 'label' "
                f"and 'kwargs'{f' (unknown keys: {sorted(unknown)})' if unknown else ''}"
            )
        rewards.append(build_reward(item["name"], **dict(item.get("kwargs", {}))))
        weights.append(float(item.get("weight", 1.0)))
        labels.append(str(item.get("label", item["name"])))
    modalities = {r.modality for r in rewards}
    if len(modalities) > 1:
        raise RewardError(
            "cannot combine rewards of different modalities: "
            + ", ".join(f"{r.name} ({r.modality})" for r in rewards)
        )
    for r in rewards:
        if not r.higher_is_better:
            raise RewardError(f"component '{r.name}' is lower-is-better; negate it before combining")
    return rewards, weights, labels


class _Composite(Reward):
    """Shared plumbing: modality/kind/differentiability follow the components."""

    def __init__(self, rewards: list[Reward]) -> None:
        self.modality = rewards[0].modality
        # The combination is as set-dependent as its most set-dependent part.
        self.kind = max((r.kind for r in rewards), key=_KIND_ORDER.index)
        self.differentiable = all(r.differentiable for r in rewards)
        super().__init__()
        self.components = torch.nn.ModuleList(rewards)

    def _component_scores(self, outputs, conditions) -> list[torch.Tensor]:
        scores = []
        for reward in self.components:
            values = reward(outputs, conditions).rewards
            if values.ndim != 1:
                raise RewardError(
                    f"component '{reward.name}' has {values.shape[1]} objectives; combine single-objective "
                    "rewards (stack them, or weight a multi-objective reward's columns yourself)"
                )
            scores.append(values)
        return scores


@register_reward("weighted_sum")
class WeightedSum(_Composite):
    """Σ_k w_k · r_k per sample; metadata["components"] holds each component's [B] scores."""

    def __init__(self, components: Sequence[Reward | Mapping[str, Any]]) -> None:
        rewards, weights, self.labels = _build_components(components)
        if len(set(self.labels)) != len(self.labels):
            raise RewardError(f"weighted-sum components need distinct labels, got {self.labels}; give a "
                              "component that repeats a reward its own 'label'")
        super().__init__(rewards)
        self.weights = weights

    def score(self, outputs, conditions) -> RewardOutput:
        scores = self._component_scores(outputs, conditions)
        total = sum(w * s for w, s in zip(self.weights, scores))
        return RewardOutput(total, {"components": {label: s.detach() for label, s in zip(self.labels, scores)}})


@register_reward("stack")
class Stack(_Composite):
    """One column per component: [B, K] with objectives named after the components (weights scale columns)."""

    def __init__(self, components: Sequence[Reward | Mapping[str, Any]]) -> None:
        rewards, weights, labels = _build_components(components)
        if len(set(labels)) != len(labels):
            raise RewardError(f"stacked rewards need distinct names, got {labels}; give a component that repeats "
                              "a reward its own 'label' (e.g. {name: motif_count, label: ATA, kwargs: {motif: ATA}})")
        self.objectives = tuple(labels)
        super().__init__(rewards)
        self.weights = weights

    def score(self, outputs, conditions) -> torch.Tensor:
        scores = self._component_scores(outputs, conditions)
        return torch.stack([w * s for w, s in zip(self.weights, scores)], dim=1)


class _Wrapper(Reward):
    """A transform of one reward that keeps its modality, kind, differentiability and objectives."""

    def __init__(self, reward: Reward | Mapping[str, Any]) -> None:
        inner = reward if isinstance(reward, Reward) else _build_components([reward])[0][0]
        self.modality, self.kind = inner.modality, inner.kind
        self.differentiable, self.objectives = inner.differentiable, tuple(inner.objectives)
        super().__init__()
        self.inner = inner


@register_reward("per_prompt_normalized")
class PerPromptNormalized(_Wrapper):
    """(r − mean_prompt) / (std_prompt + eps) within the batch, per distinct condition.

    Samples whose prompt occurs once get 0 (no spread to normalise by). Needs conditions.
    """

    def __init__(self, reward: Reward | Mapping[str, Any], eps: float = 1e-6) -> None:
        super().__init__(reward)
        self.eps = eps

    def score(self, outputs, conditions) -> torch.Tensor:
        if conditions is None:
            raise RewardError(f"'{self.name}' normalises per prompt and needs the prompts; pass conditions")
        values = self.inner(outputs, conditions).rewards
        groups: dict[Any, list[int]] = {}
        for i, c in enumerate(conditions):
            groups.setdefault(c, []).append(i)
        out = torch.zeros_like(values)
        for members in groups.values():
            idx = torch.tensor(members, device=values.device)
            group = values[idx]
            if len(members) > 1:
                out[idx] = (group - group.mean(0)) / (group.std(0, unbiased=False) + self.eps)
        return out


@register_reward("clipped")
class Clipped(_Wrapper):
    """clamp(r, low, high); either bound may be None."""

    def __init__(self, reward: Reward | Mapping[str, Any], low: float | None = None, high: float | None = None) -> None:
        if low is None and high is None:
            raise RewardError("clipped reward needs low and/or high")
        super().__init__(reward)
        self.low, self.high = low, high

    def score(self, outputs, conditions) -> torch.Tensor:
        return self.inner(outputs, conditions).rewards.clamp(self.low, self.high)


@register_reward("log_sigmoid")
class LogSigmoidTransformed(_Wrapper):
    """u = log σ(r − r_ref(prompt)) (Wang et al., 2024): saturating gains above a per-prompt reference.

    Above the reference extra reward is worth little; below it the penalty stays linear, so a sum of
    transformed rewards acts like a logical AND of "every reward is good enough". The reference is a number,
    a {prompt: value} mapping (e.g. the base model's median reward per prompt), or None for the batch's
    per-prompt median.
    """

    def __init__(
        self, reward: Reward | Mapping[str, Any], reference: float | Mapping[str, float] | None = None
    ) -> None:
        super().__init__(reward)
        self.reference = reference

    def _reference(self, values: torch.Tensor, conditions) -> torch.Tensor:
        if isinstance(self.reference, (int, float)):
            return torch.full_like(values, float(self.reference))
        if conditions is None:
            raise RewardError(f"'{self.name}' with a per-prompt reference needs the prompts; pass conditions")
        if isinstance(self.reference, Mapping):
            missing = sorted({c for c in conditions if c not in self.reference})
            if missing:
                raise RewardError(f"no reference reward for prompts {missing[:3]}; add them to `reference`")
            return torch.tensor([self.reference[c] for c in conditions], dtype=values.dtype, device=values.device)
        ref = torch.empty_like(values)
        for c in set(conditions):
            idx = torch.tensor([i for i, x in enumerate(conditions) if x == c], device=values.device)
            ref[idx] = values[idx].detach().median(0).values
        return ref

    def score(self, outputs, conditions) -> torch.Tensor:
        values = self.inner(outputs, conditions).rewards
        return torch.nn.functional.logsigmoid(values - self._reference(values, conditions))
