"""Cost against the sizes a run scales with, every point measured in this run, each curve plotted (--plots DIR):

- steps: sampling 16 shapes-world images with per-step log-probs, T = 5 … 40 denoising steps;
- batch: sampling (10 steps) and one DDPO update (one step's log-prob, PPO-clip loss, backward; every UNet weight
  trained) on the shapes-world model for batch sizes 1 … 64;
- truncation: DRaFT-K time (in this process) and peak memory (the memory benchmark's fresh processes,
  `benchmarks.memory`), K = 1 … 10, with and without checkpointing;
- length: sequence length L = 64 … 512 for masked-diffusion sampling (the DNA world's CNN, 16 sequences, 32 steps),
  one DRAKES micro-batch (4 sequences, 32 steps, K = 8 relaxed, exact KL in chunks of 8; GC-content reward, which
  reads any length) and GFlowNet rollouts of the sequence transformer (32 trajectories, key–value cache on and off).

Each row is one point: its time as a ratio to the curve's smallest point, beside `size_ratio`, the ratio of the sizes;
equal ratios mean cost linear in the size (through the origin). `linear_fit_error` is the largest relative deviation
of the curve from its least-squares line a + b·size (small: linear with a fixed overhead a).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from benchmarks.timing import timed
from benchmarks.worlds import ASSETS, SHAPES_MODEL, prompt_lines

DNA_MODEL = ASSETS / "dna" / "model"


@dataclass
class Curve:
    """Times of one quantity at several sizes."""

    name: str  # e.g. "sampling 16 images, shapes world"
    unit: str  # the size's name, e.g. "T (denoising steps)"
    sizes: list[int]
    seconds: list[float]
    memory_mib: list[float] | None = None

    def linear_fit_error(self) -> float:
        """Largest |t − (a + b·size)| / t over the points, for the least-squares line."""
        slope, intercept = np.polyfit(self.sizes, self.seconds, 1)
        fitted = intercept + slope * np.asarray(self.sizes, dtype=float)
        return float(np.max(np.abs(np.asarray(self.seconds) - fitted) / np.asarray(self.seconds)))

    def rows(self) -> list[dict]:
        base_size, base_s = self.sizes[0], self.seconds[0]
        error = self.linear_fit_error()
        rows = []
        for i, (size, seconds) in enumerate(zip(self.sizes, self.seconds)):
            row = {"benchmark": f"scaling: {self.name}, {self.unit} = {size}",
                   "baseline": f"{self.unit} = {base_size}", "baseline_s": base_s, "ours_s": seconds,
                   "ratio": seconds / base_s, "size_ratio": size / base_size, "linear_fit_error": error}
            if self.memory_mib is not None:
                row["peak_mib"] = self.memory_mib[i]
            rows.append(row)
        return rows


def measure_curve(name: str, unit: str, sizes: list[int], make: Callable[[int], Callable[[], object]],
                  repeats: int) -> Curve:
    """`make(size)` builds the call to time at that size (setup untimed); each call's median over `repeats`."""
    return Curve(name, unit, list(sizes), [timed(make(size), repeats) for size in sizes])


# ------------------------------------------------------------------------------------------------- the curves


def steps_curves(args) -> list[Curve]:
    from genalign.generators.diffusion import DiffusionGenerator, SamplingOptions

    gen = DiffusionGenerator.from_pretrained(SHAPES_MODEL).to(args.device)
    prompts = prompt_lines("shapes_eval", 16)

    def sampling(steps: int) -> Callable[[], object]:
        options = SamplingOptions(num_inference_steps=steps, guidance_scale=3.0, eta=1.0)
        return lambda: gen.sample(prompts, options, seeds=list(range(len(prompts))))

    return [measure_curve("sampling 16 images with per-step log-probs, shapes world, CFG 3", "T", [5, 10, 20, 40],
                          sampling, args.repeats)]


