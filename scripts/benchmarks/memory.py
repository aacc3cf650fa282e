"""DRaFT-K peak memory (and time) with and without activation checkpointing of the tracked denoiser calls, each
setting in a fresh process (see `benchmarks.timing` for how memory is read on CUDA and on the CPU)."""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.timing import PeakMemory, run_child, synchronize
from benchmarks.worlds import PROMPTS, tiny_sd_pipe

TRUNCATIONS = (1, 2, 5, 10)


def draft_step(k: int, checkpoint: bool, image_size: int, batch: int, steps: int, device: str,
               repeats: int = 1) -> dict:
    """In a fresh process: one warm-up DRaFT-K forward+backward (colourfulness reward, η = 0, CFG 5) on the tiny SD
    model, then `repeats` timed ones. Returns {"peak_bytes": peak memory of the first timed step above the memory
    before it, "seconds": median time of the timed steps, "memory_method": how memory was read}."""
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

    step()
    seconds, peak = [], None
    for _ in range(repeats):
        with PeakMemory() as memory:
            synchronize()
            tic = time.perf_counter()
            step()
            synchronize()
        seconds.append(time.perf_counter() - tic)
        peak = memory if peak is None else peak
    return {"peak_bytes": peak.bytes, "seconds": statistics.median(seconds), "memory_method": peak.method}


def draft_settings(args, repeats: int = 1) -> dict[tuple[bool, int], dict]:
    """{(checkpointing, K): draft_step's result} for K in TRUNCATIONS, with and without checkpointing."""
    return {(checkpoint, k): run_child("benchmarks.memory:draft_step", k=k, checkpoint=checkpoint,
                                       image_size=args.image_size, batch=args.batch, steps=max(args.steps, 10),
                                       device=args.device, repeats=repeats)
            for checkpoint in (True, False) for k in TRUNCATIONS}


def bench_memory(args) -> list[dict]:
    """DRaFT-K peak memory for K = 1, 2, 5, 10 with and without checkpointing, each as a ratio to K = 1."""
    results = draft_settings(args)
    rows = []
    for checkpoint in (True, False):
        base = results[(checkpoint, 1)]["peak_bytes"]
        for k in TRUNCATIONS:
            peak = results[(checkpoint, k)]["peak_bytes"]
            rows.append({"benchmark": f"DRaFT-{k} peak memory, checkpointing {'on' if checkpoint else 'off'}",
                         "baseline": "DRaFT-1, same checkpointing", "baseline_s": None, "ours_s": None,
                         "peak_mib": peak / 2**20, "ratio": peak / base})
    return rows
