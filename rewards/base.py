"""The reward contract shared by every fine-tuning algorithm in genalign.

A reward maps a batch of generated outputs (images, audio, sequences, text) and
optional conditions (prompts) to one score per sample, or to K scores per
sample for multi-objective rewards. Algorithms only ever talk to rewards
through :class:`Reward`, so the base class does the input/output checking
once, with error messages that say what went wrong and how to fix it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

__all__ = [
    "MODALITIES",
    "KINDS",
    "RewardError",
    "RewardOutput",
    "Reward",
    "REWARDS",
    "register_reward",
    "build_reward",
    "available_rewards",
]

MODALITIES: tuple[str, ...] = ("image", "audio", "sequence", "text")
KINDS: tuple[str, ...] = ("instance", "instance_to_distribution", "distribution_to_distribution")

# Decoded images may overshoot [0, 1] slightly through VAE/float rounding;
# rejecting those would make users clamp everywhere for no benefit.
IMAGE_RANGE_SLACK = 1e-3


class RewardError(ValueError):
    """Bad reward input, bad reward configuration, or an invalid reward value.

    Messages name the problem and the fix.
    """


@dataclass
class RewardOutput:
    """Scores for one batch.

    Attributes:
        rewards: ``[B]`` for a single-objective reward or ``[B, K]`` for a
            reward with K objectives (column order = ``Reward.objectives``).
        metadata: free-form extras (e.g. per-sample diagnostics).
    """

    rewards: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.rewards, torch.Tensor) or self.rewards.ndim not in (1, 2):
            got = (
                f"a tensor of shape {tuple(self.rewards.shape)}"
                if isinstance(self.rewards, torch.Tensor)
                else f"a {type(self.rewards).__name__}"
            )
            raise RewardError(
                f"RewardOutput.rewards must be a tensor of shape [B] or [B, K]; got {got}"
            )

    @property
    def num_objectives(self) -> int:
        """K: 1 for ``[B]`` rewards, ``rewards.shape[1]`` for ``[B, K]``."""
        return 1 if self.rewards.ndim == 1 else int(self.rewards.shape[1])

    @property
    def batch_size(self) -> int:
        """B."""
        return int(self.rewards.shape[0])


def _describe_value(x: Any) -> str:
    """Short human description of what the user passed, for error messages."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # numpy and friends
        return f"a {type(x).__module__}.{type(x).__name__} of shape {tuple(x.shape)} ({x.dtype})"
    if isinstance(x, (list, tuple)):
        inner = f" of {type(x[0]).__name__}" if len(x) > 0 else ""
        return f"a {type(x).__name__}{inner} (length {len(x)})"
    return f"a {type(x).__name__}"


