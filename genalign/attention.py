"""One switch for the attention kernels of every model a run builds or wraps (`trainer.attention`).

Backends:
    "sdpa"            torch's `scaled_dot_product_attention`, torch choosing among its fused kernels (default);
    "sdpa_flash"      the same, pinned to the flash kernel (CPU and CUDA);
    "sdpa_efficient"  pinned to the memory-efficient kernel (CUDA only);
    "sdpa_math"       pinned to the math kernel, torch's unfused reference (CPU and CUDA);
    "sdpa_cudnn"      pinned to cuDNN's kernel (CUDA only);
    "xformers"        `xformers.ops.memory_efficient_attention` (CUDA only; `pip install genalign[gpu]`);
    "naive"           explicit softmax(QKᵀ/√d)·V, a code path independent of torch's SDPA.

What each model family does with it (`set_attention_backend`):
- diffusers models (UNet, VAE, ControlNet, transformer denoisers): every attention layer gets the processor of
  its own variant — AttnProcessor2_0 (sdpa*), AttnProcessor (naive) or XFormersAttnProcessor, and the
  AttnAddedKV… processors for added-key/value layers. Processors only call the layer's projections, so LoRA
  adapters on `to_q`/`to_k`/`to_v`/`to_out.0` keep working.
- transformers models: `set_attn_implementation("sdpa")` for sdpa* and xformers (transformers has no xformers
  path: those models run torch's SDPA with every kernel allowed), "eager" for naive. Models transformers gives
  no SDPA implementation (the CLAP models in transformers 5.24) stay eager, and the report says so.
- our own transformers (`SwitchableAttention` modules: the masked-diffusion transformer, the GFlowNet
  policies): their `attention_backend` attribute, read by `attention(...)` at every forward.
- torch's `nn.MultiheadAttention` (open_clip models) is left as it is: it runs torch's SDPA, so the pinned
  kernels apply, but it has no naive or xformers path.
- ProteinMPNN has no softmax attention to switch (its layers sum MLP messages over nearest neighbours).

The `sdpa_*` pins are torch's process-global flags (`torch.backends.cuda.enable_flash_sdp` & co.), which govern
CPU dispatch as well; "sdpa", "naive" and "xformers" enable every kernel, so that the models left on torch's
SDPA dispatch as usual. `sdpa_kernels(backend)` sets them for a block and restores the previous ones.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from genalign.config import ConfigError

AttentionBackend = Literal["sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_math", "sdpa_cudnn", "xformers", "naive"]
BACKENDS: tuple[str, ...] = get_args(AttentionBackend)

# The SDPA kernels each backend allows; getter and setter of torch's global flag per kernel.
_ALL_KERNELS = frozenset({"flash", "efficient", "math", "cudnn"})
_KERNELS: dict[str, frozenset[str]] = {
    "sdpa": _ALL_KERNELS,
    "sdpa_flash": frozenset({"flash"}),
    "sdpa_efficient": frozenset({"efficient"}),
    "sdpa_math": frozenset({"math"}),
    "sdpa_cudnn": frozenset({"cudnn"}),
    "xformers": _ALL_KERNELS,
    "naive": _ALL_KERNELS,
}
_FLAGS = {
    "flash": (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp),
    "efficient": (torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.enable_mem_efficient_sdp),
    "math": (torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.enable_math_sdp),
    "cudnn": (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp),
}

# diffusers processors by attention variant: (naive, sdpa, xformers). A layer keeps its variant.
_DIFFUSERS_PROCESSORS = (
    ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor"),
    ("AttnAddedKVProcessor", "AttnAddedKVProcessor2_0", "XFormersAttnAddedKVProcessor"),
)


class AttentionBackendError(ConfigError):
    """An attention backend that cannot run here; the message says why and which one to use instead."""


class SwitchableAttention:
    """Mixin for our own modules that compute attention with `attention(...)`: they pass `self.attention_backend`,
    which `set_attention_backend` sets (a plain attribute: not in the state dict, copied by deepcopy)."""

    attention_backend: AttentionBackend = "sdpa"


# ----------------------------------------------------------------------------------- checks and kernel flags


def _check_name(backend: str) -> None:
    if backend not in BACKENDS:
        close = difflib.get_close_matches(str(backend), BACKENDS, n=1, cutoff=0.0)
        raise AttentionBackendError(f"unknown attention backend {backend!r}; did you mean {close[0]!r}? Set "
                                    f"trainer.attention to one of {', '.join(BACKENDS)}")


def check_attention_backend(backend: str, device: torch.device | str) -> None:
    """Raise `AttentionBackendError` if `backend` cannot run on `device` (the run's device: CUDA or not)."""
    _check_name(backend)
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if backend == "xformers" and not on_cuda:
        raise AttentionBackendError(f"xformers has no {device.type.upper()} kernels; set trainer.attention=sdpa "
                                    "(torch's fused attention, which runs everywhere)")
    if backend == "xformers" and importlib.util.find_spec("xformers") is None:
        raise AttentionBackendError("trainer.attention=xformers needs the xformers package, which is not installed; "
                                    "pip install genalign[gpu], or set trainer.attention=sdpa")
    if backend in ("sdpa_efficient", "sdpa_cudnn") and not on_cuda:
        raise AttentionBackendError(f"{backend} pins a CUDA-only kernel and this run is on {device.type.upper()}; "
                                    "set trainer.attention=sdpa (or sdpa_flash / sdpa_math, which run on CPU too)")
    if backend == "sdpa_flash" and on_cuda:
        if not torch.backends.cuda.is_flash_attention_available():
            raise AttentionBackendError("this torch build has no CUDA flash-attention kernel; set "
                                        "trainer.attention=sdpa (or sdpa_efficient)")
        if torch.cuda.get_device_capability(device) < (8, 0):
            raise AttentionBackendError(f"torch's flash attention needs an Ampere or newer GPU (compute capability "
                                        f"8.0+), and {torch.cuda.get_device_name(device)} is older; set "
                                        "trainer.attention=sdpa (or sdpa_efficient)")


def pin_sdpa_kernels(backend: AttentionBackend) -> None:
    """Allow only `backend`'s SDPA kernels, process-wide (every kernel for sdpa, naive and xformers)."""
    _check_name(backend)
    for kernel, (_, enable) in _FLAGS.items():
        enable(kernel in _KERNELS[backend])


@contextlib.contextmanager
def sdpa_kernels(backend: AttentionBackend) -> Iterator[None]:
    """`pin_sdpa_kernels(backend)` inside the block; the flags as they were afterwards."""
    previous = {kernel: enabled() for kernel, (enabled, _) in _FLAGS.items()}
    try:
        pin_sdpa_kernels(backend)
        yield
    finally:
        for kernel, (_, enable) in _FLAGS.items():
            enable(previous[kernel])


# ----------------------------------------------------------------------------------- the computation


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: AttentionBackend = "sdpa",
              is_causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(QKᵀ/√d + mask)·V with the chosen backend; SDPA's semantics for every backend.

    Args:
        q: [B, H, L, D]; k, v: [B, H, S, D].
        is_causal: query i attends to keys 0…i (top-left aligned when L ≠ S, as SDPA).
        attn_mask: broadcastable to [B, H, L, S]; bool (True = attend) or float (added to the scores).
    Returns:
        [B, H, L, D] in the dtype of q.
    """
    if is_causal and attn_mask is not None:
        raise ValueError("pass is_causal or attn_mask, not both (fold the causal mask into attn_mask)")
    if backend == "naive":
        return _naive_attention(q, k, v, is_causal, attn_mask)
    if backend == "xformers":
        return _xformers_attention(q, k, v, is_causal, attn_mask)
    _check_name(backend)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def _naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
                     attn_mask: torch.Tensor | None) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # [B, H, L, S]
    if is_causal:
        length, source = scores.shape[-2:]
        allowed = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    # Softmax in float32, as transformers' eager path does, so half precision loses nothing here.
    return scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
                        attn_mask: torch.Tensor | None) -> torch.Tensor:
    import xformers.ops as xops

    bias = None
    if is_causal:
        bias = xops.LowerTriangularMask()
    elif attn_mask is not None:
        batch, heads, length, source = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        additive = attn_mask
        if attn_mask.dtype == torch.bool:
            additive = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
        # xformers wants a dense [B, H, L, S] bias whose rows start at multiples of 8 elements: pad, then slice.
        padded = -(-source // 8) * 8
        bias = torch.empty(batch, heads, length, padded, dtype=q.dtype, device=q.device)[..., :source]
        bias.copy_(additive.to(q.dtype).expand(batch, heads, length, source))
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)  # [B, L, H, D] → [B, H, L, D]


# ----------------------------------------------------------------------------------- setting it on models


def set_attention_backend(modules: nn.Module | Mapping[str, nn.Module | None],
                          backend: AttentionBackend) -> dict[str, str]:
    """Set `backend` on every attention layer inside `modules` (walking each tree; see the module docstring).

    Only the model-side choice: it neither checks the device nor pins torch's kernel flags
    (`apply_attention_backend` does all three).

    Args:
        modules: one module, or modules by name (None entries are skipped).
    Returns:
        {name: what its attention layers now run}, e.g. {"denoiser": "diffusers AttnProcessor ×7"}; "no attention
        layers" for a module without any.
    """
    _check_name(backend)
    if isinstance(modules, nn.Module):
        modules = {type(modules).__name__: modules}
    report = {}
    for name, module in modules.items():
        if module is None:
            continue
        found: Counter[str] = Counter()
        _set_in_tree(module, backend, found)
        report[name] = "; ".join(f"{what} ×{n}" if n > 1 else what for what, n in found.items()) or "no attention layers"
    return report


def _set_in_tree(module: nn.Module, backend: AttentionBackend, found: Counter[str]) -> None:
    pretrained = _transformers_pretrained_model()
    # diffusers finds its attention layers the same way (AttentionMixin.set_attn_processor).
    if hasattr(module, "set_processor") and hasattr(module, "processor"):
        found[_set_diffusers_processor(module, backend)] += 1
        return  # below it: the projections (LoRA layers included)
    if pretrained is not None and isinstance(module, pretrained):
        # transformers names every attention layer *Attention* (its _can_set_attn_implementation relies on it too);
        # a model without one (a HiFi-GAN vocoder) has nothing to switch.
        if any("Attention" in type(m).__name__ for m in module.modules()):
            found[_set_transformers_implementation(module, backend)] += 1
        return  # set_attn_implementation reaches its sub-models
    if isinstance(module, SwitchableAttention):
        module.attention_backend = backend
        found[f"{backend} ({type(module).__name__})"] += 1
    elif isinstance(module, nn.MultiheadAttention):
        found["torch nn.MultiheadAttention, unchanged (SDPA)"] += 1
        return
    for child in module.children():
        _set_in_tree(child, backend, found)


def _set_diffusers_processor(layer: nn.Module, backend: AttentionBackend) -> str:
    from diffusers.models import attention_processor

    current = type(layer.processor).__name__
    variant = next((names for names in _DIFFUSERS_PROCESSORS if current in names), None)
    if variant is None:
        if backend in ("naive", "xformers"):
            raise AttentionBackendError(
                f"a diffusers attention layer uses {current}, which has no {backend} counterpart here; set "
                f"trainer.attention=sdpa (or another sdpa_* variant), which leaves the layer's processor as it is"
            )
        return f"diffusers {current}, unchanged"
    naive, fused, xformers = variant
    if backend == "naive" or (backend != "xformers" and not getattr(layer, "scale_qk", True)):
        # The SDPA processors ignore a non-default scale (scale_qk=False); diffusers then uses the naive one too.
        wanted = naive
    elif backend == "xformers":
        wanted = xformers
    else:
        wanted = fused
    if current != wanted:
        layer.set_processor(getattr(attention_processor, wanted)())
    return f"diffusers {wanted}"


def _set_transformers_implementation(model: nn.Module, backend: AttentionBackend) -> str:
    wanted = "eager" if backend == "naive" else "sdpa"
    name = type(model).__name__
    current = model.config._attn_implementation
    if wanted == "sdpa" and not model._supports_sdpa:
        return f"transformers {current} ({name}: transformers has no sdpa implementation for it)"
    if current != wanted:
        if not hasattr(model, "set_attn_implementation"):
            raise AttentionBackendError(f"{name} cannot change its attention implementation in this transformers "
                                        "version; upgrade transformers (pip install -U transformers)")
        if not model._can_set_attn_implementation():
            return f"transformers {current} ({name} cannot switch it)"
        model.set_attn_implementation(wanted)
    return f"transformers {model.config._attn_implementation} ({name})"


def _transformers_pretrained_model() -> type | None:
    """transformers' PreTrainedModel, or None when transformers was never imported: then no model of it can be in
    the tree, and importing it here would cost seconds in runs that never use it."""
    if "transformers" not in sys.modules:
        return None
    from transformers import PreTrainedModel

    return PreTrainedModel


# ----------------------------------------------------------------------------------- the engine's entry point


def run_device() -> torch.device:
    """The device to check a run's backend for: CUDA when there is one (the Trainer then trains there), else CPU,
    which also stands for MPS and XPU: xformers and the CUDA-only kernels are missing there too."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def apply_attention_backend(backend: AttentionBackend, device: torch.device | str, /,
                            **targets: object) -> dict[str, str]:
    """Check `backend` for `device`, pin torch's SDPA kernels, and set it on every target.

    Args:
        targets: by name: nn.Modules (a reward, a policy), generators (anything with `set_attention_backend`,
            which lists its own modules) or None. Any other object (a gold judge that is not a module, a plain
            reward function) holds no model this can reach; the report says it was left unchanged.
    Returns:
        {"target.module": what its attention layers now run}, for a log line.
    """
    check_attention_backend(backend, device)
    pin_sdpa_kernels(backend)
    report = {}
    for name, target in targets.items():
        if target is None:
            continue
        # Modules first: diffusers models have a set_attention_backend of their own, with other names.
        if isinstance(target, nn.Module):
            report.update(set_attention_backend({name: target}, backend))
        elif hasattr(target, "set_attention_backend"):
            report.update({f"{name}.{part}": what for part, what in target.set_attention_backend(backend).items()})
        else:
            report[name] = f"not a module ({type(target).__name__}), unchanged"
    return report
