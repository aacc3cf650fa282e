"""Sharded training through accelerate (FSDP, DeepSpeed ZeRO 1–2): which strategy a launch asks for, what each
supports, the full weights where a whole copy is needed (inference, exports), and FSDP checkpoints of sharded
state that resume on any process count.

`accelerate launch --config_file configs/accelerate/fsdp.yaml ...` shards the trained module's parameters,
gradients and optimiser state over the processes (torch's FSDP2, `fully_shard`; each parameter becomes a DTensor
holding this process's rows). Everything else in the engine stays as it is; the `Trainer` calls into this module
where sharding changes what a step means:

- inference (sampling, held-out evaluation) runs inside `gathered_weights`: every process all-gathers the
  module's weights once and keeps them for the whole context, so that a forward pass makes no collective call —
  processes may then sample different numbers of samples, as evaluation shards do, without deadlocking, and
  sampling T steps costs one all-gather instead of T. This is what RL trainers do for generation under sharding
  (weights gathered for rollouts, sharded for updates); it needs the memory of one full copy, like DDP.
- checkpoints hold the sharded state through torch.distributed.checkpoint (DCP), which is what accelerate's
  `save_state` writes for FSDP's SHARDED_STATE_DICT: each process writes its own rows, and DCP re-shards on load,
  so a checkpoint of N processes resumes on M, sharded or not.

accelerate switches FSDP on only on accelerators; torch's FSDP2 also runs on CPU processes (gloo), so a CPU
launch with an FSDP config gets it too (`enable_fsdp_on_cpu`) — that is how the tests exercise this path.

DeepSpeed ZeRO stages 1–2 (`configs/accelerate/deepspeed_zero2.yaml`) keep whole weights on every process and
partition gradients and optimiser state; the engine clips and applies each update inside the backward pass
that ends it, and keeps float32 master weights. Its checkpoints are the engine's own (`save_checkpoint`), which
DeepSpeed cannot re-partition for another process count: such a resume is refused with what to do. ZeRO-3
(sharded weights, gathered at every forward) is refused in favour of FSDP. On CPU processes DeepSpeed runs
over gloo (the Trainer tells accelerate so), which is how the tests exercise it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Literal

import torch

from genalign.config import ConfigError

Sharding = Literal["fsdp", "deepspeed"]


def requested_sharding() -> Sharding | None:
    """The sharded strategy the launcher's accelerate config asks for, readable before accelerate starts."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return None


def enable_fsdp_on_cpu(mixed_precision: str) -> None:
    """Turn accelerate's multi-CPU (gloo) state into FSDP, which accelerate itself enables only on accelerators.

    Must run after the Accelerator is built and before `prepare`. The plugin reads the FSDP_* variables that
    `accelerate launch --config_file` sets, as accelerate's own construction would.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    # AcceleratorState re-reads PartialState's distributed type whenever one is constructed: set both.
    for shared in (AcceleratorState._shared_state, PartialState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP


def check_shardable(sharding: Sharding, accelerator, modules: dict[str, torch.nn.Module], extra: dict,
                    optimizer: str) -> None:
    """The engine shards one trained module with no extra parameter groups (a DCP optimiser state maps every
    optimised parameter to a name in that module); anything else is refused with what to do instead."""
    if sharding == "deepspeed":
        stage = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2):
            raise ConfigError(
                f"DeepSpeed ZeRO stage {stage} shards the parameters themselves, which every sampling step would "
                "then gather; genalign runs ZeRO stages 1–2 (configs/accelerate/deepspeed_zero2.yaml) and shards "
                "parameters with FSDP (configs/accelerate/fsdp.yaml)")
    elif not accelerator.is_fsdp2:
        raise ConfigError("genalign shards with FSDP2 (torch's fully_shard); set fsdp_version: 2 in the accelerate "
                          "config, as configs/accelerate/fsdp.yaml does")
    if optimizer != "adamw":
        raise ConfigError(f"trainer.optimizer={optimizer} is not tested with sharded parameters (DTensors); use "
                          "trainer.optimizer=adamw under FSDP, whose shards already divide AdamW's state")
    if len(modules) != 1 or extra:
        trained = sorted(modules) + [f"extra.{name}" for name in extra]
        raise ConfigError(
            f"{sharding} shards one trained module, and this run trains {', '.join(trained)}; launch it with DDP "
            "instead (accelerate launch without a sharded config, or configs/accelerate/ddp.yaml)"
        )


def configure_deepspeed(accelerator, max_grad_norm: float) -> None:
    """Fill the DeepSpeed config fields that accelerate derives from a dataloader, which the engine's loop has not:
    DeepSpeed only checks batch arithmetic with them (our micro-batches are the pipelines'). Its clipping is
    ours. Must run before `prepare`."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = 1
    config["train_batch_size"] = accelerator.gradient_accumulation_steps * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm


def fsdp_modules(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Every FSDP unit inside `modules` (the root and the auto-wrapped blocks), outermost first."""
    from torch.distributed.fsdp import FSDPModule

    return [m for module in modules for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_weights(modules: list[torch.nn.Module], reshard_after_forward: bool) -> Iterator[None]:
    """Inside the context every FSDP unit of `modules` holds its full, unsharded weights, and forward passes
    neither all-gather nor free them. A collective: every process must enter and leave together.

    Args:
        reshard_after_forward: the plugin's setting, restored on the auto-wrapped units on exit (the root keeps
            its weights after forward, torch's default for it).
    """
    units = fsdp_modules(modules)
    if not units:
        yield
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        roots = {id(module) for module in modules}
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(reshard_after_forward and id(unit) not in roots, recurse=False)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every process must call it); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like_parameter(value: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as `parameter` is: this process's shard when the parameter is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(parameter, DTensor):
        return distribute_tensor(value.to(parameter.device, parameter.dtype), parameter.device_mesh,
                                 parameter.placements)
    return value.to(parameter.device, parameter.dtype)


def save_sharded(folder: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 parameters: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None) -> None:
    """Write the trained parameters, the optimiser state and the EMA as a DCP checkpoint (every process writes its
    own shards; a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"parameters": {name: p.detach() for name, p in parameters.items()},
             "optimizer": get_optimizer_state_dict(module, optimizer)}
    if ema is not None:
        state["ema"] = ema
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(folder: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 parameters: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None) -> None:
    """Read a `save_sharded` checkpoint into this run's parameters, optimiser and EMA in place, re-sharded for this
    run's processes (FSDP on any process count, or whole tensors without FSDP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"parameters": {name: p.detach() for name, p in parameters.items()},
             "optimizer": get_optimizer_state_dict(module, optimizer)}
    if ema is not None:
        state["ema"] = ema
    dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(module, optimizer, state["optimizer"])
