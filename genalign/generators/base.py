"""The generator protocol: the only thing pipelines, engine, trainer, CLI and gallery know about a model.

A model family (latent text-to-image diffusion, masked discrete diffusion over tokens, …) is one class that
implements `Generator`. A pipeline sees a generator as a stochastic policy:

- `sample(conditions, options, seeds=...)` → `Rollout`: the outputs (typed by `modality`), the conditions,
  and a `Trajectory` of states with the log-probability of every step as it was sampled;
- `step_log_prob(trajectory, step_index)`: those log-probabilities re-evaluated under the current weights,
  differentiable (importance ratios, PRDP's implied reward, KL terms);
- `sample_differentiable(...)`: samples whose outputs carry gradients into the weights (DRaFT, DRAKES);
- `trainable_modules()` and `reference()`: what the trainer trains, and a context computing with the
  pretrained weights;
- `save_pretrained` / `from_pretrained`: the family's native format.

Outputs by modality (what rewards receive):
    "image":    [B, 3, H, W] float in [0, 1]
    "audio":    [B, samples] float waveform in [−1, 1]
    "sequence": [B, L] long token ids from `sample`; [B, L, V] straight-through one-hot floats from
                `sample_differentiable` (sequence rewards accept both). Sequence generators also provide
                `decode(outputs) -> list[str]` for writers and galleries.

Re-evaluating a step in a batch of another size than it was sampled in agrees with the recorded log-prob to
the kernels' round-off (float32 matmuls round differently per batch shape): ratios are 1 ± ~1e-6, not
bit-exact 1; in the same batch they are exact.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence, runtime_checkable

import torch

from genalign.attention import AttentionBackend

Modality = Literal["image", "audio", "sequence"]


class ModelLoadError(OSError):
    """A model folder or hub id that cannot be loaded; the message says how to fix it."""


@dataclass
class Conditions:
    """A batch of B conditions: a text per sample (possibly empty) and optional per-sample tensors.

    Attributes:
        texts: B strings (prompts; "" for an unconditional model).
        tensors: name → [B, ...] tensors (control images, preference vectors, backbone features, …).
        ids: B stable keys, for per-condition statistics (e.g. DDPO's per-prompt reward buffers); by default
            the text, extended by a digest of the sample's tensors when there are any.
        expanded_texts: B detailed rewrites of the texts (a prompt-expansion network's output), or None. A
            generator with original-prompt-centred guidance (Parrot) conditions on both the text c and its
            expansion ĉ; the text stays the condition that rewards, keys and galleries refer to.
    """

    texts: list[str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    ids: list[str] | None = None
    expanded_texts: list[str] | None = None

    def __post_init__(self) -> None:
        self.texts = list(self.texts)
        if self.expanded_texts is not None:
            self.expanded_texts = list(self.expanded_texts)
            if len(self.expanded_texts) != len(self.texts):
                raise ValueError(f"{len(self.expanded_texts)} expanded texts for {len(self.texts)} conditions; "
                                 "pass one expansion per condition")
        for name, tensor in self.tensors.items():
            if tensor.shape[0] != len(self.texts):
                raise ValueError(
                    f"condition tensor '{name}' has {tensor.shape[0]} rows for {len(self.texts)} conditions; "
                    "pass one row per condition"
                )
        if self.ids is not None and len(self.ids) != len(self.texts):
            raise ValueError(f"{len(self.ids)} condition ids for {len(self.texts)} conditions")

    @classmethod
    def coerce(cls, conditions: "Conditions | Sequence[str]") -> "Conditions":
        """Accept a plain list of prompts wherever conditions are expected."""
        if isinstance(conditions, Conditions):
            return conditions
        if isinstance(conditions, str):
            raise TypeError("conditions must be a list of prompts (or Conditions), not a single string")
        return cls(texts=list(conditions))

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def keys(self) -> list[str]:
        if self.ids is not None:
            return list(self.ids)
        if not self.tensors:
            return list(self.texts)
        return [text + "#" + self._digest(i) for i, text in enumerate(self.texts)]

    def _digest(self, i: int) -> str:
        h = hashlib.sha1()
        for name in sorted(self.tensors):
            h.update(name.encode())
            h.update(self.tensors[name][i].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def __getitem__(self, index) -> "Conditions":
        """Select conditions by a slice, an index list or an index tensor."""
        if isinstance(index, slice):
            rows = list(range(len(self)))[index]
        else:
            rows = [int(i) for i in torch.as_tensor(index).reshape(-1).tolist()]
        return Conditions(
            texts=[self.texts[i] for i in rows],
            tensors={name: t[torch.as_tensor(rows, dtype=torch.long, device=t.device)] for name, t in self.tensors.items()},
            ids=None if self.ids is None else [self.ids[i] for i in rows],
            expanded_texts=None if self.expanded_texts is None else [self.expanded_texts[i] for i in rows],
        )

    @staticmethod
    def cat(items: Sequence["Conditions"]) -> "Conditions":
        first = items[0]
        return Conditions(
            texts=[t for item in items for t in item.texts],
            tensors={name: torch.cat([item.tensors[name] for item in items]) for name in first.tensors},
            ids=None if first.ids is None else [i for item in items for i in item.ids],
            expanded_texts=None if first.expanded_texts is None
            else [t for item in items for t in item.expanded_texts],
        )


@dataclass
class Trajectory:
    """A batch of B recorded sampling trajectories of T steps.

    Attributes:
        states: [B, T+1, ...] the states the steps went through (index i is the input of step i, T the output).
        log_probs: [B, T] float64 log π(state i+1 | state i, c) as sampled (0 on steps without a density).
        trainable: [T] bool, the steps with a density to train on (stochastic steps).
        conditioning: name → [B, ...] tensors the model was conditioned on (text embeddings, …).
        options: the sampling options the trajectory was drawn with (family-specific; the generator needs
            them to re-evaluate a step, a pipeline never looks inside).
    """

    states: torch.Tensor
    log_probs: torch.Tensor
    trainable: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    options: Any

    def __len__(self) -> int:
        return int(self.states.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.log_probs.shape[1])

    @property
    def trainable_steps(self) -> torch.Tensor:
        """Indices [S] of the steps with a density, in sampling order."""
        return torch.nonzero(self.trainable.cpu()).flatten()

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Trajectory":
        """Apply `fn` to every per-sample tensor (each has the batch as dimension 0)."""
        return replace(
            self,
            states=fn(self.states),
            log_probs=fn(self.log_probs),
            conditioning={name: fn(t) for name, t in self.conditioning.items()},
        )

    def __getitem__(self, index) -> "Trajectory":
        """Select samples (an index tensor, list or slice) along the batch dimension."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)

        def select(t: torch.Tensor) -> torch.Tensor:
            return t[index if isinstance(index, slice) else index.to(t.device)]

        return self.map(select)

    @staticmethod
    def cat(items: Sequence["Trajectory"]) -> "Trajectory":
        first = items[0]
        return replace(
            first,
            states=torch.cat([t.states for t in items]),
            log_probs=torch.cat([t.log_probs for t in items]),
            conditioning={name: torch.cat([t.conditioning[name] for t in items]) for name in first.conditioning},
        )


@dataclass
class Rollout:
    """What `Generator.sample` returns.

    Attributes:
        outputs: the samples in the modality's reward-facing form (see the module docstring); None if the
            generator was asked not to decode.
        modality: "image", "audio" or "sequence".
        conditions: the B conditions, one per sample.
        trajectory: the recorded trajectory (None if not requested).
        extras: family-specific tensors worth keeping (e.g. final latents), [B, ...].
    """

    outputs: torch.Tensor | None
    modality: Modality
    conditions: Conditions
    trajectory: Trajectory | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.conditions)

    @property
    def texts(self) -> list[str]:
        return self.conditions.texts

    @staticmethod
    def cat(items: Sequence["Rollout"]) -> "Rollout":
        first = items[0]
        return Rollout(
            outputs=None if first.outputs is None else torch.cat([r.outputs for r in items]),
            modality=first.modality,
            conditions=Conditions.cat([r.conditions for r in items]),
            trajectory=None if first.trajectory is None else Trajectory.cat([r.trajectory for r in items]),
            extras={name: torch.cat([r.extras[name] for r in items]) for name in first.extras},
        )


@runtime_checkable
class Generator(Protocol):
    """A model family as a stochastic policy (see the module docstring)."""

    modality: Modality

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> "Generator":
        """Load from the family's native format (a folder, or a hub id where the family has a hub)."""
        ...

    @property
    def device(self) -> torch.device: ...

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Generator": ...

    def default_options(self) -> Any:
        """The family's sampling options with their defaults (a dataclass pipelines fill from their config)."""
        ...

    def sample(
        self,
        conditions: Conditions | Sequence[str],
        options: Any = None,
        *,
        seeds: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_trajectory: bool = True,
        progress: bool = False,
    ) -> Rollout:
        """One sample per condition. Per-sample `seeds` make each sample independent of batching and of which
        process draws it."""
        ...

    def trainable_steps(self, options: Any) -> torch.Tensor:
        """[T] bool: which steps of a trajectory sampled with these options have a density to train on (known
        before sampling, so that a pipeline can size its gradient accumulation)."""
        ...

    def step_log_prob(self, trajectory: Trajectory, step_index: torch.Tensor) -> torch.Tensor:
        """[B] float64 log π_θ(state i+1 | state i, c) under the current weights for step index [B] per sample;
        differentiable with respect to the trainable modules."""
        ...

    def sample_differentiable(
        self,
        conditions: Conditions | Sequence[str],
        options: Any = None,
        *,
        grad_steps: int = 1,
        seeds: Sequence[int] | None = None,
        **method_options: Any,
    ) -> Rollout:
        """Samples whose outputs carry gradients through the last `grad_steps` steps (no trajectory)."""
        ...

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """The modules fine-tuning may change, by name (the same names every call)."""
        ...

    def set_training_modules(self, modules: dict[str, torch.nn.Module]) -> None:
        """Run forward passes through these stand-ins (distributed wrappers of `trainable_modules()`)."""
        ...

    def keep_reference_copy(self) -> None:
        """Keep a frozen copy of the trainable modules as they are now, for `reference()` under full
        fine-tuning (a no-op cost under LoRA, which disables its adapters instead). Call before training."""
        ...

    def reference(self) -> contextlib.AbstractContextManager:
        """A context in which every computation uses the pretrained weights: LoRA adapters disabled
        (`adapters_disabled`), or the frozen copy of `keep_reference_copy` under full fine-tuning."""
        ...

    def set_attention_backend(self, backend: AttentionBackend) -> dict[str, str]:
        """Run every attention layer of the generator's models (denoiser, VAE, text encoders, …, and the frozen
        reference copy) on `backend` (`genalign.attention`: "sdpa", "sdpa_math", "naive", …). Returns {module
        name: what its attention layers now run}; models without attention say so."""
        ...

    def save_pretrained(self, path) -> Any:
        """Write the model (with its current weights) in the family's native format."""
        ...

    def save_adapter(self, path) -> Any:
        """Write the trainable modules' LoRA adapters in the family's native format (diffusion: diffusers'
        `pytorch_lora_weights.safetensors`, loadable by `load_lora_weights`)."""
        ...


# ----------------------------------------------------------------------------------- shared helpers


def adapter_layers(modules: dict[str, torch.nn.Module]) -> list[torch.nn.Module]:
    """The peft LoRA layers inside `modules` (empty when they are fully fine-tuned or untouched)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for module in modules.values() for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(modules: dict[str, torch.nn.Module]) -> Iterator[None]:
    """Inside the context the modules compute with their pretrained weights: every LoRA adapter is off.

    This is how `Generator.reference()` works under LoRA, with no second copy of the model in memory; under
    full fine-tuning a generator routes its forward passes to a frozen copy instead (`keep_reference_copy`).
    """
    layers = adapter_layers(modules)
    if not layers:
        raise RuntimeError("no LoRA adapters to disable; under full fine-tuning call keep_reference_copy() "
                           "before training so that reference() has the pretrained weights")
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def per_sample_generators(seeds: Sequence[int] | None, count: int) -> list[torch.Generator] | None:
    """One CPU torch.Generator per sample from its seed (None without seeds)."""
    if seeds is None:
        return None
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} conditions; pass one seed per sample")
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
