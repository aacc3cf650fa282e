"""Every pipeline's training unit against the same algorithm written as a plain loop (see `harness`).

One module per pipeline holds its `CASE`: the shipped config with the benchmark's sizes, and the reference loop. The
shared pieces: `harness` (running and checking both sides), `plain_diffusion` (a text-to-image model used directly
through diffusers), `plain_masked` (a masked-diffusion model's steps written out), `plain_training` (prompts, seeds,
the optimiser step).
"""

from __future__ import annotations

import sys

import torch

from benchmarks.pipelines import ctrl_u, ddpo, draft, dragon, drakes, gflownet, parrot, prdp, rtb
from benchmarks.pipelines.harness import Case, measure
from benchmarks.timing import run_child

CASES: dict[str, Case] = {case.name: case for case in (ddpo.CASE, draft.DRAFT, draft.ALIGNPROP, prdp.CASE, dragon.CASE,
                                                       drakes.CASE, ctrl_u.CASE, parrot.CASE, gflownet.CASE,
                                                       rtb.CASE)}


def case_row(case: Case, repeats: int) -> dict:
    """The benchmark row of one case: median unit times (alternated), the equality check, the engine's throughput
    and each side's peak memory, measured in a fresh process each."""
    result = measure(case, repeats)
    row = {
        "benchmark": case.title,
        "baseline": f"plain loop ({case.leaves_out})",
        "baseline_s": result.reference_s,
        "ours_s": result.engine_s,
        "ratio": result.engine_s / result.reference_s,
        "samples_per_s": result.samples / result.engine_s,
        "updates_per_s": result.updates / result.engine_s,
        "check": "equal" if result.agrees else "DIFFERENT",
        "check_detail": result.check,
        "engine_times": result.engine_times,
        "reference_times": result.reference_times,
    }
    engine = run_child("benchmarks.pipelines.harness:peak_memory_child", case_name=case.name, side="engine")
    reference = run_child("benchmarks.pipelines.harness:peak_memory_child", case_name=case.name, side="reference")
    row.update(peak_mib=engine["peak_bytes"] / 2**20, baseline_peak_mib=reference["peak_bytes"] / 2**20,
               memory_method=engine["memory_method"])
    return row


def bench_pipelines(args, names: list[str] | None = None) -> list[dict]:
    """Rows for the named cases (all by default). The plain loops create their tensors on the CPU, where this project's
    machines run; with CUDA the pipelines would run there instead, so the comparison is refused rather than skewed."""
    if torch.cuda.is_available():
        print("pipelines: skipped — the plain reference loops run on the CPU only, and the pipelines would use CUDA",
              file=sys.stderr)
        return []
    return [case_row(CASES[name], args.pipeline_repeats) for name in (names or list(CASES))]
