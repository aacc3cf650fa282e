"""The training loop's machinery, shared by every pipeline: accelerate, optimiser, LoRA, EMA, checkpoints, logs.

A pipeline owns the algorithm (what to sample, which loss); the `Trainer` owns everything around it:
devices and processes (accelerate), which parameters train (LoRA adapters through peft, or the full modules
the generator's `trainable_modules()` names, plus extra parameter groups such as a GFlowNet's log Z), AdamW
with gradient clipping and accumulation, an EMA of the trained weights, mixed precision, atomic checkpoints
that a resumed run continues from exactly, and metric logging (JSONL, tensorboard, wandb).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, GradScalerKwargs, InitProcessGroupKwargs, set_seed
from diffusers.optimization import get_scheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from genalign.compute import build_optimizer, compile_module, set_tf32, to_channels_last
from genalign.config import AtLeast, ConfigError, NonNegativeInt, PositiveInt, load_yaml, save_yaml
from genalign.sharding import (Sharding, check_shardable, configure_deepspeed, enable_fsdp_on_cpu, full_tensor,
    gathered_weights, like_parameter, load_sharded, requested_sharding, save_sharded)

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
# A sharded run's parameters, optimiser state and EMA, as a torch.distributed.checkpoint folder (genalign.sharding).
SHARDED_STATE = "sharded"
DEEPSPEED_TAG = "state"  # the DeepSpeed engine's checkpoint tag inside SHARDED_STATE
# A checkpoint being replaced by a new save of the same step waits under this prefix until the new one is in place.
ASIDE_PREFIX = ".old_"
# Config keys that may change between a run and its resumption without changing what it computes.
RESUME_IRRELEVANT_KEYS = (
    "trainer.resume", "trainer.allow_config_change", "trainer.progress", "trainer.log_with",
    "trainer.checkpoint_every", "trainer.keep_checkpoints",
    # Kernel choices: the same computation up to float round-off.
    "trainer.attention", "trainer.compile", "trainer.compile_mode", "trainer.compile_backend", "trainer.channels_last",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft) on the generator's trainable modules; disabled means full fine-tuning of them.
    `target_modules` names submodules of those modules (the defaults are diffusers' attention projections)."""

    enabled: bool = True
    rank: PositiveInt = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class TrainerConfig:
    """Optimisation, precision, checkpointing and logging settings common to all pipelines."""

    output_dir: str = "runs/default"
    seed: int = 0
    learning_rate: Annotated[float, AtLeast(0)] = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: Annotated[float, AtLeast(0, strict=True)] = 1.0
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: NonNegativeInt = 0
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # Under full fine-tuning (lora.enabled=false), train only the parameters whose names contain one of these
    # substrings (e.g. ["attn2"]: a diffusers UNet's cross-attention, what Parrot trains); empty = all of them.
    finetune_only: list[str] = field(default_factory=list)
    ema: bool = False
    ema_decay: Annotated[float, AtLeast(0)] = 0.999
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # fp16's GradScaler starts at this loss scale and halves it on every overflowing update.
    fp16_initial_loss_scale: Annotated[float, AtLeast(0, strict=True)] = 65536.0
    # How the same computation runs (docs/engine.md § Speed). `attention`: the attention kernels of every model
    # the run builds or wraps (generator, reward and judge models, GFlowNet policies): "sdpa" lets torch pick
    # among its fused kernels, "sdpa_flash" / "sdpa_efficient" / "sdpa_math" / "sdpa_cudnn" pin one, "xformers"
    # needs CUDA and the `gpu` extra, "naive" is the reference softmax(QKᵀ/√d)·V.
    attention: Literal["sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_math", "sdpa_cudnn", "xformers", "naive"] = "sdpa"
    # torch.compile the trainable modules (the denoiser, the ControlNet, a policy) after wrapping them; the
    # backend is torch.compile's ("inductor" generates kernels; "aot_eager" traces without, for debugging).
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    compile_backend: str = "inductor"
    # Convolutional modules (UNets, VAEs, ControlNets) in channels-last memory format: faster convolutions with
    # tensor cores; no effect on what is computed.
    channels_last: bool = False
    # TF32 matrix products and convolutions on CUDA (Ampere and newer): ~10-bit mantissas inside float32 matmuls.
    tf32: bool = False
    # "adamw_8bit": bitsandbytes' 8-bit AdamW (pip install bitsandbytes), a quarter of AdamW's state memory.
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    gradient_checkpointing: bool = False
    checkpoint_every: NonNegativeInt = 10
    keep_checkpoints: NonNegativeInt = 2
    resume: str | None = None
    # A resumed run refuses a config that differs from the one saved in the run folder (it would not equal
    # the uninterrupted run); set this to accept the changes, which are then recorded in warnings.log.
    allow_config_change: bool = False
    # Updates whose gradient norm is NaN/inf are skipped (with a warning); this many in a row stop the run.
    max_skipped_updates: PositiveInt = 5
    log_with: list[str] = field(default_factory=lambda: ["jsonl"])
    progress: bool = True


