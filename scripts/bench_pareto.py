"""Pareto utilities (rewards.pareto) vs pymoo on the same random score sets.

    python scripts/bench_pareto.py                # markdown table on stdout (~10-20 s on 2 cores)
    python scripts/bench_pareto.py --repeats 5 --json docs/bench_pareto.json

For n = 1,000 and 10,000 points, K = 2, 3, 4 objectives and two distributions
(uniform in [0, 1]^K, and the concave front {x >= 0, |x| = 1} where every point is
non-dominated), it measures:
- nd sort: `non_dominated_sort(F)` vs pymoo `NonDominatedSorting().do(-F)`; equal = same ranks.
- hv exact (K <= 3): `hypervolume(F, 0)` vs pymoo `HV(ref_point=0)(-F)`; equal = relative difference <= 1e-9.
- hv MC (K = 4): our Monte Carlo estimate (100,000 samples, seeded) vs pymoo's exact value;
  "equal" reports the relative error and whether it is within 3 standard errors.
- hv exact (K = 4, n = 1,000): our recursive exact hypervolume vs pymoo.
pymoo minimises, so it gets -F (and the reference point negated). Times are medians of
`--repeats` calls after a warm-up, ours and pymoo's measured alternately so that machine noise
hits both alike. pymoo >= 0.6.2 delegates sorting and hypervolume to the compiled moocore
library; ours is torch + a little Python. Cases whose pymoo time, extrapolated from n = 1,000,
would exceed 60 s are skipped and reported as such.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards.pareto import hypervolume, non_dominated_sort

PYMOO_LIMIT_S = 60.0
MC_SAMPLES = 100_000


def make_scores(n: int, k: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, k, generator=g, dtype=torch.float64)
    if kind == "concave":
        x = (x + 1e-3) / (x + 1e-3).norm(dim=1, keepdim=True)
    return x


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of `repeats` calls (after one warm-up call) and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def paired(ours, theirs, repeats: int) -> tuple[float, object, float, object]:
    """Alternate single calls of both so that load from other processes hits both alike."""
    ours()
    theirs()
    t_o, t_t = [], []
    r_o = r_t = None
    for _ in range(repeats):
        t, r_o = timed(ours, 1)
        t_o.append(t)
        t, r_t = timed(theirs, 1)
        t_t.append(t)
    return statistics.median(t_o), r_o, statistics.median(t_t), r_t


def pymoo_ranks(f_min: np.ndarray) -> np.ndarray:
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    ranks = np.full(len(f_min), -1)
    for r, front in enumerate(NonDominatedSorting().do(f_min)):
        ranks[front] = r
    return ranks


def pymoo_hv(f_min: np.ndarray, ref_min: np.ndarray) -> float:
    from pymoo.indicators.hv import HV

    return float(HV(ref_point=ref_min)(f_min))


def mc_standard_error(f: torch.Tensor, exact: float, samples: int) -> float:
    """Standard error of the Monte Carlo estimate (reference 0), from the exact covered fraction."""
    box = float(f[(f > 0).all(1)].max(0).values.prod())
    q = exact / box
    return box * math.sqrt(q * (1 - q) / samples)


def too_slow(small: dict, task: str, n: int, k: int, kind: str) -> str | None:
    """A skip note if pymoo's time, extrapolated quadratically from the smallest n, exceeds the limit."""
    seen = small.get((task, k, kind))
    if seen is None:
        return None
    n0, t0 = seen
    estimate = t0 * (n / n0) ** 2
    return f"skipped: pymoo estimated {estimate:.0f} s > {PYMOO_LIMIT_S:.0f} s" if estimate > PYMOO_LIMIT_S else None


