"""Pareto utilities (rewards.pareto) vs pymoo, and the torch training-batch mask vs brute force.

    python scripts/bench_pareto.py                # markdown table on stdout (~10 s on 2 cores)
    python scripts/bench_pareto.py --repeats 5 --json runs/bench_pareto.json

rewards.pareto delegates sorting, hypervolume and IGD to moocore, as pymoo >= 0.6.2 does for
sorting and hypervolume, so those rows measure the cost of our wrappers (input checks, tensor <->
numpy conversion) and should show ratios near 1 with equal results. For n = 1,000 and 10,000
points, K = 2, 3, 4 objectives and two distributions (uniform in [0, 1]^K, and the concave front
{x >= 0, |x| = 1} where every point is non-dominated):
- nd sort: `non_dominated_sort(F)` vs pymoo `NonDominatedSorting().do(-F)`; equal = same ranks.
- hv exact: `hypervolume(F, 0)` vs pymoo `HV(ref_point=0)(-F)`; equal = relative difference <= 1e-12.
- igd / igd+: `igd(F, R)`, `igd_plus(F, R)` vs pymoo `IGD(-R)(-F)`, `IGDPlus(-R)(-F)` with R = 500
  points of the concave front scaled by 1.05 sqrt(K), which no score dominates (so IGD+ > 0);
  equal = relative difference <= 1e-12.
For training-batch sizes (n = 256 and 1,024, same K and distributions):
- nd mask: the torch `non_dominated_mask(F)` vs a brute-force O(n^2) reference (the full
  [n, n, K] comparison, straight from the definition); equal = same flags.
pymoo minimises, so it gets -F. Times are medians of `--repeats` calls after a warm-up, ours and
the baseline's measured alternately so that machine noise hits both alike. Every result is
checked for equality in the same run; the script exits with status 1 if any differs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards.pareto import hypervolume, igd, igd_plus, non_dominated_mask, non_dominated_sort

REFERENCE_FRONT_SIZE = 500
EXACT_REL = 1e-12


def make_scores(n: int, k: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, k, generator=g, dtype=torch.float64)
    if kind == "concave":
        x = (x + 1e-3) / (x + 1e-3).norm(dim=1, keepdim=True)
    return x


def paired(ours: Callable, baseline: Callable, repeats: int) -> tuple[float, object, float, object]:
    """Median times and last results of both, called alternately after one warm-up call each."""
    ours()
    baseline()
    t_o, t_b = [], []
    r_o = r_b = None
    for _ in range(repeats):
        start = time.perf_counter()
        r_o = ours()
        t_o.append(time.perf_counter() - start)
        start = time.perf_counter()
        r_b = baseline()
        t_b.append(time.perf_counter() - start)
    return statistics.median(t_o), r_o, statistics.median(t_b), r_b


def pymoo_ranks(f_min: np.ndarray) -> np.ndarray:
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    ranks = np.full(len(f_min), -1)
    for r, front in enumerate(NonDominatedSorting().do(f_min)):
        ranks[front] = r
    return ranks


def brute_force_mask(f: torch.Tensor) -> torch.Tensor:
    """Non-dominated flags from the definition: no j with f_j >= f_i everywhere and > somewhere."""
    at_least = (f[:, None, :] >= f[None, :, :]).all(-1)  # [j, i]
    better = (f[:, None, :] > f[None, :, :]).any(-1)
    return ~(at_least & better).any(0)


def same_ranks(r_o: torch.Tensor, r_p: np.ndarray) -> tuple[bool, str]:
    fronts = int(r_o.max()) + 1
    return bool(np.array_equal(r_o.numpy(), r_p)), f"{fronts} front{'s' if fronts != 1 else ''}"


def same_value(h_o: float, h_p: float) -> tuple[bool, str]:
    rel = abs(h_o - h_p) / abs(h_p) if h_p else abs(h_o)
    return rel <= EXACT_REL, f"rel diff {rel:.1e}"


def same_mask(m_o: torch.Tensor, m_b: torch.Tensor) -> tuple[bool, str]:
    return bool(torch.equal(m_o, m_b)), f"{int(m_o.sum())} non-dominated"


class Table:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def compare(self, task: str, kind: str, f: torch.Tensor, ours: Callable, baseline: Callable,
                verdict: Callable, repeats: int) -> None:
        n, k = f.shape
        t_o, r_o, t_b, r_b = paired(ours, baseline, repeats)
        equal, detail = verdict(r_o, r_b)
        row = {"task": task, "dist": kind, "n": n, "K": k, "ours_s": t_o, "baseline_s": t_b,
               "ratio": t_o / t_b, "equal": equal, "detail": detail}
        self.rows.append(row)
        print(f"  {task:<28} {kind:<8} n={n:<6} K={k}  ours {t_o:.5f}s  baseline {t_b:.5f}s  "
              f"{'yes' if equal else 'NO'} ({detail})", file=sys.stderr, flush=True)


def bench_pymoo(table: Table, n: int, k: int, kind: str, repeats: int) -> None:
    from pymoo.indicators.hv import HV
    from pymoo.indicators.igd import IGD
    from pymoo.indicators.igd_plus import IGDPlus

    f = make_scores(n, k, kind, seed=10 * n + k)
    # Every point of this front has a coordinate >= 1.05 > 1, so no score in [0, 1]^K dominates it.
    front = 1.05 * k**0.5 * make_scores(REFERENCE_FRONT_SIZE, k, "concave", seed=7 * k)
    f_min, front_min = -f.numpy(), -front.numpy()  # pymoo minimises
    ref = torch.zeros(k, dtype=torch.float64)
    table.compare("nd sort vs pymoo", kind, f, lambda: non_dominated_sort(f), lambda: pymoo_ranks(f_min),
                  same_ranks, repeats)
    table.compare("hv exact vs pymoo", kind, f, lambda: hypervolume(f, ref),
                  lambda: float(HV(ref_point=np.zeros(k))(f_min)), same_value, repeats)
    table.compare("igd vs pymoo", kind, f, lambda: igd(f, front), lambda: float(IGD(front_min)(f_min)),
                  same_value, repeats)
    table.compare("igd+ vs pymoo", kind, f, lambda: igd_plus(f, front),
                  lambda: float(IGDPlus(front_min)(f_min)), same_value, repeats)


def bench_mask(table: Table, n: int, k: int, kind: str, repeats: int) -> None:
    f = make_scores(n, k, kind, seed=10 * n + k + 1)
    table.compare("nd mask (torch) vs brute force", kind, f, lambda: non_dominated_mask(f),
                  lambda: brute_force_mask(f), same_mask, repeats)
    if not torch.equal(non_dominated_mask(f), non_dominated_sort(f) == 0):
        table.rows[-1]["equal"] = False
        table.rows[-1]["detail"] += "; differs from non_dominated_sort == 0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per case (median reported)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="n for the pymoo rows")
    parser.add_argument("--mask-sizes", type=int, nargs="+", default=[256, 1024], help="n for the mask rows")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    try:
        import moocore
        import pymoo
    except ImportError as exc:
        sys.exit(f"this benchmark compares against pymoo, which is not importable ({exc}); pip install pymoo")
    torch.set_num_threads(args.threads)

    table = Table()
    start_all = time.perf_counter()
    for n in sorted(args.sizes):
        for k in (2, 3, 4):
            for kind in ("uniform", "concave"):
                bench_pymoo(table, n, k, kind, args.repeats)
    for n in sorted(args.mask_sizes):
        for k in (2, 3, 4):
            for kind in ("uniform", "concave"):
                bench_mask(table, n, k, kind, args.repeats)
    total = time.perf_counter() - start_all

    print(f"torch {torch.__version__}, {args.threads} thread{'s' if args.threads != 1 else ''}; pymoo {pymoo.__version__}, moocore "
          f"{moocore.__version__}; median of {args.repeats}; total {total:.0f} s\n")
    print("| task | dist | n | K | ours s | baseline s | ratio (ours/baseline) | equal? |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in table.rows:
        print(f"| {r['task']} | {r['dist']} | {r['n']} | {r['K']} | {r['ours_s']:.5f} | {r['baseline_s']:.5f} | "
              f"{r['ratio']:.2f} | {'yes' if r['equal'] else 'NO'} ({r['detail']}) |")
    if args.json:
        args.json.write_text(json.dumps(table.rows, indent=2))
    different = [r for r in table.rows if not r["equal"]]
    if different:
        sys.exit(f"{len(different)} case(s) differ from their baseline: "
                 + "; ".join(f"{r['task']} {r['dist']} n={r['n']} K={r['K']}" for r in different))


if __name__ == "__main__":
    main()