@dataclass
class ParameterGroup:
    """Parameters trained beside the generator's modules, with their own learning rate (e.g. a GFlowNet's log Z).
    Checkpointed with the weights, and their gradients averaged over processes like the modules' are."""

    parameters: dict[str, torch.nn.Parameter]
    learning_rate: float
    weight_decay: float | None = None  # None: the trainer's; 0 for quantities such as log Z that are not weights


class EMA:
    """Exponential moving average of the trained parameters (in at least float32: float64 models keep float64),
    keyed by parameter name so that a checkpoint's EMA loads into a freshly built model as well as into the
    training one."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.parameters = parameters
        self.decay = decay
        self.shadow = {name: p.detach().to(master_dtype(p.dtype), copy=True) for name, p in parameters.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.parameters.items():
            self.shadow[name].lerp_(param.detach().to(self.shadow[name].dtype), 1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the model (e.g. for evaluation)."""
        backup = {name: p.detach().clone() for name, p in self.parameters.items()}
        with torch.no_grad():
            for name, param in self.parameters.items():
                param.copy_(self.shadow[name].to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.parameters.items():
                    param.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole averages on the CPU (under FSDP gathered from the shards: every process must call)."""
        return {name: full_tensor(t).cpu().contiguous() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state.keys())
            raise CheckpointError(
                f"EMA checkpoint does not match the trained parameters ({len(missing)} missing, e.g. {missing[:2]}); "
                "resume with the model and LoRA settings it was trained with"
            )
        for name, shadow in self.shadow.items():
            shadow.copy_(like_parameter(state[name], shadow))


class Trainer:
    """Owns the accelerator, optimiser, LR schedule, EMA, checkpoints and logs for one run.

    Typical use inside a pipeline::

        trainer = Trainer(generator, config.trainer, accumulation_steps=n_backward_per_update, ...)
        start, state = trainer.resume_if_requested()     # restores everything, returns the next epoch
        for epoch in trainer.epochs(start, total):
            ...
            with trainer.accumulate():
                trainer.backward(loss)
                trainer.optimizer_step()                 # no-op until the last accumulation step
            trainer.log(metrics, step=epoch)
            trainer.maybe_checkpoint(epoch, total, state)

    Constructing a Trainer checks the run folder before writing to it: a fresh run refuses a folder that
    already holds checkpoints, and a resumed run refuses a config that differs from the saved one (unless
    `allow_config_change`); then `run_config` is saved as the folder's config.yaml.
    """

    def __init__(
        self,
        generator,
        config: TrainerConfig,
        *,
        accumulation_steps: int = 1,
        total_updates: int | None = None,
        run_config: dict[str, Any] | None = None,
        extra_parameters: dict[str, ParameterGroup] | None = None,
        keep_reference: bool = False,
    ) -> None:
        """
        Args:
            generator: any `genalign.generators.base.Generator`; its `trainable_modules()` are trained.
            accumulation_steps: backward calls per optimiser update (on each process).
            total_updates: optimiser updates in the whole run (for LR schedules).
            run_config: the pipeline config as a dict, saved as the run folder's config.yaml.
            extra_parameters: named groups of further parameters with their own learning rates (checkpointed,
                clipped and, with EMA on, averaged with the generator's).
            keep_reference: the pipeline needs `generator.reference()`; under full fine-tuning a frozen copy of
                the pretrained modules is kept for it (LoRA disables its adapters instead).
        """
        self.config = config
        self.run_dir = Path(config.output_dir)
        scaler_kwargs = GradScalerKwargs(init_scale=config.fp16_initial_loss_scale)
        handlers: list[Any] = [scaler_kwargs]
        # accelerate starts DeepSpeed only when not told the run is CPU-only; DeepSpeed then runs on CPU processes
        # over gloo, which accelerate must be told.
        deepspeed_on_cpu = requested_sharding() == "deepspeed" and not _has_accelerator()
        if deepspeed_on_cpu:
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=accumulation_steps,
            # accelerate treats a torchrun launch as multi-CPU (gloo) only when told the run is CPU-only.
            cpu=not _has_accelerator() and not deepspeed_on_cpu,
            kwargs_handlers=handlers,
        )
        if self.accelerator.num_processes != launched_processes():
            # Pipelines sized gradient accumulation from WORLD_SIZE before the Accelerator existed.
            raise RuntimeError(
                f"accelerate runs {self.accelerator.num_processes} processes but WORLD_SIZE is "
                f"{launched_processes()}; launch with `accelerate launch` or `torchrun`, which set WORLD_SIZE"
            )
        if config.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            _enable_cpu_fp16(self.accelerator, scaler_kwargs)
        if requested_sharding() == "fsdp" and self.accelerator.distributed_type == DistributedType.MULTI_CPU:
            enable_fsdp_on_cpu(config.mixed_precision)
        # None: every process holds whole weights (one process, or DDP); a single-process launch of a sharded
        # config runs unsharded too, as accelerate does.
        self.sharding: Sharding | None = {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(
            self.accelerator.distributed_type)
        self._resume_path = self._check_run_folder(run_config)
        set_tf32(config.tf32)
        set_seed(config.seed)
        self.generator = generator
        generator.to(self.accelerator.device)
        modules = prepare_trainable_modules(generator, config)
        if self.sharding is not None:
            check_shardable(self.sharding, self.accelerator, modules, extra_parameters or {}, config.optimizer)
        if self.sharding == "deepspeed":
            configure_deepspeed(self.accelerator, config.max_grad_norm)
        if config.channels_last:
            for module in modules.values():
                to_channels_last(module)
        if keep_reference:
            generator.keep_reference_copy()
        self.named_parameters = _trained_parameters(modules)
        self.parameters = list(self.named_parameters.values())
        if not self.parameters:
            setting = (f"trainer.lora.target_modules={list(config.lora.target_modules)}" if config.lora.enabled
                       else f"trainer.finetune_only={list(config.finetune_only)}")
            raise ConfigError(
                f"no trainable parameters: {setting} matches no parameter of {sorted(modules)}; name parts of the "
                "model (e.g. its attention projections, or 'attn2' for a diffusers UNet's cross-attention)"
            )
        self.extra_parameters = {
            f"extra.{group_name}.{name}": p
            for group_name, group in (extra_parameters or {}).items()
            for name, p in group.parameters.items()
        }
        # The generator was moved above; extra parameters belong to no module of it, so they move here.
        for p in self.extra_parameters.values():
            p.data = p.data.to(self.accelerator.device)
        # Train in float32 even if the model was loaded in half precision; autocast handles mixed precision.
        for p in [*self.parameters, *self.extra_parameters.values()]:
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        groups = [{"params": self.parameters, "lr": config.learning_rate}]
        groups += [{"params": list(group.parameters.values()), "lr": group.learning_rate,
                    "weight_decay": config.weight_decay if group.weight_decay is None else group.weight_decay}
                   for group in (extra_parameters or {}).values()]
        self.optimizer = build_optimizer(config.optimizer, groups, lr=config.learning_rate,
                                         betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                                         weight_decay=config.weight_decay)
        # Not handed to accelerator.prepare: its wrapper steps the schedule once per process on every update,
        # so a cosine schedule would run num_processes times too fast. It steps once per applied update here.
        self.lr_scheduler = get_scheduler(
            config.lr_schedule,
            self.optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=total_updates,
        )
        *wrapped, self.optimizer = self.accelerator.prepare(*modules.values(), self.optimizer)
        self._wrapped = wrapped
        # FSDP replaces each parameter by its sharded version (the optimiser was switched over by prepare).
        self.named_parameters = _trained_parameters(modules)
        self.parameters = list(self.named_parameters.values())
        # Forward passes go through the wrappers, compiled if asked; gradient sync keeps the uncompiled ones.
        forward = dict(zip(modules, wrapped))
        if config.compile:
            forward = {name: compile_module(module, config.compile_mode, config.compile_backend)
                       for name, module in forward.items()}
        generator.set_training_modules(forward)
        # The extra groups (e.g. Parrot's prompt-expansion network) are averaged too: an EMA evaluation must not
        # pair averaged generator weights with raw weights of the modules that condition it.
        self.ema = EMA(self._all_trained_parameters(), config.ema_decay) if config.ema else None
        self.updates = 0
        self.skipped_updates = 0
        self._skipped_in_a_row = 0
        self.run_config = run_config or {}
        self._writers: list[Any] = []
        self._last_grad_norm = float("nan")

    # ------------------------------------------------------------------ the run folder
    def _check_run_folder(self, run_config: dict[str, Any] | None) -> Path | None:
        """Validate the run folder against the request, then claim it; returns the checkpoint to resume.

        Runs before anything is written, so a refused start leaves the folder exactly as it was.
        """
        found = list_checkpoints(self.checkpoint_dir)
        path = resolve_checkpoint(self.config.resume, self.run_dir) if self.config.resume else None
        if path is None and found:
            raise ConfigError(
                f"'{self.run_dir}' already holds checkpoints of an earlier run ({found[-1].name}); pass "
                "trainer.resume=latest to continue it, or choose a new trainer.output_dir"
            )
        saved_config = self.run_dir / "config.yaml"
        changes: list[str] = []
        if path is not None and run_config is not None and saved_config.exists():
            changes = config_changes(load_yaml(saved_config), run_config)
            if changes and not self.config.allow_config_change:
                listed = "; ".join(changes[:6]) + ("; …" if len(changes) > 6 else "")
                raise ConfigError(
                    f"resuming '{self.run_dir}' with a config that differs from the one it was trained with "
                    f"({listed}); a resumed run would not equal the uninterrupted one. Resume with the saved "
                    "config, or pass trainer.allow_config_change=true to accept the changes"
                )
        self.accelerator.wait_for_everyone()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if path is None:
                # Records of an earlier attempt that died before its first checkpoint.
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            if run_config is not None:
                save_yaml(run_config, saved_config)
        self.accelerator.wait_for_everyone()
        if self.config.resume and path is None:
            self.warn(f"trainer.resume={self.config.resume} but '{self.checkpoint_dir}' holds no checkpoint yet; "
                      "starting from scratch")
        if changes:
            self.warn("resuming with config changes (trainer.allow_config_change=true): " + "; ".join(changes))
        return path

    # ------------------------------------------------------------------ processes
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor across processes along dim 0 (identity with one process); every process must
        pass the same shape (see `genalign.engine.gather_in_order` for uneven shards)."""
        return self.accelerator.gather(tensor.contiguous())

    def any_process(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any (a collective: every process must call it)."""
        if self.num_processes == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def mean_across_processes(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar statistics over processes, so logs describe the global batch."""
        if self.num_processes == 1 or not values:
            return values
        keys = sorted(values)
        stacked = torch.tensor([values[k] for k in keys], device=self.device, dtype=torch.float64)
        reduced = self.accelerator.reduce(stacked, reduction="mean")
        return {k: float(v) for k, v in zip(keys, reduced.tolist())}

    # ------------------------------------------------------------------ optimisation
    def accumulate(self):
        """Context for one backward call; gradients sync and the optimiser steps on the last of an update."""
        return self.accelerator.accumulate(*self._wrapped)

    def autocast(self):
        return self.accelerator.autocast()

    def gathered_weights(self) -> contextlib.AbstractContextManager:
        """Inference on whole weights: under FSDP every process all-gathers the trained module once for the
        context, so that sampling makes no collective call (processes may draw different numbers of samples);
        without sharding a no-op. A collective: every process must enter it together (see genalign.sharding)."""
        if self.sharding != "fsdp":
            return contextlib.nullcontext()
        return gathered_weights(self._wrapped, self.accelerator.state.fsdp_plugin.reshard_after_forward)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass; the loss is divided by the accumulation steps so an update averages its parts.

        A non-finite loss is not an error here: it makes the update's gradient norm non-finite on every
        process alike (DDP averages the gradients), and `optimizer_step` skips that update everywhere.
        """
        self.accelerator.backward(loss)

    @property
    def sync_gradients(self) -> bool:
        return self.accelerator.sync_gradients

    def optimizer_step(self) -> bool:
        """Clip, step, schedule, update EMA — only when this was the update's last accumulation step.

        An update whose gradient norm is NaN or infinite is skipped (no step, no schedule or EMA change), with
        a warning; `max_skipped_updates` in a row raise FloatingPointError. With fp16 the GradScaler sees the
        overflow and halves its loss scale; such skips count only once the scale has fallen below 1 (a NaN
        that no scale fixes, after ~16 halvings from 65536). Returns whether an update was applied.
        """
        if not self.accelerator.sync_gradients:
            return False
        self._average_extra_gradients()
        norm = float(full_tensor(self.accelerator.clip_grad_norm_(
            [*self.parameters, *self.extra_parameters.values()], self.config.max_grad_norm)))
        self._last_grad_norm = norm
        if not math.isfinite(norm) and self.sharding == "deepspeed":
            # The engine applied this update inside backward (it owns the step), so it cannot be skipped here.
            raise FloatingPointError(
                f"update {self.updates + 1}: gradient norm is {norm}, and DeepSpeed has already applied the update; "
                "the run stops before a checkpoint saves it (the last checkpoint is intact). Lower "
                "trainer.learning_rate or check the reward for extreme values")
        if not math.isfinite(norm):
            scaler = self.accelerator.scaler
            if scaler is not None:
                self.optimizer.step()  # GradScaler: skips the step and lowers the loss scale
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_updates += 1
            if scaler is not None and scaler.get_scale() >= 1.0:
                # An fp16 overflow while the loss scale is still finding its level: routine, and not counted.
                logger.info("update %d: fp16 gradient overflow, loss scale lowered to %g", self.updates + 1,
                            scaler.get_scale())
                return False
            self._skipped_in_a_row += 1
            limit = self.config.max_skipped_updates
            self.warn(f"update {self.updates + 1}: gradient norm is {norm}; update skipped "
                      f"({self._skipped_in_a_row} in a row, the run stops at {limit})")
            if self._skipped_in_a_row >= limit:
                raise FloatingPointError(
                    f"{limit} updates in a row had a non-finite gradient norm; the last checkpoint is intact. "
                    "Lower trainer.learning_rate, check the reward for extreme values, or try "
                    "trainer.mixed_precision=bf16 instead of fp16"
                )
            return False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update()
        self.updates += 1
        self._skipped_in_a_row = 0
        return True

    def _average_extra_gradients(self) -> None:
        """DDP averages the modules' gradients over processes; extra parameters are no module's, so here."""
        if self.num_processes == 1:
            return
        for param in self.extra_parameters.values():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad.copy_(self.accelerator.reduce(param.grad, reduction="mean"))

    @property
    def last_grad_norm(self) -> float:
        return self._last_grad_norm

    @property
    def learning_rate(self) -> float:
        return float(self.lr_scheduler.get_last_lr()[0])

    # ------------------------------------------------------------------ progress and logging
    def epochs(self, start: int, total: int, desc: str = "epochs") -> Iterator[int]:
        iterator = range(start, total)
        if self.config.progress and self.is_main:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc=desc, initial=start, total=total)
        return iter(iterator)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Append one record to metrics.jsonl (and tensorboard/wandb when enabled); main process only."""
        if not self.is_main:
            return
        if not self._writers:
            self._open_writers()
        record = {"step": step, "updates": self.updates, "skipped_updates": self.skipped_updates,
                  "time": round(time.time(), 3)}
        record.update({k: float(v) for k, v in metrics.items()})
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for writer in self._writers:
            writer(record, step)

    def _open_writers(self) -> None:
        self._writers.append(lambda record, step: None)
        if "tensorboard" in self.config.log_with:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(self.run_dir / "tensorboard"))

            def write_tb(record, step):
                for key, value in record.items():
                    if key not in ("step", "time") and math.isfinite(value):
                        tb.add_scalar(key, value, step)
                tb.flush()

            self._writers.append(write_tb)
        if "wandb" in self.config.log_with:
            try:
                import wandb
            except ImportError as error:
                raise ImportError("log_with includes 'wandb' but wandb is not installed: pip install genalign[wandb]") from error
            run = wandb.init(project="genalign", dir=str(self.run_dir), config=self.run_config)
            self._writers.append(lambda record, step: run.log(record, step=step))

    def warn(self, message: str) -> None:
        """A loud warning (main process only), also recorded in the run folder."""
        if not self.is_main:
            return
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        with open(self.run_dir / "warnings.log", "a", encoding="utf-8") as f:
            f.write(message + "\n")

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def maybe_checkpoint(self, epoch: int, total: int, pipeline_state: dict[str, Any]) -> Path | None:
        """Checkpoint after `epoch` if it is a multiple of checkpoint_every or the last one."""
        done = epoch + 1
        if done == total or (self.config.checkpoint_every > 0 and done % self.config.checkpoint_every == 0):
            return self.save_checkpoint(epoch, pipeline_state)
        return None

    def _all_trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {**self.named_parameters, **self.extra_parameters}

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: full_tensor(p.detach()).to(master_dtype(p.dtype)).cpu().contiguous()
                for name, p in self._all_trained_parameters().items()}

    def save_checkpoint(self, epoch: int, pipeline_state: dict[str, Any]) -> Path:
        """Write step_{epoch} so that a complete checkpoint exists at every instant.

        Everything goes to a temp folder that is renamed when complete; a checkpoint of the same step that
        already exists is first renamed aside (`list_checkpoints` still finds it there) and removed only once
        the new one is in place. Files and folders are fsynced before each rename.

        Contents: trainable weights (LoRA adapters or the full denoiser) in safetensors; the adapter in
        diffusers' format (`lora/`, EMA weights when EMA is on, the raw ones then in `lora_raw/`); optimiser,
        LR-scheduler and fp16 GradScaler states; EMA; every process's RNG states; the pipeline's own state (JSON,
        with any tensors in it — replay buffers, statistics — in pipeline_state.safetensors).
        """
        acc = self.accelerator
        final = self.checkpoint_dir / f"step_{epoch:06d}"
        tmp = self.checkpoint_dir / f".tmp_step_{epoch:06d}"
        acc.wait_for_everyone()
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng_state_{self.process_index}.pt")
        # The whole weights, for the exports; under FSDP gathering them is a collective, so every process calls.
        trainable = self._trainable_state()
        ema = self.ema.state_dict() if self.ema is not None else None
        if self.sharding == "fsdp":
            save_sharded(tmp / SHARDED_STATE, self._wrapped[0], self.optimizer.optimizer, self.named_parameters,
                         None if self.ema is None else self.ema.shadow)
        elif self.sharding == "deepspeed":
            # The engine's own format: the module's weights and each process's ZeRO partition of the optimiser.
            self._wrapped[0].save_checkpoint(str(tmp / SHARDED_STATE), tag=DEEPSPEED_TAG, save_latest=False)
        if self.is_main:
            # A sharded module's state_dict holds shards (FSDP2 supports no whole copy of it): `genalign export`
            # writes a sharded run's adapter from trainable.safetensors instead. (ZeRO 1–2 keep whole weights.)
            if self.config.lora.enabled and self.sharding != "fsdp":
                with self.ema_weights():
                    self.generator.save_adapter(tmp / "lora")
                if self.ema is not None:
                    self.generator.save_adapter(tmp / "lora_raw")
            save_file(trainable, str(tmp / "trainable.safetensors"))
            if self.sharding is None:
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), tmp / "grad_scaler.pt")
            if ema is not None:
                save_file(ema, str(tmp / "ema.safetensors"))
            json_state, tensors = _split_tensors(pipeline_state)
            if tensors:
                save_file(tensors, str(tmp / "pipeline_state.safetensors"))
            meta = {
                "epoch": epoch,
                "updates": self.updates,
                "skipped_updates": self.skipped_updates,
                "num_processes": self.num_processes,
                "sharding": self.sharding,
                "lora": self.config.lora.enabled,
                "pipeline_state": json_state,
                "python_random": _jsonable_python_rng(random.getstate()),
                "numpy_random": _jsonable_numpy_rng(np.random.get_state()),
            }
            (tmp / "trainer_state.json").write_text(json.dumps(meta))
        acc.wait_for_everyone()
        if self.is_main:
            _fsync_tree(tmp)
            if final.exists():
                aside = self.checkpoint_dir / f"{ASIDE_PREFIX}{final.name}"
                if aside.exists():
                    shutil.rmtree(aside)
                os.replace(final, aside)
                _fsync_dir(self.checkpoint_dir)
                os.replace(tmp, final)
                _fsync_dir(self.checkpoint_dir)
                shutil.rmtree(aside)
            else:
                os.replace(tmp, final)
                _fsync_dir(self.checkpoint_dir)
            self._prune_checkpoints()
        acc.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        if self.config.keep_checkpoints <= 0:
            return
        for old in list_checkpoints(self.checkpoint_dir)[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def resume_if_requested(self) -> tuple[int, dict[str, Any]]:
        """Restore the checkpoint named by config.resume ('latest' or a folder).

        Returns:
            (first epoch to run, the pipeline state saved with the checkpoint) — (0, {}) when not resuming
            (or when resume=latest found no checkpoint, which the constructor warned about).
        """
        if self._resume_path is None:
            return 0, {}
        return self.load_checkpoint(self._resume_path)

    def load_checkpoint(self, path: str | Path) -> tuple[int, dict[str, Any]]:
        path = Path(path)
        meta_path = path / "trainer_state.json"
        if not meta_path.exists():
            raise CheckpointError(f"'{path}' is not a complete checkpoint (no trainer_state.json)")
        meta = json.loads(meta_path.read_text())
        if meta["lora"] != self.config.lora.enabled:
            raise CheckpointError(
                f"checkpoint '{path}' was trained with lora.enabled={meta['lora']}; resume with the same setting"
            )
        params = self._all_trained_parameters()
        with safe_open(str(path / "trainable.safetensors"), framework="pt") as stored:
            names = set(stored.keys())
        missing, unexpected = sorted(set(params) - names), sorted(names - set(params))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint '{path}' does not match the model: {len(missing)} missing tensors "
                f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); "
                "resume with the same model and LoRA settings it was trained with"
            )
        ema_file = path / "ema.safetensors"
        with_ema = self.ema is not None and ema_file.exists()
        saved_sharding = meta.get("sharding")
        saved_processes = int(meta.get("num_processes", 1))
        if (saved_sharding == "deepspeed") != (self.sharding == "deepspeed"):
            raise CheckpointError(
                f"checkpoint '{path}' was written {'by' if saved_sharding == 'deepspeed' else 'without'} DeepSpeed, "
                "whose ZeRO optimiser state converts to no other strategy's; resume it "
                f"{'under' if saved_sharding == 'deepspeed' else 'without'} DeepSpeed (any process count)")
        if saved_sharding == "deepspeed":
            if saved_processes != self.num_processes:
                raise CheckpointError(
                    f"checkpoint '{path}' holds DeepSpeed ZeRO partitions of {saved_processes} process(es), which "
                    f"DeepSpeed cannot re-partition for {self.num_processes}; resume it on {saved_processes}, or "
                    "train with FSDP (configs/accelerate/fsdp.yaml), whose checkpoints move between process counts")
            self._wrapped[0].load_checkpoint(str(path / SHARDED_STATE), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
            if with_ema:
                self.ema.load_state_dict(load_file(str(ema_file)))
        elif (path / SHARDED_STATE).exists():
            # A sharded run's checkpoint: DCP re-shards it for this run's processes (or reads whole tensors).
            load_sharded(path / SHARDED_STATE, self._wrapped[0], self.optimizer.optimizer, self.named_parameters,
                         self.ema.shadow if with_ema else None)
        else:
            state = load_file(str(path / "trainable.safetensors"))
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(like_parameter(state[name], param))
            self._load_whole_optimizer_state(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
            if with_ema:
                self.ema.load_state_dict(load_file(str(ema_file)))
        self.lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
        scaler = self.accelerator.scaler
        if scaler is not None:
            scaler_file = path / "grad_scaler.pt"
            if scaler_file.exists():
                scaler.load_state_dict(torch.load(scaler_file, weights_only=True))
            else:
                self._missing_state(path, "fp16 GradScaler state (it was trained without fp16)", "a fresh loss scale")
        if self.ema is not None and not with_ema:
            self._missing_state(path, "EMA state (it was trained with trainer.ema=false)",
                                "an EMA started from the checkpoint's weights")
            self.ema = EMA(self._all_trained_parameters(), self.config.ema_decay)
        if saved_processes != self.num_processes:
            logger.info("resuming a checkpoint of %d process(es) on %d", saved_processes, self.num_processes)
        # Every process is seeded alike and runs the same program, so a process the checkpoint did not have
        # continues from process 0's random state (samples draw from their own seeds, not from these).
        rng_file = path / f"rng_state_{self.process_index}.pt"
        if not rng_file.exists():
            rng_file = path / "rng_state_0.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        random.setstate(_python_rng_from_json(meta["python_random"]))
        np.random.set_state(_numpy_rng_from_json(meta["numpy_random"]))
        self.updates = int(meta["updates"])
        self.skipped_updates = int(meta.get("skipped_updates", 0))
        if self.is_main:
            _truncate_metrics(self.run_dir / "metrics.jsonl", after_step=int(meta["epoch"]))
        logger.info("resumed from %s (epoch %d)", path, meta["epoch"])
        tensor_file = path / "pipeline_state.safetensors"
        # Loaded to the CPU first: safetensors refuses accelerate's "cpu:0", the device of a multi-process CPU run.
        tensors = ({name: t.to(self.device) for name, t in load_file(str(tensor_file)).items()}
                   if tensor_file.exists() else {})
        return int(meta["epoch"]) + 1, _join_tensors(meta["pipeline_state"], tensors)

    def _load_whole_optimizer_state(self, state: dict[str, Any]) -> None:
        """A checkpoint's whole optimiser state; under FSDP each per-parameter tensor is cut to this process's
        shard of its parameter (a DDP checkpoint continued with FSDP)."""
        self.optimizer.load_state_dict(state)
        if self.sharding is None:
            return
        optimizer = self.optimizer.optimizer
        for group in optimizer.param_groups:
            for param in group["params"]:
                per_parameter = optimizer.state.get(param, {})
                for key, value in per_parameter.items():
                    if torch.is_tensor(value) and value.shape == param.shape and value.ndim > 0:
                        per_parameter[key] = like_parameter(value, param)

    def _missing_state(self, path: Path, what: str, fallback: str) -> None:
        if not self.config.allow_config_change:
            raise CheckpointError(
                f"checkpoint '{path}' has no {what}; resume with the settings it was trained with, or pass "
                f"trainer.allow_config_change=true to continue with {fallback}"
            )
        self.warn(f"checkpoint '{path}' has no {what}; continuing with {fallback}")

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Evaluate with EMA weights when EMA is on (no-op otherwise)."""
        if self.ema is None:
            yield
        else:
            with self.ema.swapped_in():
                yield


def _trained_parameters(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """The parameters that train, named '<module name>.<parameter name>' (the checkpoint's keys)."""
    return {f"{module_name}.{name}": p for module_name, module in modules.items()
            for name, p in module.named_parameters() if p.requires_grad}


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision trained weights are kept and checkpointed in: float32 for half-precision models, else their
    own (a float64 model saved in float32 would resume 1e-8 away from where it stopped)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def launched_processes() -> int:
    """Process count set by the launcher (accelerate launch / torchrun), readable before accelerate starts.

    Pipelines need it to size gradient accumulation, which the Accelerator takes at construction.
    """
    return int(os.environ.get("WORLD_SIZE", "1"))


def _has_accelerator() -> bool:
    from accelerate.utils import is_npu_available, is_xpu_available

    return torch.cuda.is_available() or is_xpu_available() or is_npu_available() or torch.backends.mps.is_available()


def prepare_trainable_modules(generator, config: TrainerConfig) -> dict[str, torch.nn.Module]:
    """The generator's trainable modules, set up for training: frozen, then LoRA adapters added (or everything
    unfrozen for full fine-tuning), gradient checkpointing if asked, and eval mode — sampling and re-evaluation
    must compute the same function, so dropout-style train-mode behaviour stays off."""
    modules = generator.trainable_modules()
    if config.lora.enabled and config.finetune_only:
        raise ConfigError("trainer.finetune_only selects parameters for full fine-tuning; with LoRA choose the "
                          "layers by trainer.lora.target_modules instead (or set trainer.lora.enabled=false)")
    for name, module in modules.items():
        module.requires_grad_(False)
        if config.lora.enabled:
            add_lora(module, config.lora)
        elif config.finetune_only:
            for parameter_name, parameter in module.named_parameters():
                if any(part in parameter_name for part in config.finetune_only):
                    parameter.requires_grad_(True)
        else:
            module.requires_grad_(True)
        if config.gradient_checkpointing:
            if not hasattr(module, "enable_gradient_checkpointing"):
                raise ConfigError(f"trainer.gradient_checkpointing: the '{name}' module ({type(module).__name__}) "
                                  "has no enable_gradient_checkpointing(); set it to false for this model")
            module.enable_gradient_checkpointing()
        module.eval()
    return modules


def add_lora(module: torch.nn.Module, config: LoRAConfig) -> None:
    """Attach peft LoRA adapters (B initialised to 0, so the model is unchanged until trained) to any module.

    diffusers models go through their own `add_adapter`, which keeps the bookkeeping their LoRA savers read; any
    other module (a transformers LM too: its `add_adapter` needs a newer peft than the pinned one) gets peft's
    `inject_adapter_in_model`.
    """
    from diffusers import ModelMixin
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        init_lora_weights="gaussian",
        target_modules=list(config.target_modules),
    )
    try:
        if isinstance(module, ModelMixin):
            module.add_adapter(lora)
        else:
            inject_adapter_in_model(lora, module)
    except ValueError as error:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"trainer.lora.target_modules: {error}") from None


def trained_weights_file(checkpoint: str | Path, use_ema: bool = True) -> Path:
    """A checkpoint's EMA weights when it has them and `use_ema`, else its raw trained weights (same keys)."""
    ema_file = Path(checkpoint) / "ema.safetensors"
    return ema_file if use_ema and ema_file.exists() else Path(checkpoint) / "trainable.safetensors"


def load_trained_weights(generator, config: TrainerConfig, checkpoint: str | Path, *, use_ema: bool = True) -> None:
    """Put a checkpoint's trained weights into a freshly loaded generator (adding LoRA adapters first if used).

    Args:
        use_ema: take the EMA weights when the checkpoint has them (a run trained with trainer.ema=true);
            False takes the raw trained weights.
    """
    checkpoint = Path(checkpoint)
    meta = json.loads((checkpoint / "trainer_state.json").read_text())
    modules = generator.trainable_modules()
    if meta["lora"]:
        for module in modules.values():
            add_lora(module, config.lora)
    state = {k: v for k, v in load_file(str(trained_weights_file(checkpoint, use_ema))).items()
             if not k.startswith("extra.")}
    params = {f"{module_name}.{name}": p for module_name, module in modules.items()
              for name, p in module.named_parameters()}
    missing = sorted(set(state) - set(params))
    if missing:
        raise CheckpointError(f"checkpoint '{checkpoint}' has tensors the model lacks, e.g. {missing[:2]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints (step_N folders), oldest first; temp folders of interrupted saves are ignored.

    A step whose folder is missing but whose previous version sits aside (a save of the same step that was
    interrupted between its two renames) is listed by that version.
    """
    if not checkpoint_dir.is_dir():
        return []
    found: dict[int, Path] = {}
    for path in checkpoint_dir.iterdir():
        name = path.name.removeprefix(ASIDE_PREFIX)
        match = CHECKPOINT_PATTERN.match(name)
        if match and (path.name == name or int(match.group(1)) not in found):
            found[int(match.group(1))] = path
    return [found[step] for step in sorted(found)]


def resolve_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """'latest' → newest complete checkpoint of run_dir (None if none); otherwise an existing folder."""
    if resume == "latest":
        found = list_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(
            f"resume checkpoint '{resume}' does not exist; pass trainer.resume=latest or a folder like "
            f"{run_dir / 'checkpoints' / 'step_000009'}"
        )
    return path


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: old → new' for every leaf that differs between two config dicts (keys in `RESUME_IRRELEVANT_KEYS`
    aside)."""
    old, new = _flatten(saved), _flatten(current)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if key in RESUME_IRRELEVANT_KEYS or old.get(key, "<unset>") == new.get(key, "<unset>"):
            continue
        changes.append(f"{key}: {old.get(key, '<unset>')!r} → {new.get(key, '<unset>')!r}")
    return changes


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


_TENSOR_REF = "__tensor__"


def _split_tensors(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Pipeline state → (JSON-able copy with each tensor replaced by a reference, tensors by dotted name)."""
    if isinstance(state, torch.Tensor):
        return {_TENSOR_REF: prefix}, {prefix: state.detach().cpu().contiguous()}
    if isinstance(state, dict):
        plain, tensors = {}, {}
        for key, value in state.items():
            plain[key], found = _split_tensors(value, f"{prefix}.{key}" if prefix else str(key))
            tensors.update(found)
        return plain, tensors
    if isinstance(state, (list, tuple)):
        parts = [_split_tensors(value, f"{prefix}.{i}") for i, value in enumerate(state)]
        return [p for p, _ in parts], {k: v for _, found in parts for k, v in found.items()}
    return state, {}


def _join_tensors(state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(state, dict):
        if set(state) == {_TENSOR_REF}:
            return tensors[state[_TENSOR_REF]]
        return {key: _join_tensors(value, tensors) for key, value in state.items()}
    if isinstance(state, list):
        return [_join_tensors(value, tensors) for value in state]
    return state


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX: the directory entry itself must reach the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for item in root.rglob("*"):
        if item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
        elif item.is_dir():
            _fsync_dir(item)
    _fsync_dir(root)


def _enable_cpu_fp16(accelerator: Accelerator, scaler_kwargs: GradScalerKwargs) -> None:
    """fp16 autocast with loss scaling on the CPU, which accelerate leaves off there.

    CPU training in fp16 is rarely what one wants (bf16 is the CPU's half precision), but with this the fp16
    path that GPU configs use — autocast, GradScaler, its checkpointed state — runs and is tested on CPU too.
    Must run before `prepare`, which hands the scaler to the optimizer wrapper.
    """
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", **scaler_kwargs.to_kwargs())


def _truncate_metrics(path: Path, after_step: int) -> None:
    """Drop records logged after the checkpoint, so a resumed run's log equals an uninterrupted one."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= after_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda_{i}"] = s
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted(state) if k.startswith("cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def _jsonable_python_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


def _jsonable_numpy_rng(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), pos, has_gauss, cached]


def _numpy_rng_from_json(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