def bench_case(f: torch.Tensor, kind: str, repeats: int, rows: list[dict], small: dict) -> None:
    """All tasks for one score set ``f`` ([n, K], maximised, reference point 0)."""
    n, k = f.shape
    f_min = -f.numpy()  # pymoo minimises
    ref = torch.zeros(k, dtype=torch.float64)
    ref_min = np.zeros(k)

    def add(task, ours_s, pymoo_s, equal):
        ratio = ours_s / pymoo_s if pymoo_s else float("nan")
        rows.append({"task": task, "dist": kind, "n": n, "K": k, "ours_s": ours_s, "pymoo_s": pymoo_s,
                     "ratio": ratio, "equal": equal})
        theirs = "-" if pymoo_s is None else f"{pymoo_s:.4f}s"
        print(f"  {task:<22} {kind:<8} n={n:<6} K={k}  ours {ours_s:.4f}s  pymoo {theirs}  {equal}",
              file=sys.stderr, flush=True)

    def compare(task, ours, theirs, verdict):
        skip = too_slow(small, task, n, k, kind)
        if skip:
            t_o, _ = timed(ours, repeats)
            add(task, t_o, None, skip)
            return
        t_o, r_o, t_p, r_p = paired(ours, theirs, repeats)
        small.setdefault((task, k, kind), (n, t_p))
        add(task, t_o, t_p, verdict(r_o, r_p))

    def same_ranks(r_o, r_p):
        fronts = int(r_o.max()) + 1
        return f"{'yes' if np.array_equal(r_o.numpy(), r_p) else 'NO'} ({fronts} front{'s' if fronts != 1 else ''})"

    def same_value(h_o, h_p):
        rel = abs(h_o - h_p) / abs(h_p)
        return f"{'yes' if rel <= 1e-9 else 'NO'} (rel diff {rel:.1e})"

    def within_3_se(h_o, h_p):
        rel = abs(h_o - h_p) / abs(h_p)
        z = abs(h_o - h_p) / mc_standard_error(f, h_p, MC_SAMPLES)
        return f"{'yes' if z <= 3 else 'NO'}: rel err {rel:.1e} = {z:.1f} SE"

    def ours_mc():
        return hypervolume(f, ref, method="monte_carlo", samples=MC_SAMPLES, generator=torch.Generator().manual_seed(0))

    compare("nd sort", lambda: non_dominated_sort(f), lambda: pymoo_ranks(f_min), same_ranks)
    if k <= 3:
        compare("hv exact", lambda: hypervolume(f, ref), lambda: pymoo_hv(f_min, ref_min), same_value)
    else:
        compare(f"hv MC {MC_SAMPLES // 1000}k vs exact", ours_mc, lambda: pymoo_hv(f_min, ref_min), within_3_se)
        if n <= 1000:  # our exact K = 4 recursion is O(n^2 log n): fine here, minutes at n = 10,000
            compare("hv exact", lambda: hypervolume(f, ref, method="exact"), lambda: pymoo_hv(f_min, ref_min),
                    same_value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per case (median reported)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    try:
        import moocore  # noqa: F401
        import pymoo  # noqa: F401
    except ImportError as exc:
        sys.exit(f"this benchmark compares against pymoo, which is not importable ({exc}); pip install pymoo")
    torch.set_num_threads(args.threads)

    rows: list[dict] = []
    # pymoo seconds at the smallest n, per (task, K, kind): used to extrapolate before larger runs.
    small: dict[tuple, tuple[int, float]] = {}
    start_all = time.perf_counter()
    for n in sorted(args.sizes):
        for k in (2, 3, 4):
            for kind in ("uniform", "concave"):
                bench_case(make_scores(n, k, kind, seed=10 * n + k), kind, args.repeats, rows, small)

    total = time.perf_counter() - start_all
    print(f"torch {torch.__version__}, {args.threads} threads; pymoo "
          f"{__import__('pymoo').__version__} (moocore {__import__('moocore').__version__}); "
          f"median of {args.repeats}; total {total:.0f} s\n")
    print("| task | dist | n | K | ours s | pymoo s | ratio (ours/pymoo) | equal? |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        pymoo_s = "-" if r["pymoo_s"] is None else f"{r['pymoo_s']:.4f}"
        ratio = "-" if r["pymoo_s"] is None else f"{r['ratio']:.1f}"
        print(f"| {r['task']} | {r['dist']} | {r['n']} | {r['K']} | {r['ours_s']:.4f} | {pymoo_s} | {ratio} | {r['equal']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
