"""Reward ensembles and stochastic-evaluation uncertainty.

:class:`RewardEnsemble` scores a batch with M rewards (or M oracle modules)
and combines the M scores of each sample into one, optionally pessimistically
(worst case, or mean minus a multiple of the spread) so fine-tuning is not
rewarded for exploiting one member's errors.

:func:`stochastic_variance` estimates a reward's uncertainty per sample as the
variance across repeated stochastic evaluations (MC dropout, or a user input
perturbation), the quantity Ctrl-U uses to down-weight unreliable rewards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .base import Reward, RewardError, RewardOutput
from .sequence import OracleReward, SequenceOracle

__all__ = ["AGGREGATES", "ModuleReward", "RewardEnsemble", "stochastic_variance"]

AGGREGATES: tuple[str, ...] = ("mean", "std", "min", "uncertainty_weighted")


class ModuleReward(Reward):
    """Adapter for a plain ``nn.Module`` mapping ``outputs -> [B]`` (or ``[B, 1]``) scores.

    Args:
        module: the scoring model; called as ``module(outputs)``.
        modality: what ``outputs`` are (one of ``rewards.base.MODALITIES``).
        name: reward name used in messages (default: the module's class name).
        differentiable: whether gradients may flow through ``module``.
    """

    kind = "instance"

    def __init__(self, module: nn.Module, modality: str, name: str | None = None, differentiable: bool = True) -> None:
        self.name = name or type(module).__name__
        super().__init__()
        self.modality = modality
        self.differentiable = differentiable
        self.module = module

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        """Batch -> ``[B]``; a trailing singleton dimension is squeezed."""
        scores = self.module(outputs)
        return scores.squeeze(1) if scores.ndim == 2 and scores.shape[1] == 1 else scores


def _as_reward(member: Reward | nn.Module, index: int, modality: str | None) -> Reward:
    if isinstance(member, Reward):
        return member
    if isinstance(member, SequenceOracle):
        return OracleReward(member)
    if isinstance(member, nn.Module):
        if modality is None:
            raise RewardError(
                f"RewardEnsemble member {index} is a plain {type(member).__name__} module; pass "
                f"modality=... (e.g. 'sequence') so its inputs can be checked, or wrap it in a Reward"
            )
        return ModuleReward(member, modality, name=f"{type(member).__name__}_{index}")
    raise RewardError(
        f"RewardEnsemble member {index} is a {type(member).__name__}; members must be Reward "
        f"instances or torch.nn.Module scoring models"
    )


def _member_label(reward: Reward) -> str:
    return f"'{reward.name}' ({type(reward).__name__})"


class RewardEnsemble(Reward):
    """M rewards of one modality combined per sample into a ``[B]`` reward.

    Aggregates (over the M member scores of each sample; ``std`` is the
    population standard deviation, ``numpy.std``'s default):

    * ``"mean"`` — the average.
    * ``"std"`` — the disagreement between members (an uncertainty score).
    * ``"min"`` — the worst case: the minimum for higher-is-better members,
      the maximum for lower-is-better ones.
    * ``"uncertainty_weighted"`` — ``mean - lam * std`` (``mean + lam * std``
      for lower-is-better members): pessimistic by ``lam`` standard deviations.

    ``RewardOutput.metadata`` holds ``member_scores`` ``[B, M]``, ``mean`` and
    ``std`` ``[B]`` (detached, for logging) and ``members`` (their names).

    Args:
        members: M >= 1 single-objective rewards of the same modality, kind and
            direction, or scoring modules (a :class:`SequenceOracle` is wrapped
            as ``sequence_oracle``; other modules need ``modality``).
        aggregate: one of :data:`AGGREGATES`.
        lam: the multiple of ``std`` subtracted by ``"uncertainty_weighted"``.
        modality: modality for plain-module members.
        name: reward name (default ``ensemble_<aggregate>``).
    """

    kind = "instance"

    def __init__(
        self,
        members: Sequence[Reward | nn.Module],
        aggregate: str = "mean",
        lam: float = 1.0,
        modality: str | None = None,
        name: str | None = None,
    ) -> None:
        if aggregate not in AGGREGATES:
            raise RewardError(f"RewardEnsemble aggregate {aggregate!r} is unknown; use one of {list(AGGREGATES)}")
        if isinstance(members, (Reward, nn.Module)) or not len(members):
            raise RewardError("RewardEnsemble needs a non-empty list of members, e.g. RewardEnsemble([r1, r2])")
        self.name = name or f"ensemble_{aggregate}"
        super().__init__()
        rewards = [_as_reward(m, i, modality) for i, m in enumerate(members)]
        multi = [_member_label(r) for r in rewards if len(r.objectives) != 1]
        if multi:
            raise RewardError(
                f"RewardEnsemble members must have one objective each; {', '.join(multi)} have "
                f"several — ensemble one objective at a time"
            )
        for attribute in ("modality", "kind", "higher_is_better"):
            values = {getattr(r, attribute) for r in rewards}
            if len(values) > 1:
                listing = ", ".join(f"{_member_label(r)}: {getattr(r, attribute)!r}" for r in rewards)
                raise RewardError(
                    f"RewardEnsemble members must share one {attribute}; got mixed values — "
                    f"{listing}"
                )
        if lam < 0:
            raise RewardError(f"RewardEnsemble lam must be >= 0 (a pessimism weight); got {lam!r}")
        self.members = nn.ModuleList(rewards)
        self.aggregate = aggregate
        self.lam = float(lam)
        self.modality = rewards[0].modality
        self.kind = rewards[0].kind
        self.higher_is_better = rewards[0].higher_is_better
        self.differentiable = all(r.differentiable for r in rewards)

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> RewardOutput:
        """Batch -> ``[B]`` aggregated scores, with per-member scores in the metadata."""
        scores = torch.stack([member(outputs, conditions).rewards for member in self.members], dim=1)
        mean = scores.mean(dim=1)
        std = scores.std(dim=1, correction=0)
        # Pessimism points against the direction of improvement.
        sign = 1.0 if self.higher_is_better else -1.0
        if self.aggregate == "mean":
            combined = mean
        elif self.aggregate == "std":
            combined = std
        elif self.aggregate == "min":
            combined = sign * (sign * scores).amin(dim=1)
        else:
            combined = mean - sign * self.lam * std
        metadata = {
            "member_scores": scores.detach(),
            "mean": mean.detach(),
            "std": std.detach(),
            "members": [m.name for m in self.members],
        }
        return RewardOutput(rewards=combined, metadata=metadata)

    def extra_repr(self) -> str:
        return f"aggregate={self.aggregate!r}, lam={self.lam}, " + super().extra_repr()


def stochastic_variance(
    reward: Reward,
    outputs: torch.Tensor,
    conditions: Sequence[str] | None = None,
    *,
    passes: int,
    perturb: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of a reward over ``passes`` stochastic evaluations.

    Without ``perturb``, each pass runs with dropout active (MC dropout):
    every module's ``training`` flag is set to True for the passes and each
    flag is restored afterwards, even on error. The flags are set directly
    rather than through ``reward.train()``, because hub-model rewards (CLIP,
    CLAP, text embedders) override ``train()`` to keep their models in eval
    mode for normal use, which would leave dropout off. Normalisation layers
    with running statistics (batch norm, instance norm) stay in eval mode,
    because train mode would normalise with batch statistics and overwrite
    those statistics. With ``perturb``, each pass scores ``perturb(outputs)``
    and module modes are left alone.

    Gradients flow as in a normal call of a differentiable reward; wrap the
    call in ``torch.no_grad()`` when only the numbers are needed (e.g. as
    Ctrl-U weights). Seed the global RNG for reproducible dropout masks.

    Args:
        reward: the reward to evaluate.
        outputs: batch of samples for the reward's modality (``B`` samples).
        conditions: optional ``B`` conditions.
        passes: number of evaluations, at least 2.
        perturb: optional ``outputs -> outputs`` random perturbation.

    Returns:
        ``(mean, variance)``, each ``[B]`` (``[B, K]`` for a K-objective reward);
        the variance is the unbiased sample variance over passes.
    """
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 2:
        raise RewardError(f"stochastic_variance needs passes >= 2 to estimate a variance; got {passes!r}")
    if not isinstance(reward, Reward):
        raise RewardError(
            f"stochastic_variance expects a rewards.Reward; got a {type(reward).__name__} — wrap "
            f"models with RewardEnsemble([model], modality=...) or ModuleReward"
        )
    if perturb is not None:
        runs = [reward(perturb(outputs), conditions).rewards for _ in range(passes)]
    else:
        modes = [(module, module.training) for module in reward.modules()]
        try:
            # Flags one by one, not train(): dropout lives in nn.Dropout modules
            # and also in attention / drop-path modules that read their own
            # flag, and frozen rewards' train() overrides force eval mode.
            for module in reward.modules():
                module.training = not isinstance(module, nn.modules.batchnorm._NormBase)
            runs = [reward(outputs, conditions).rewards for _ in range(passes)]
        finally:
            # Restored one by one too: a parent's train()/eval() would overwrite
            # children that were deliberately in the other mode.
            for module, training in modes:
                module.training = training
    stacked = torch.stack(runs, dim=0)
    return stacked.mean(dim=0), stacked.var(dim=0, correction=1)
