"""How the same training computes faster: TF32 matmuls, channels-last convolutions, torch.compile, 8-bit AdamW.

The `Trainer` applies these from its config (`trainer.tf32`, `trainer.channels_last`, `trainer.compile`,
`trainer.optimizer`); none of them changes the method, only the kernels and the optimiser's storage. The
attention kernels have their own module (`genalign.attention`, `trainer.attention`).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from genalign.config import ConfigError


def set_tf32(enabled: bool) -> None:
    """TF32 tensor-core matmuls and convolutions for float32 on CUDA (Ampere and newer), or strict float32.

    Process-wide; no effect on CPU computations."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def to_channels_last(module: torch.nn.Module) -> bool:
    """Store the 4-D weights of `module` in channels-last (NHWC) memory format, in place; True if it has any.

    Convolutions then run NHWC kernels (faster with tensor cores) and pass channels-last activations on; values
    are unchanged, so sampling and re-evaluation still agree."""
    if not any(p.ndim == 4 for p in module.parameters()):
        return False
    module.to(memory_format=torch.channels_last)
    return True


def compile_module(module: torch.nn.Module, mode: str, backend: str) -> torch.nn.Module:
    """`torch.compile` of a (possibly DDP/FSDP-wrapped) module: the compiled forward, same parameters.

    Shapes change between sampling (a chunk, doubled by CFG) and training (a micro-batch), so dims are marked
    dynamic after the first recompilation (torch's automatic dynamic shapes) instead of recompiling per size."""
    return torch.compile(module, mode=None if mode == "default" else mode, backend=backend)


def build_optimizer(name: str, groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW ("adamw_8bit": block-wise quantised moments, about a quarter of AdamW's
    state memory; tensors under 4,096 elements keep 32-bit state)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("trainer.optimizer=adamw_8bit needs bitsandbytes, which is not installed: "
                          "pip install genalign[bnb] (or bitsandbytes), or set trainer.optimizer=adamw")
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
