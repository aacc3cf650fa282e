"""DRaFT-K peak memory with and without activation checkpointing of the tracked denoiser calls, each setting in a
fresh process (see `benchmarks.timing` for how memory is read on CUDA and on the CPU)."""

from __future__ import annotations

import functools
from typing import Callable

import torch

from benchmarks.timing import PeakMemory, run_child
from benchmarks.worlds import PROMPTS, tiny_sd_pipe

TRUNCATIONS = (1, 2, 5, 10)


def draft_step(k: int, checkpoint: bool, image_size: int, batch: int, steps: int,
               device: str) -> Callable[[], None]:
    """One DRaFT-K forward+backward (colourfulness reward, η = 0, CFG 5) on a freshly built tiny SD model."""
    from genalign.generators.diffusion import DiffusionGenerator, SamplingOptions
    from rewards import build_reward

    torch.manual_seed(0)
    gen = DiffusionGenerator.from_pipeline(tiny_sd_pipe(image_size).to(device))
    gen.denoiser.requires_grad_(True)
    reward = build_reward("colorfulness")
    options = SamplingOptions(num_inference_steps=steps, guidance_scale=5.0, eta=0.0)
    prompts = (PROMPTS * batch)[:batch]

    def step() -> None:
        out = gen.sample_differentiable(prompts, options, grad_steps=k, seeds=list(range(batch)),
                                        checkpoint=checkpoint)
        (-reward(out.outputs, prompts).rewards.mean()).backward()
        gen.denoiser.zero_grad(set_to_none=True)

    return step


def draft_peak_memory(k: int, checkpoint: bool, image_size: int, batch: int, steps: int, device: str) -> dict:
    """In a fresh process (`run_child`): a warm-up DRaFT-K step, then the peak memory of a second one above the
    memory before it. Returns {"peak_bytes", "memory_method"}. (No time: the fixed mmap threshold that makes resident
    memory follow live memory also makes every large allocation a system call, which slows the step several-fold.)"""
    step = draft_step(k, checkpoint, image_size, batch, steps, device)
    step()
    with PeakMemory() as peak:
        step()
    return {"peak_bytes": peak.bytes, "memory_method": peak.method}


@functools.cache
def draft_memory(k: int, checkpoint: bool, image_size: int, batch: int, steps: int, device: str) -> dict:
    """`draft_peak_memory` in a fresh process, once per setting and run (the memory and scaling benchmarks share
    it)."""
    return run_child("benchmarks.memory:draft_peak_memory", k=k, checkpoint=checkpoint, image_size=image_size,
                     batch=batch, steps=steps, device=device)


def draft_memory_settings(args) -> dict[tuple[bool, int], int]:
    """{(checkpointing, K): peak bytes} for K in TRUNCATIONS, with and without checkpointing."""
    return {(checkpoint, k): draft_memory(k, checkpoint, args.image_size, args.batch, max(args.steps, 10),
                                          args.device)["peak_bytes"]
            for checkpoint in (True, False) for k in TRUNCATIONS}


def bench_memory(args) -> list[dict]:
    """DRaFT-K peak memory for K = 1, 2, 5, 10 with and without checkpointing, each as a ratio to K = 1."""
    results = draft_memory_settings(args)
    rows = []
    for checkpoint in (True, False):
        base = results[(checkpoint, 1)]
        for k in TRUNCATIONS:
            peak = results[(checkpoint, k)]
            rows.append({"benchmark": f"DRaFT-{k} peak memory, checkpointing {'on' if checkpoint else 'off'}",
                         "baseline": "DRaFT-1, same checkpointing", "baseline_s": None, "ours_s": None,
                         "peak_mib": peak / 2**20, "ratio": peak / base})
    return rows
