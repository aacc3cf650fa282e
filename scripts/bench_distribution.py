"""Benchmarks for the distributional metrics in rewards.distribution, each against a baseline in the same run.

    python scripts/bench_distribution.py                  # markdown table on stdout (~2 minutes on 2 cores)
    python scripts/bench_distribution.py --repeats 5 --out docs/bench_distribution.json

Benchmarks:
- vendi: Vendi score (q = 1, cosine kernel) of n = 5,000 embeddings of d = 64, the D x D dual form (XᵀX / n)
  vs the N x N primal form (eigenvalues of K / n); the values must agree (same non-zero eigenvalues).
- fd: Fréchet distance between two sets of 2,048-dim features (n = 5,000 each), from their precomputed means and
  covariances (shared by both methods and timed separately): ours (sum of square roots of the eigenvalues of the
  symmetric PSD product S C1 S, S = C2^(1/2), all by eigh) vs the usual pytorch-fid / torchmetrics formula with
  scipy.linalg.sqrtm(C1 @ C2) (a Schur decomposition of a non-symmetric matrix).

Times are medians of --repeats runs (wall clock, float64, CPU, torch limited to --threads threads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards.distribution import frechet_distance, gaussian_stats, vendi_score


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def scipy_frechet_distance(mu1: np.ndarray, c1: np.ndarray, mu2: np.ndarray, c2: np.ndarray) -> float:
    """pytorch-fid's formula: ‖μ1 − μ2‖² + tr(C1) + tr(C2) − 2 tr(sqrtm(C1 C2))."""
    covmean = scipy.linalg.sqrtm(c1 @ c2)
    covmean = np.real(covmean)  # sqrtm may return tiny imaginary parts from roundoff
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(c1) + np.trace(c2) - 2.0 * np.trace(covmean))


def bench_vendi(n: int, d: int, repeats: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    # Correlated features so the spectrum is not flat.
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    t_dual, v_dual = timed(lambda: vendi_score(x, method="dual"), repeats)
    t_primal, v_primal = timed(lambda: vendi_score(x, method="primal"), repeats)
    return {
        "benchmark": f"Vendi (q=1), n={n:,}, d={d}: dual vs primal",
        "ours_s": t_dual,
        "baseline_s": t_primal,
        "speedup": t_primal / t_dual,
        "value": float(v_dual),
        "rel_diff": abs(float(v_dual) - float(v_primal)) / abs(float(v_primal)),
    }


def bench_fd(n: int, d: int, repeats: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = 1.1 * torch.randn(n, d, generator=g, dtype=torch.float64) + 0.05
    t_stats, (s1, s2) = timed(lambda: (gaussian_stats(a), gaussian_stats(b)), 1)
    t_ours, ours = timed(lambda: frechet_distance(s1.mean, s1.cov, s2.mean, s2.cov), repeats)
    np_args = (s1.mean.numpy(), s1.cov.numpy(), s2.mean.numpy(), s2.cov.numpy())
    t_scipy, ref = timed(lambda: scipy_frechet_distance(*np_args), repeats)
    return {
        "benchmark": f"Fréchet distance, d={d}, n={n:,} per set: ours vs scipy sqrtm",
        "ours_s": t_ours,
        "baseline_s": t_scipy,
        "speedup": t_scipy / t_ours,
        "value": float(ours),
        "rel_diff": abs(float(ours) - ref) / abs(ref),
        "stats_s": t_stats,
    }


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def markdown(rows: list[dict[str, Any]], tolerance: float) -> str:
    lines = [
        "| benchmark | ours | baseline | speed-up | value | rel. difference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ok = "" if r["rel_diff"] <= tolerance else f" (> {tolerance:g}!)"
        lines.append(
            f"| {r['benchmark']} | {fmt_time(r['ours_s'])} | {fmt_time(r['baseline_s'])} | {r['speedup']:.1f}x | "
            f"{r['value']:.6g} | {r['rel_diff']:.1e}{ok} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vendi-n", type=int, default=5000)
    parser.add_argument("--vendi-d", type=int, default=64)
    parser.add_argument("--fd-n", type=int, default=5000)
    parser.add_argument("--fd-d", type=int, default=2048)
    parser.add_argument("--tolerance", type=float, default=1e-6, help="flag relative differences above this")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = [bench_vendi(args.vendi_n, args.vendi_d, args.repeats), bench_fd(args.fd_n, args.fd_d, args.repeats)]
    print(markdown(rows, args.tolerance))
    print(
        f"\nMedian of {args.repeats} runs, float64, CPU, {args.threads} torch threads. Vendi baseline = primal "
        f"(N x N) form; FD baseline = scipy.linalg.sqrtm(C1 @ C2). FD times exclude the means/covariances "
        f"({rows[1]['stats_s']:.2f} s for both sets, shared by both methods)."
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
