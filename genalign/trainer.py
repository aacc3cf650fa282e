"""The training loop's machinery, shared by every pipeline: accelerate, optimiser, LoRA, EMA, checkpoints, logs.

A pipeline owns the algorithm (what to sample, which loss); the `Trainer` owns everything around it:
devices and processes (accelerate), which parameters train (LoRA adapters through peft, or the full
denoiser), AdamW with gradient clipping and accumulation, an EMA of the trained weights, mixed precision,
atomic checkpoints that a resumed run continues from exactly, and metric logging (JSONL, tensorboard, wandb).
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
from typing import Any, Iterator, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


@dataclass
class LoRAConfig:
    """Low-rank adapters on the denoiser (peft). Disabled means full fine-tuning of the denoiser."""

    enabled: bool = True
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class TrainerConfig:
    """Optimisation, precision, checkpointing and logging settings common to all pipelines."""

    output_dir: str = "runs/default"
    seed: int = 0
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = 0
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    ema: bool = False
    ema_decay: float = 0.999
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    resume: str | None = None
    log_with: list[str] = field(default_factory=lambda: ["jsonl"])
    progress: bool = True


class EMA:
    """Exponential moving average of the trained parameters (kept in float32)."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float) -> None:
        self.parameters = parameters
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in parameters]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, param in zip(self.shadow, self.parameters):
            shadow.lerp_(param.detach().float(), 1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the model (e.g. for evaluation)."""
        backup = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for shadow, param in zip(self.shadow, self.parameters):
                param.copy_(shadow.to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, param in zip(backup, self.parameters):
                    param.copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": t for i, t in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise CheckpointError(f"EMA checkpoint has {len(state)} tensors, the model has {len(self.shadow)}")
        for i, shadow in enumerate(self.shadow):
            shadow.copy_(state[f"ema.{i}"])


class Trainer:
    """Owns the accelerator, optimiser, LR schedule, EMA, checkpoints and logs for one run.

    Typical use inside a pipeline::

        trainer = Trainer(generator, config.trainer, accumulation_steps=n_backward_per_update, ...)
        start = trainer.resume_if_requested(state)       # restores everything, returns the next epoch
        for epoch in trainer.epochs(start, total):
            ...
            with trainer.accumulate():
                trainer.backward(loss)
                trainer.optimizer_step()                 # no-op until the last accumulation step
            trainer.log(metrics, step=epoch)
            trainer.maybe_checkpoint(epoch, state)
    """

    def __init__(
        self,
        generator,
        config: TrainerConfig,
        *,
        accumulation_steps: int = 1,
        total_updates: int | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.run_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=accumulation_steps,
            # accelerate treats a torchrun launch as multi-CPU (gloo) only when told the run is CPU-only.
            cpu=not _has_accelerator(),
        )
        if self.accelerator.num_processes != launched_processes():
            # Pipelines sized gradient accumulation from WORLD_SIZE before the Accelerator existed.
            raise RuntimeError(
                f"accelerate runs {self.accelerator.num_processes} processes but WORLD_SIZE is "
                f"{launched_processes()}; launch with `accelerate launch` or `torchrun`, which set WORLD_SIZE"
            )
        set_seed(config.seed)
        self.generator = generator
        generator.to(self.accelerator.device)
        denoiser = generator.denoiser
        denoiser.requires_grad_(False)
        if config.lora.enabled:
            add_lora(denoiser, config.lora)
        else:
            denoiser.requires_grad_(True)
        if config.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        # Sampling and re-evaluation must be the same function, so dropout-style train-mode behaviour is off.
        denoiser.eval()
        self.parameters = generator.trainable_parameters()
        if not self.parameters:
            raise ValueError("no trainable parameters: check lora.target_modules against the denoiser's module names")
        # Train in float32 even if the model was loaded in half precision; autocast handles mixed precision.
        for p in self.parameters:
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        self.optimizer = torch.optim.AdamW(
            self.parameters,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        self.lr_scheduler = get_scheduler(
            config.lr_schedule,
            self.optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=total_updates,
        )
        wrapped, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            denoiser, self.optimizer, self.lr_scheduler
        )
        generator.denoiser_forward = wrapped
        self.ema = EMA(self.parameters, config.ema_decay) if config.ema else None
        self.updates = 0
        self.run_config = run_config or {}
        self._writers: list[Any] = []
        self._last_grad_norm = float("nan")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

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
        """Concatenate a tensor across processes along dim 0 (identity with one process)."""
        return self.accelerator.gather(tensor.contiguous())

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
        return self.accelerator.accumulate(self.generator.denoiser_forward)

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass; the loss is divided by the accumulation steps so an update averages its parts."""
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()}; the last checkpoint is intact. Lower the learning rate or "
                "check the reward for extreme values"
            )
        self.accelerator.backward(loss)

    @property
    def sync_gradients(self) -> bool:
        return self.accelerator.sync_gradients

    def optimizer_step(self) -> bool:
        """Clip, step, schedule, update EMA — only when this was the update's last accumulation step."""
        if not self.accelerator.sync_gradients:
            return False
        norm = self.accelerator.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
        self._last_grad_norm = float(norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.updates += 1
        return True

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
        record = {"step": step, "updates": self.updates, "time": round(time.time(), 3)}
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

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        unwrapped = self.accelerator.unwrap_model(self.generator.denoiser_forward)
        return {
            name: param.detach().float().cpu().contiguous()
            for name, param in unwrapped.named_parameters()
            if param.requires_grad
        }

    def save_checkpoint(self, epoch: int, pipeline_state: dict[str, Any]) -> Path:
        """Write step_{epoch} atomically: everything goes to a temp folder that is renamed when complete.

        Contents: trainable weights (LoRA adapters or the full denoiser) in safetensors, the LoRA adapter in
        diffusers' format (loadable by `load_lora_weights`), optimiser and LR-scheduler states, EMA, every
        process's RNG states, and the pipeline's own state (e.g. per-prompt reward statistics) as JSON.
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
        state = self._trainable_state()
        if self.is_main:
            save_file(state, str(tmp / "trainable.safetensors"))
            if self.config.lora.enabled:
                self.generator.save_lora_weights(tmp / "lora")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            if self.ema is not None:
                save_file(self.ema.state_dict(), str(tmp / "ema.safetensors"))
            meta = {
                "epoch": epoch,
                "updates": self.updates,
                "num_processes": self.num_processes,
                "lora": self.config.lora.enabled,
                "pipeline_state": pipeline_state,
                "python_random": _jsonable_python_rng(random.getstate()),
                "numpy_random": _jsonable_numpy_rng(np.random.get_state()),
            }
            (tmp / "trainer_state.json").write_text(json.dumps(meta))
        acc.wait_for_everyone()
        if self.is_main:
            for item in tmp.rglob("*"):
                if item.is_file():
                    with open(item, "rb") as f:
                        os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
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
            (first epoch to run, the pipeline state saved with the checkpoint) — (0, {}) when not resuming.
        """
        if not self.config.resume:
            return 0, {}
        path = resolve_checkpoint(self.config.resume, self.run_dir)
        if path is None:
            logger.info("resume=latest but no checkpoint in %s yet; starting from scratch", self.checkpoint_dir)
            return 0, {}
        return self.load_checkpoint(path)

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
        state = load_file(str(path / "trainable.safetensors"))
        unwrapped = self.accelerator.unwrap_model(self.generator.denoiser_forward)
        params = {name: p for name, p in unwrapped.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint '{path}' does not match the model: {len(missing)} missing tensors "
                f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); "
                "resume with the same model and LoRA settings it was trained with"
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name].to(param.dtype))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        self.lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
        if self.ema is not None:
            ema_file = path / "ema.safetensors"
            if ema_file.exists():
                self.ema.load_state_dict(load_file(str(ema_file), device=str(self.device)))
        rng_file = path / f"rng_state_{self.process_index}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        random.setstate(_python_rng_from_json(meta["python_random"]))
        np.random.set_state(_numpy_rng_from_json(meta["numpy_random"]))
        self.updates = int(meta["updates"])
        if self.is_main:
            _truncate_metrics(self.run_dir / "metrics.jsonl", after_step=int(meta["epoch"]))
        logger.info("resumed from %s (epoch %d)", path, meta["epoch"])
        return int(meta["epoch"]) + 1, meta["pipeline_state"]

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Evaluate with EMA weights when EMA is on (no-op otherwise)."""
        if self.ema is None:
            yield
        else:
            with self.ema.swapped_in():
                yield


def launched_processes() -> int:
    """Process count set by the launcher (accelerate launch / torchrun), readable before accelerate starts.

    Pipelines need it to size gradient accumulation, which the Accelerator takes at construction.
    """
    return int(os.environ.get("WORLD_SIZE", "1"))


def _has_accelerator() -> bool:
    from accelerate.utils import is_npu_available, is_xpu_available

    return torch.cuda.is_available() or is_xpu_available() or is_npu_available() or torch.backends.mps.is_available()


def add_lora(denoiser: torch.nn.Module, config: LoRAConfig) -> None:
    """Attach peft LoRA adapters (B initialised to 0, so the model is unchanged until trained)."""
    from peft import LoraConfig

    denoiser.add_adapter(
        LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            init_lora_weights="gaussian",
            target_modules=list(config.target_modules),
        )
    )


def load_trained_weights(denoiser: torch.nn.Module, config: TrainerConfig, checkpoint: str | Path) -> None:
    """Put a checkpoint's trained weights into a freshly loaded denoiser (adding LoRA adapters first if used)."""
    checkpoint = Path(checkpoint)
    meta = json.loads((checkpoint / "trainer_state.json").read_text())
    if meta["lora"]:
        add_lora(denoiser, config.lora)
    state = load_file(str(checkpoint / "trainable.safetensors"))
    params = dict(denoiser.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise CheckpointError(f"checkpoint '{checkpoint}' has tensors the model lacks, e.g. {missing[:2]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints (step_N folders), oldest first; temp folders of interrupted saves are ignored."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


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