def batch_curves(args) -> list[Curve]:
    from genalign.generators.diffusion import DiffusionGenerator, SamplingOptions
    from pipelines.ddpo import ddpo_loss

    gen = DiffusionGenerator.from_pretrained(SHAPES_MODEL).to(args.device)
    prompts = prompt_lines("shapes_eval", 64)
    options = SamplingOptions(num_inference_steps=10, guidance_scale=3.0, eta=1.0)
    sizes = [1, 4, 16, 64]

    def sampling(batch: int) -> Callable[[], object]:
        return lambda: gen.sample(prompts[:batch], options, seeds=list(range(batch)))

    trajectory = gen.sample(prompts, options, seeds=list(range(len(prompts)))).trajectory
    gen.denoiser.requires_grad_(True)

    def ddpo_update(batch: int) -> Callable[[], object]:
        part = trajectory[torch.arange(batch)]
        step = torch.full((batch,), 5)
        advantages = torch.randn(batch, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

        def update() -> None:
            loss, _ = ddpo_loss(gen.step_log_prob(part, step), part.log_probs[:, 5], advantages, 1e-4)
            loss.backward()
            gen.denoiser.zero_grad(set_to_none=True)

        return update

    return [measure_curve("sampling, shapes world, 10 steps, CFG 3", "batch", sizes, sampling, args.repeats),
            measure_curve("DDPO update (one step, CFG, full UNet), shapes world", "batch", sizes, ddpo_update,
                          args.repeats)]


def truncation_curves(args) -> list[Curve]:
    from benchmarks.memory import TRUNCATIONS, draft_memory_settings, draft_step

    memory = draft_memory_settings(args)
    curves = []
    for checkpoint in (True, False):
        curve = measure_curve(f"DRaFT-K forward+backward, tiny SD {args.image_size}px, batch {args.batch}, "
                              f"checkpointing {'on' if checkpoint else 'off'}", "K", list(TRUNCATIONS),
                              lambda k, checkpoint=checkpoint: draft_step(k, checkpoint, args.image_size, args.batch,
                                                                          max(args.steps, 10), args.device),
                              args.repeats)
        curve.memory_mib = [memory[(checkpoint, k)] / 2**20 for k in TRUNCATIONS]
        curves.append(curve)
    return curves


def length_curves(args) -> list[Curve]:
    from genalign.generators.masked import MaskedDiffusionGenerator, MaskedSamplingOptions
    from pipelines.gfn.environments import SequenceTask
    from pipelines.gfn.policies import SequencePolicy, sample_trajectories
    from rewards import build_reward

    generator = MaskedDiffusionGenerator.from_pretrained(DNA_MODEL, device=args.device)
    generator.keep_reference_copy()
    reward = build_reward("gc_content")

    def sampling(length: int) -> Callable[[], object]:
        options = MaskedSamplingOptions(num_inference_steps=32, length=length)
        return lambda: generator.sample([""] * 16, options, seeds=list(range(16)))

    def drakes_micro_batch(length: int) -> Callable[[], object]:
        options = MaskedSamplingOptions(num_inference_steps=32, length=length)

        def step() -> None:  # pipelines/drakes.py's micro-batch: relaxed sampling, reward + relaxed KL, chunked hard KL
            rollout = generator.sample_differentiable([""] * 4, options, grad_steps=8, seeds=range(4),
                                                      kl_to_reference=True)
            (-reward(rollout.outputs).rewards.mean() + 1e-2 * rollout.extras["kl_relaxed"].mean()).backward()
            states = rollout.extras["hard_states"]
            for start in range(0, states.shape[1], 8):
                kl = sum(generator.step_kl(states[:, k], torch.full((4,), k), options)
                         for k in range(start, min(start + 8, states.shape[1])))
                (1e-2 * kl.mean()).backward()
            generator.backbone.zero_grad(set_to_none=True)

        return step

    def rollouts(cached: bool) -> Callable[[int], Callable[[], object]]:
        def make(length: int) -> Callable[[], object]:
            torch.manual_seed(0)
            env = SequenceTask(alphabet="ACGT", max_length=length, min_length=length,
                               score=lambda x: torch.ones(len(x)), objective_names=("one",), fixed_length=True)
            policy = SequencePolicy(env, hidden=64, layers=2, heads=4).to(args.device)
            uniforms = torch.rand(32, env.max_steps, dtype=torch.float64, device=args.device)
            return lambda: sample_trajectories(env, policy, uniforms, cached=cached)

        return make

    lengths = [64, 128, 256, 512]
    return [
        measure_curve("masked-diffusion sampling, DNA world CNN, 16 sequences, 32 steps", "L", lengths, sampling,
                      args.repeats),
        measure_curve("DRAKES micro-batch (forward+backward), DNA world CNN, 4 sequences, 32 steps, K = 8", "L",
                      lengths, drakes_micro_batch, args.repeats),
        measure_curve("GFlowNet rollouts, sequence transformer, 32 trajectories, key–value cache", "L",
                      [32, 64, 128, 256], rollouts(True), args.repeats),
        # Cubic in L (L steps, each a forward over the whole prefix): 13 s a call at L = 256, left out.
        measure_curve("GFlowNet rollouts, sequence transformer, 32 trajectories, prefix re-read every step", "L",
                      [32, 64, 128], rollouts(False), max(1, args.repeats // 2)),
    ]


CURVES: dict[str, Callable] = {"steps": steps_curves, "batch": batch_curves, "truncation": truncation_curves,
                               "length": length_curves}


# ------------------------------------------------------------------------------------------------- plots


def plot(curves: list[Curve], path: Path, title: str) -> None:
    """Time against size (log-log, with a dotted line of slope 1 through each curve's first point), and peak memory
    in a second panel when the curves have it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    with_memory = any(curve.memory_mib is not None for curve in curves)
    height = 4.0 + 0.2 * len(curves)
    figure, axes = plt.subplots(1, 2 if with_memory else 1, figsize=(11 if with_memory else 6.5, height), squeeze=False)
    time_axis = axes[0, 0]
    for curve in curves:
        line, = time_axis.plot(curve.sizes, curve.seconds, marker="o", label=curve.name)
        linear = [curve.seconds[0] * size / curve.sizes[0] for size in curve.sizes]
        time_axis.plot(curve.sizes, linear, linestyle=":", color=line.get_color(), alpha=0.6)
        if curve.memory_mib is not None:
            axes[0, 1].plot(curve.sizes, curve.memory_mib, marker="o", color=line.get_color(), label=curve.name)
    time_axis.set(xscale="log", yscale="log", xlabel=curves[0].unit, ylabel="seconds (median)",
                  title="time (dotted: linear from the first point)")
    if with_memory:
        axes[0, 1].set(xscale="log", xlabel=curves[0].unit, ylabel="peak MiB above the start", title="peak memory")
    sizes = sorted({size for curve in curves for size in curve.sizes})
    for axis in axes[0]:
        axis.set_xticks(sizes, [str(size) for size in sizes])
        axis.xaxis.set_minor_locator(NullLocator())
    handles, labels = time_axis.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", fontsize=7, ncol=1)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.02 + 0.035 * len(curves), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def bench_scaling(args, parts: list[str] | None = None) -> list[dict]:
    """Rows of the named curve families (all by default); with --plots, one PNG per family,
    <plots>/benchmarks_scaling_<family>.png."""
    rows = []
    for family in parts or list(CURVES):
        curves = CURVES[family](args)
        if args.plots:
            plot(curves, Path(args.plots) / f"benchmarks_scaling_{family}.png", f"scaling: {family}")
        for curve in curves:
            rows.extend(curve.rows())
    return rows