class Reward(torch.nn.Module):
    """Base class for all rewards.

    Subclasses set the class attributes below (or override them per instance)
    and implement :meth:`score`. Call the reward like a function::

        out = reward(images, prompts)   # images: [B, 3, H, W] in [0, 1]
        out.rewards                     # [B] or [B, K]

    Attributes:
        name: registry name; also used in error messages.
        modality: one of ``MODALITIES``; selects the input validation.
        kind: one of ``KINDS``; ``"instance"`` scores each sample on its own,
            the distribution kinds compare samples against a reference set.
        differentiable: if False, scoring runs under ``torch.no_grad()`` and
            algorithms must use policy-gradient style updates.
        higher_is_better: direction of optimisation.
        objectives: names of the K objectives; empty means ``(name,)``. With
            one objective :meth:`score` returns ``[B]``, otherwise ``[B, K]``.
    """

    name: str = "reward"
    modality: str = "image"
    kind: str = "instance"
    differentiable: bool = False
    higher_is_better: bool = True
    objectives: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        if not self.objectives:
            self.objectives = (self.name,)

    # ------------------------------------------------------------------ API

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        """Compute raw scores; implemented by subclasses.

        Args:
            outputs: validated batch, e.g. images ``[B, 3, H, W]`` in [0, 1].
            conditions: ``B`` conditions (prompts) or None.

        Returns:
            ``[B]`` (single objective) or ``[B, K]`` on ``outputs.device``.
            A :class:`RewardOutput` may be returned instead to attach metadata.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement score(outputs, conditions) -> Tensor [B] or [B, K]"
        )

    def __call__(
        self, outputs: torch.Tensor, conditions: Sequence[str] | None = None
    ) -> RewardOutput:
        # Re-declared only so type checkers see the RewardOutput return type;
        # nn.Module.__call__ still runs hooks and dispatches to forward().
        return super().__call__(outputs, conditions)

    def forward(
        self, outputs: torch.Tensor, conditions: Sequence[str] | None = None
    ) -> RewardOutput:
        """Validate inputs, score them, validate the scores.

        Args:
            outputs: batch of generated samples for this reward's modality
                (images: float ``[B, 3, H, W]`` in [0, 1]).
            conditions: optional sequence of ``B`` conditions (e.g. prompts).

        Returns:
            :class:`RewardOutput` with ``rewards`` of shape ``[B]`` or ``[B, K]``.

        Raises:
            RewardError: invalid input, or the reward produced invalid values.
        """
        self._check_contract()
        batch = self.validate_outputs(outputs)
        conditions = self._validate_conditions(conditions, batch)
        if self.differentiable:
            raw = self.score(outputs, conditions)
        else:
            with torch.no_grad():
                raw = self.score(outputs, conditions)
        metadata: dict[str, Any] = {}
        if isinstance(raw, RewardOutput):
            metadata = dict(raw.metadata)
            raw = raw.rewards
        rewards = self._validate_rewards(raw, batch, outputs)
        return RewardOutput(rewards=rewards, metadata=metadata)

    def describe(self) -> dict[str, Any]:
        """Static facts about this reward, e.g. for logs and configs."""
        return {
            "name": self.name,
            "modality": self.modality,
            "kind": self.kind,
            "differentiable": bool(self.differentiable),
            "higher_is_better": bool(self.higher_is_better),
            "objectives": tuple(self.objectives),
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.describe().items())

    # ----------------------------------------------------------- validation

    def _check_contract(self) -> None:
        # Attributes can be overridden per instance, so re-check at call time
        # rather than trusting what was checked at registration.
        _check_reward_attributes(self.name, self.modality, self.kind, self.objectives, type(self))

    def validate_outputs(self, outputs: Any) -> int:
        """Check ``outputs`` against this reward's modality; return the batch size B.

        Subclasses with unusual inputs may override this.
        """
        validator = _VALIDATORS.get(self.modality)
        if validator is None:  # pragma: no cover - guarded by _check_contract
            raise RewardError(f"reward '{self.name}' has unknown modality {self.modality!r}")
        return validator(self, outputs)

    def _validate_conditions(
        self, conditions: Sequence[str] | None, batch: int
    ) -> list[Any] | None:
        if conditions is None:
            return None
        if isinstance(conditions, str):
            raise RewardError(
                f"reward '{self.name}' expects one condition per sample (a list of {batch}); "
                f"got a single string — pass [prompt] * {batch} to use it for every sample"
            )
        try:
            n = len(conditions)
        except TypeError:
            raise RewardError(
                f"reward '{self.name}' expects conditions as a sequence of {batch} items (e.g. a "
                f"list of prompts); got {_describe_value(conditions)} — wrap it in a list"
            ) from None
        if n != batch:
            raise RewardError(
                f"reward '{self.name}' got {n} conditions for a batch of {batch} samples; "
                f"pass exactly one condition (prompt) per sample, in the same order"
            )
        return list(conditions)

    def _validate_rewards(self, raw: Any, batch: int, outputs: Any) -> torch.Tensor:
        k = len(self.objectives)
        expected = f"[B={batch}]" if k == 1 else f"[B={batch}, K={k}] (objectives {self.objectives})"
        if not isinstance(raw, torch.Tensor):
            raise RewardError(
                f"reward '{self.name}' score() returned {_describe_value(raw)}; it must return a "
                f"tensor of shape {expected} — build it with torch.as_tensor(..., device=outputs.device)"
            )
        shape = tuple(raw.shape)
        if k == 1 and shape != (batch,):
            hint = (
                " — squeeze the last dimension"
                if shape == (batch, 1)
                else " — return one scalar per sample"
            )
            raise RewardError(
                f"reward '{self.name}' score() returned shape {shape}; a single-objective reward "
                f"must return {expected}{hint}"
            )
        if k > 1 and shape != (batch, k):
            raise RewardError(
                f"reward '{self.name}' score() returned shape {shape}; with {k} objectives it must "
                f"return {expected} — one column per objective, or fix `objectives`"
            )
        if not raw.is_floating_point():
            raise RewardError(
                f"reward '{self.name}' score() returned a {raw.dtype} tensor; rewards must be "
                f"floating point — convert with .float()"
            )
        if isinstance(outputs, torch.Tensor) and raw.device != outputs.device:
            raise RewardError(
                f"reward '{self.name}' returned rewards on {raw.device} for inputs on "
                f"{outputs.device}; create the result on outputs.device (don't hard-code a device)"
            )
        finite = torch.isfinite(raw.detach())
        if not bool(finite.all()):
            per_sample = finite if raw.ndim == 1 else finite.all(dim=1)
            n_bad = int((~per_sample).sum())
            bad = raw.detach()[~finite]
            has_nan = bool(torch.isnan(bad).any())
            has_inf = bool(torch.isinf(bad).any())
            what = "NaN/inf" if has_nan and has_inf else ("NaN" if has_nan else "inf")
            raise RewardError(
                f"reward '{self.name}' returned {what} for {n_bad} of {batch} samples; check the "
                f"reward model's inputs (are images in [0, 1]?) or wrap it with a clamp"
            )
        return raw


# ------------------------------------------------------------- validators


def _validate_image(reward: Reward, x: Any) -> int:
    expected = f"reward '{reward.name}' expects images as a float tensor [B, 3, H, W] in [0, 1]"
    if not isinstance(x, torch.Tensor):
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
            hint = "stack them with torch.stack(images)"
        elif hasattr(x, "shape"):
            hint = "convert with torch.from_numpy(arr); channels-last arrays also need .permute(0, 3, 1, 2)"
        else:
            hint = "convert PIL images with torchvision.transforms.functional.to_tensor and torch.stack"
        raise RewardError(f"{expected}; got {_describe_value(x)} — {hint}")
    shape = tuple(x.shape)
    if x.ndim != 4:
        if x.ndim == 3 and shape[0] == 3:
            hint = "this looks like a single image; add the batch dimension with images.unsqueeze(0)"
        elif x.ndim == 3:
            hint = (
                "decode latents to images first; a grayscale batch [B, H, W] needs "
                "images.unsqueeze(1).expand(-1, 3, -1, -1)"
            )
        else:
            hint = "decode latents to images first"
        raise RewardError(f"{expected}; got a tensor of shape {shape} — {hint}")
    if shape[1] != 3:
        if shape[-1] == 3:
            hint = "this looks channels-last; use images.permute(0, 3, 1, 2)"
        elif shape[1] == 1:
            hint = "grayscale images need 3 channels; use images.expand(-1, 3, -1, -1)"
        elif shape[1] == 4:
            hint = "4 channels looks like diffusion latents (or RGBA): decode latents to images first, or drop alpha"
        else:
            hint = "pass RGB images with the channel dimension second"
        raise RewardError(f"{expected}; got a tensor of shape {shape} with {shape[1]} channels — {hint}")
    if shape[0] == 0:
        raise RewardError(f"{expected}; got an empty batch (B=0) — score at least one image")
    if not x.is_floating_point():
        hint = "convert uint8 images with images.float() / 255" if x.dtype == torch.uint8 else "convert with .float()"
        raise RewardError(f"{expected}; got a {x.dtype} tensor of shape {shape} — {hint}")
    with torch.no_grad():
        xd = x.detach()
        finite = torch.isfinite(xd)
        if not bool(finite.all()):
            n_bad = int((~finite).flatten(1).any(dim=1).sum())
            raise RewardError(
                f"{expected}; got NaN/inf pixel values in {n_bad} of {shape[0]} images — "
                f"the generator diverged or the decode step produced invalid values"
            )
        lo, hi = float(xd.min()), float(xd.max())
    if lo < -IMAGE_RANGE_SLACK or hi > 1 + IMAGE_RANGE_SLACK:
        if lo >= -1 - IMAGE_RANGE_SLACK and hi <= 1 + IMAGE_RANGE_SLACK:
            hint = "this looks like [-1, 1]; map with (images + 1) / 2"
        elif lo >= -IMAGE_RANGE_SLACK and 2 < hi <= 255 + IMAGE_RANGE_SLACK:
            hint = "this looks like [0, 255]; divide by 255"
        else:
            hint = "rescale to [0, 1] or clamp with images.clamp(0, 1)"
        raise RewardError(f"{expected}; got values in [{lo:.4g}, {hi:.4g}] — {hint}")
    return int(shape[0])


def _validate_audio(reward: Reward, x: Any) -> int:
    expected = f"reward '{reward.name}' expects audio as a float tensor [B, T] or [B, C, T]"
    if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3) or not x.is_floating_point():
        raise RewardError(f"{expected}; got {_describe_value(x)} — decode to waveforms first")
    if x.shape[0] == 0:
        raise RewardError(f"{expected}; got an empty batch (B=0) — score at least one clip")
    return int(x.shape[0])


def _validate_sequence(reward: Reward, x: Any) -> int:
    expected = (
        f"reward '{reward.name}' expects sequences as an integer tensor [B, L] of token ids "
        f"or a float tensor [B, L, V] of one-hot/probabilities"
    )
    ok = isinstance(x, torch.Tensor) and (
        (x.ndim == 2 and not x.is_floating_point()) or (x.ndim == 3 and x.is_floating_point())
    )
    if not ok:
        raise RewardError(f"{expected}; got {_describe_value(x)}")
    if x.shape[0] == 0:
        raise RewardError(f"{expected}; got an empty batch (B=0) — score at least one sequence")
    return int(x.shape[0])


def _validate_text(reward: Reward, x: Any) -> int:
    expected = f"reward '{reward.name}' expects text as a list of B strings or a token tensor [B, L]"
    if isinstance(x, str):
        raise RewardError(f"{expected}; got a single string — wrap it in a list: [text]")
    if isinstance(x, torch.Tensor):
        if x.ndim < 2:
            raise RewardError(f"{expected}; got {_describe_value(x)}")
        n = int(x.shape[0])
    elif isinstance(x, Sequence) and all(isinstance(s, str) for s in x):
        n = len(x)
    else:
        raise RewardError(f"{expected}; got {_describe_value(x)}")
    if n == 0:
        raise RewardError(f"{expected}; got an empty batch (B=0) — score at least one text")
    return n


_VALIDATORS: dict[str, Callable[[Reward, Any], int]] = {
    "image": _validate_image,
    "audio": _validate_audio,
    "sequence": _validate_sequence,
    "text": _validate_text,
}


def _check_reward_attributes(
    name: str, modality: str, kind: str, objectives: Sequence[str], cls: type
) -> None:
    where = f"reward '{name}' ({cls.__name__})"
    if modality not in MODALITIES:
        raise RewardError(f"{where} has modality {modality!r}; set `modality` to one of {list(MODALITIES)}")
    if kind not in KINDS:
        raise RewardError(f"{where} has kind {kind!r}; set `kind` to one of {list(KINDS)}")
    if objectives:
        if isinstance(objectives, str) or not all(isinstance(o, str) and o for o in objectives):
            raise RewardError(
                f"{where} has objectives {objectives!r}; set `objectives` to a tuple of non-empty names"
            )
        if len(set(objectives)) != len(objectives):
            raise RewardError(f"{where} has duplicate objective names {objectives!r}; make them unique")


# --------------------------------------------------------------- registry

REWARDS: dict[str, type[Reward]] = {}

_R = TypeVar("_R", bound=type[Reward])


def register_reward(name: str) -> Callable[[_R], _R]:
    """Class decorator adding a :class:`Reward` subclass to ``REWARDS`` under ``name``.

    Sets ``cls.name = name`` when the class does not define its own name.
    """
    if not isinstance(name, str) or not name:
        raise RewardError(f"register_reward needs a non-empty string name; got {name!r}")

    def decorator(cls: _R) -> _R:
        if not (isinstance(cls, type) and issubclass(cls, Reward)):
            raise RewardError(
                f"@register_reward({name!r}) must decorate a subclass of rewards.Reward; got {cls!r}"
            )
        own = cls.__dict__.get("name")
        if own is None:
            cls.name = name
        elif own != name:
            raise RewardError(
                f"@register_reward({name!r}) on {cls.__name__}, whose `name` is {own!r}; "
                f"use the same string in both places"
            )
        existing = REWARDS.get(name)
        # Same qualified class again = module re-import; anything else is a clash.
        if existing is not None and (existing.__module__, existing.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise RewardError(
                f"reward name {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}; pick a different name"
            )
        _check_reward_attributes(name, cls.modality, cls.kind, cls.objectives, cls)
        REWARDS[name] = cls
        return cls

    return decorator


def available_rewards() -> list[str]:
    """Sorted names of all registered rewards."""
    return sorted(REWARDS)


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Instantiate the registered reward ``name`` with constructor ``kwargs``.

    Raises:
        RewardError: unknown name (with the closest registered name), or
            keyword arguments the reward's constructor does not accept.
    """
    cls = REWARDS.get(name)
    if cls is None:
        valid = available_rewards()
        close = difflib.get_close_matches(str(name), valid, n=1)
        suggestion = f"did you mean '{close[0]}'? " if close else ""
        raise RewardError(f"unknown reward {name!r}; {suggestion}valid names: {', '.join(valid)}")
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as exc:
        params = [
            p.name
            for p in inspect.signature(cls).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        raise RewardError(
            f"reward {name!r} cannot be built with {sorted(kwargs)}: {exc}; "
            f"accepted arguments: {params or 'none'}"
        ) from None
    return cls(**kwargs)
