"""Behavioural tests for rewards.pareto: brute-force references, pymoo cross-checks, hand examples."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch

from rewards import pareto
from rewards.pareto import (
    crowding_distance,
    hypervolume,
    igd,
    igd_plus,
    log_convex,
    non_dominated_mask,
    non_dominated_sort,
    pareto_rewards,
    r2_indicator,
    tchebycheff,
    tchebycheff_distance,
    weighted_sum,
)

try:
    from pymoo.indicators.hv import HV
    from pymoo.indicators.igd import IGD
    from pymoo.indicators.igd_plus import IGDPlus
    from pymoo.operators.survival.rank_and_crowding.metrics import (
        calc_crowding_distance,
    )
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    HAVE_PYMOO = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_PYMOO = False

needs_pymoo = pytest.mark.skipif(not HAVE_PYMOO, reason="pymoo is not importable; the cross-checks against it are skipped")


# ------------------------------------------------------------------ random test sets


def make_set(n: int, k: int, seed: int, kind: str) -> torch.Tensor:
    """Random [n, k] float64 scores.

    kinds: "uniform" (continuous), "ties" (small integer grid: many ties and duplicate points),
    "front" (on a concave front, plus a few dominated points and an exact duplicate).
    """
    g = torch.Generator().manual_seed(1000 * seed + 10 * n + k)
    if kind == "uniform":
        return torch.rand(n, k, generator=g, dtype=torch.float64)
    if kind == "ties":
        return torch.randint(0, 4, (n, k), generator=g).to(torch.float64)
    if kind == "front":
        x = torch.rand(n, k, generator=g, dtype=torch.float64) + 0.05
        x = x / x.norm(dim=1, keepdim=True)
        x[: n // 4] *= 0.8  # some dominated points
        x[-1] = x[0]  # an exact duplicate
        return x
    raise AssertionError(kind)


KINDS = ("uniform", "ties", "front")
SEEDS = (0, 1, 2)


# ------------------------------------------------------------------ brute-force references


def dominance_matrix(v: torch.Tensor) -> np.ndarray:
    """D[i, j] = point i dominates point j, straight from the definition."""
    a = v.numpy()
    return (a[:, None, :] >= a[None, :, :]).all(-1) & (a[:, None, :] > a[None, :, :]).any(-1)


def brute_mask(v: torch.Tensor) -> list[bool]:
    return (~dominance_matrix(v).any(0)).tolist()


def brute_ranks(v: torch.Tensor) -> list[int]:
    """Peel fronts: the non-dominated points among those left, repeatedly."""
    d = dominance_matrix(v)
    remaining = np.ones(len(v), dtype=bool)
    ranks = np.full(len(v), -1)
    r = 0
    while remaining.any():
        front = remaining & ~d[remaining].any(0)
        ranks[front] = r
        remaining &= ~front
        r += 1
    return ranks.tolist()


@functools.cache
def reference(kind: str, k: int, seed: int, n: int = 60) -> tuple[torch.Tensor, list[bool], list[int]]:
    v = make_set(n, k, seed, kind)
    return v, brute_mask(v), brute_ranks(v)


def brute_crowding(v: torch.Tensor, ranks: list[int]) -> list[float]:
    """Textbook NSGA-II crowding per front with the module's documented conventions.

    Exact duplicates: the first row gets the distance, copies 0; ties in an objective are
    ordered by the full score vector (lexicographically, ascending).
    """
    pts = [tuple(p) for p in v.tolist()]
    out = [0.0] * len(pts)
    for r in set(ranks):
        seen: dict[tuple, int] = {}
        for i, p in enumerate(pts):
            if ranks[i] == r and p not in seen:
                seen[p] = i
        members = list(seen.items())  # (point, first row)
        dist = {i: 0.0 for _, i in members}
        for k in range(v.shape[1]):
            order = sorted(members, key=lambda m: (m[0][k], m[0]))
            lo, hi = order[0][0][k], order[-1][0][k]
            dist[order[0][1]] = math.inf
            dist[order[-1][1]] = math.inf
            for t in range(1, len(order) - 1):
                i = order[t][1]
                if hi > lo:
                    dist[i] += (order[t + 1][0][k] - order[t - 1][0][k]) / (hi - lo)
        for i, d in dist.items():
            out[i] = d
    return out


def hv_inclusion_exclusion(v: torch.Tensor, ref: torch.Tensor) -> float:
    """Exact hypervolume as the measure of a union of boxes [ref, p], by inclusion-exclusion."""
    pts = np.asarray((v - ref).clamp(min=0.0), dtype=np.float64)
    total = 0.0
    for size in range(1, len(pts) + 1):
        sign = 1.0 if size % 2 else -1.0
        for subset in itertools.combinations(range(len(pts)), size):
            total += sign * float(np.prod(pts[list(subset)].min(axis=0)))
    return total


def hv_grid(v: torch.Tensor, ref: torch.Tensor) -> float:
    """Exact hypervolume by coordinate compression: every cell of the grid spanned by the points'
    coordinates is either fully inside the union of boxes [ref, p] or fully outside."""
    pts = np.asarray(v - ref, dtype=np.float64)
    pts = pts[(pts > 0).all(axis=1)]
    if len(pts) == 0:
        return 0.0
    k = pts.shape[1]
    axes = [np.unique(np.concatenate([[0.0], pts[:, d]])) for d in range(k)]
    uppers = np.stack(np.meshgrid(*[a[1:] for a in axes], indexing="ij"), axis=-1).reshape(-1, k)
    sizes = np.stack(np.meshgrid(*[np.diff(a) for a in axes], indexing="ij"), axis=-1).reshape(-1, k)
    covered = (pts[None, :, :] >= uppers[:, None, :]).all(-1).any(-1)
    return float(sizes[covered].prod(axis=1).sum())


def pymoo_ranks(v: torch.Tensor) -> np.ndarray:
    fronts = NonDominatedSorting().do(-v.numpy())  # pymoo minimises
    ranks = np.full(len(v), -1)
    for r, front in enumerate(fronts):
        ranks[front] = r
    return ranks


@pytest.fixture(params=["one_block", "blocks_of_7"])
def mask_block(request, monkeypatch):
    """The torch mask with its default block and with 7-column blocks, so 60 points cross 9 blocks."""
    if request.param == "blocks_of_7":
        monkeypatch.setattr(pareto, "_MAX_ELEMS", 60 * 7)
    return request.param


# ------------------------------------------------------------------ dominance and sorting


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_mask_and_ranks_match_brute_force(kind, k, mask_block) -> None:
    for seed in SEEDS:
        v, mask, ranks = reference(kind, k, seed)
        assert non_dominated_mask(v).tolist() == mask, (kind, k, seed)
        assert non_dominated_sort(v).tolist() == ranks, (kind, k, seed)


def test_identical_points_share_front_and_ties_do_not_dominate() -> None:
    v = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert non_dominated_mask(v).tolist() == [True, True, False, False, False]
    assert non_dominated_sort(v).tolist() == [0, 0, 1, 1, 1]
    # -0.0 and 0.0 are the same score.
    z = torch.tensor([[0.0, 1.0], [-0.0, 1.0]])
    assert non_dominated_sort(z).tolist() == [0, 0]


def test_maximize_flags() -> None:
    v = make_set(40, 3, 0, "ties")
    assert torch.equal(non_dominated_sort(v, maximize=False), non_dominated_sort(-v))
    flipped = v * torch.tensor([1.0, -1.0, 1.0])
    assert torch.equal(non_dominated_sort(v, maximize=[True, False, True]), non_dominated_sort(flipped))
    assert torch.equal(non_dominated_mask(v, maximize=(True, False, True)), non_dominated_mask(flipped))


def test_chain_and_integer_input() -> None:
    t = torch.arange(300)
    chain = torch.stack([t, 2 * t, 3 * t], 1)  # integer dtype, one point per front
    assert non_dominated_sort(chain).tolist() == list(range(299, -1, -1))
    assert non_dominated_mask(chain).tolist() == [False] * 299 + [True]


def test_empty_input() -> None:
    v = torch.zeros(0, 3)
    assert non_dominated_sort(v).shape == (0,)
    assert non_dominated_mask(v).shape == (0,)
    assert crowding_distance(v).shape == (0,)
    assert hypervolume(v, torch.zeros(3)) == 0.0


@needs_pymoo
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_ranks_match_pymoo(kind, k) -> None:
    for seed in SEEDS:
        v, _, ranks = reference(kind, k, seed)
        assert pymoo_ranks(v).tolist() == ranks, (kind, k, seed)  # the brute force agrees with pymoo ...
        assert non_dominated_sort(v).tolist() == ranks, (kind, k, seed)  # ... and so do we


@needs_pymoo
@pytest.mark.parametrize("k", [3, 4])
def test_ranks_match_pymoo_multi_block(k) -> None:
    """Larger sets, including correlated objectives (many fronts) and many ties."""
    g = torch.Generator().manual_seed(k)
    base = torch.randn(1500, 1, generator=g, dtype=torch.float64)
    for v in (
        torch.rand(1500, k, generator=g, dtype=torch.float64),
        base + 0.3 * torch.randn(1500, k, generator=g, dtype=torch.float64),
        torch.randint(0, 6, (1500, k), generator=g).to(torch.float64),
    ):
        ranks = non_dominated_sort(v)
        assert ranks.tolist() == pymoo_ranks(v).tolist()
        assert torch.equal(non_dominated_mask(v), ranks == 0)


# ------------------------------------------------------------------ crowding distance


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_crowding_matches_reference(kind, k) -> None:
    for seed in SEEDS:
        v, _, ranks = reference(kind, k, seed)
        got = crowding_distance(v).tolist()
        want = brute_crowding(v, ranks)
        for a, b in zip(got, want):
            assert (math.isinf(a) and math.isinf(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12), (kind, k, seed)
        # Explicit labels: one group containing everything.
        got_one = crowding_distance(v, torch.zeros(60, dtype=torch.long)).tolist()
        want_one = brute_crowding(v, [0] * 60)
        for a, b in zip(got_one, want_one):
            assert (math.isinf(a) and math.isinf(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12)


def test_crowding_hand_example_and_permutation_invariance() -> None:
    v = torch.tensor([[0.0, 4.0], [1.0, 3.0], [3.0, 1.0], [4.0, 0.0], [2.0, 2.0], [2.0, 2.0]])
    cd = crowding_distance(v)
    # Front of 5 distinct points (one duplicated): x range 4, y range 4.
    # (1, 3): (2 - 0)/4 + (4 - 2)/4 = 1; (2, 2): (3 - 1)/4 * 2 = 1; (3, 1): 1; copy of (2, 2): 0.
    assert cd.tolist() == [math.inf, 1.0, 1.0, math.inf, 1.0, 0.0]
    perm = torch.tensor([3, 0, 2, 1, 4])
    distinct = v[:5]
    assert torch.equal(crowding_distance(distinct[perm]), crowding_distance(distinct)[perm])


@needs_pymoo
@pytest.mark.parametrize("k", [2, 3, 4])
def test_crowding_matches_pymoo_times_k(k) -> None:
    """pymoo averages the per-objective gaps instead of summing them: ours = K * pymoo (tie-free data)."""
    v = make_set(60, k, 0, "front")[:-1]  # drop the duplicate
    ranks = non_dominated_sort(v)
    cd = crowding_distance(v, ranks)
    for r in ranks.unique():
        idx = (ranks == r).nonzero().flatten()
        if len(idx) < 3:
            continue
        theirs = calc_crowding_distance(-v[idx].numpy())
        np.testing.assert_allclose(cd[idx].numpy(), k * theirs, rtol=1e-12)


def test_pareto_rewards_order_and_range() -> None:
    for kind in KINDS:
        v = make_set(60, 3, 1, kind)
        ranks = non_dominated_sort(v)
        cd = crowding_distance(v, ranks)
        credit = pareto_rewards(v)
        assert torch.equal(credit >= 0, ranks == 0)
        assert ((credit > -ranks.double() - 1e-12) & (credit < -ranks.double() + 1)).all()
        # Strictly better front => strictly higher credit.
        better = ranks[:, None] < ranks[None, :]
        assert (credit[:, None] > credit[None, :])[better].all()
        # Within a front, more isolated => higher credit; extremes on top.
        same = ranks[:, None] == ranks[None, :]
        more = cd[:, None] > cd[None, :]
        assert (credit[:, None] > credit[None, :])[same & more].all()
        finite = torch.isfinite(cd)
        expected = -ranks.double() + torch.where(finite, cd, torch.full_like(cd, 3.5)) / 4
        assert torch.allclose(credit, expected)


# ------------------------------------------------------------------ hypervolume


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 3])
def test_hypervolume_exact_matches_grid(kind, k) -> None:
    for seed in SEEDS:
        v = make_set(40 if k == 3 else 60, k, seed, kind)
        ref = torch.full((k,), 0.5) if kind == "ties" else v.min(0).values - 0.1
        want = hv_grid(v, ref)
        got = hypervolume(v, ref)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12), (kind, k, seed)
        assert hypervolume(v, ref, method="exact") == got


@pytest.mark.parametrize("k", [2, 3, 4])
def test_hypervolume_exact_matches_inclusion_exclusion(k) -> None:
    for seed in SEEDS:
        for kind in KINDS:
            v = make_set(10, k, seed, kind)
            ref = v.min(0).values - 0.05 if kind != "ties" else torch.full((k,), 0.5)
            want = hv_inclusion_exclusion(v, ref)
            assert hypervolume(v, ref, method="exact") == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_hypervolume_hand_examples_and_reference_handling() -> None:
    v = torch.tensor([[3.0, 1.0], [1.0, 3.0], [2.0, 2.0]])
    assert hypervolume(v, torch.zeros(2)) == pytest.approx(6.0)
    # Points not strictly better than the reference in every objective contribute nothing.
    assert hypervolume(v, torch.tensor([1.0, 0.0])) == pytest.approx(3.0)
    assert hypervolume(v, torch.tensor([3.0, 0.0])) == 0.0
    cube = torch.tensor([[1.0, 2.0, 3.0]])
    assert hypervolume(cube, torch.zeros(3)) == pytest.approx(6.0)
    # Minimisation: reference above the points.
    assert hypervolume(-v, torch.zeros(2), maximize=False) == pytest.approx(6.0)
    assert hypervolume(v * torch.tensor([1.0, -1.0]), torch.zeros(2), maximize=[True, False]) == pytest.approx(6.0)


def test_hypervolume_k4_is_exact_and_leaves_global_rng_alone() -> None:
    """K >= 4 used to fall back to a Monte Carlo estimate drawn from the global torch RNG."""
    v = make_set(10, 4, 0, "uniform")
    ref = torch.zeros(4)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    got = hypervolume(v, ref)
    assert torch.equal(torch.get_rng_state(), before)
    assert got == pytest.approx(hv_inclusion_exclusion(v, ref), rel=1e-12, abs=1e-12)
    assert got == pytest.approx(hv_grid(v, ref), rel=1e-12, abs=1e-12)
    assert hypervolume(v, ref, method="exact") == got


@pytest.mark.parametrize("k", [4, 5])
def test_hypervolume_exact_for_five_objectives_and_ties(k) -> None:
    for kind in KINDS:
        v = make_set(9, k, 3, kind)
        ref = torch.full((k,), 0.5) if kind == "ties" else v.min(0).values - 0.05
        assert hypervolume(v, ref) == pytest.approx(hv_grid(v, ref), rel=1e-12, abs=1e-12), kind


def test_hypervolume_monte_carlo_needs_a_generator_and_is_seeded() -> None:
    v = make_set(10, 4, 1, "front")
    ref = torch.zeros(4)
    exact = hv_inclusion_exclusion(v, ref)
    with pytest.raises(ValueError, match="needs generator=.*global torch RNG"):
        hypervolume(v, ref, method="monte_carlo")
    before = torch.get_rng_state()
    runs = [
        hypervolume(v, ref, method="monte_carlo", samples=4000, generator=torch.Generator().manual_seed(seed))
        for seed in range(20)
    ]
    assert torch.equal(torch.get_rng_state(), before)
    again = hypervolume(v, ref, method="monte_carlo", samples=4000, generator=torch.Generator().manual_seed(0))
    assert again == runs[0]
    assert len(set(runs)) > 1  # different seeds, different samples
    # Unbiased: the mean of the 20 estimates is within 3 standard errors of the exact value.
    se_mean = float(np.std(runs, ddof=1)) / math.sqrt(len(runs))
    assert abs(float(np.mean(runs)) - exact) <= 3 * se_mean


@needs_pymoo
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_hypervolume_matches_pymoo(kind, k) -> None:
    for seed in SEEDS:
        v = make_set(60, k, seed, kind)
        ref = v.min(0).values - 0.1 if kind != "ties" else torch.full((k,), 0.5)
        theirs = HV(ref_point=-ref.numpy())(-v.numpy())
        ours = hypervolume(v, ref, method="exact")
        assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12), (kind, k, seed)


@needs_pymoo
def test_hypervolume_large_matches_pymoo() -> None:
    g = torch.Generator().manual_seed(0)
    for k in (2, 3):
        v = torch.rand(3000, k, generator=g, dtype=torch.float64)
        v = v / v.norm(dim=1, keepdim=True)
        ref = torch.zeros(k)
        assert hypervolume(v, ref) == pytest.approx(HV(ref_point=-ref.numpy())(-v.numpy()), rel=1e-9)


# ------------------------------------------------------------------ R2, IGD, IGD+


def test_r2_hand_example() -> None:
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.6]])
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    ideal = torch.ones(2)
    # w=(1,0): best point has v1 = 1 -> 0; w=(.5,.5): (0.6,0.6) -> 0.2; w=(0,1): 0.
    assert r2_indicator(v, w, ideal) == pytest.approx(0.2 / 3)
    assert r2_indicator(-v, w, -ideal, maximize=False) == pytest.approx(0.2 / 3)
    # Adding a better point never increases R2.
    assert r2_indicator(torch.cat([v, torch.tensor([[0.8, 0.8]])]), w, ideal) < r2_indicator(v, w, ideal)


def test_igd_hand_example() -> None:
    ref = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    v = torch.tensor([[0.0, 0.5], [2.0, 0.0]])
    assert igd(v, ref) == pytest.approx((0.5 + 1.0) / 2)
    # IGD+ ignores where a point is better than the reference point: (2, 0) matches (1, 0).
    assert igd_plus(v, ref) == pytest.approx((0.5 + 0.0) / 2)
    assert igd_plus(-v, -ref, maximize=False) == pytest.approx(0.25)


@needs_pymoo
@pytest.mark.parametrize("k", [2, 3, 4])
def test_igd_matches_pymoo(k) -> None:
    for seed in SEEDS:
        v = make_set(50, k, seed, "uniform")
        front = make_set(30, k, seed + 10, "front")
        assert igd(v, front) == pytest.approx(IGD(-front.numpy())(-v.numpy()), rel=1e-9)
        assert igd_plus(v, front) == pytest.approx(IGDPlus(-front.numpy())(-v.numpy()), rel=1e-9)


# ------------------------------------------------------------------ scalarisations


def test_scalarisations_hand_examples() -> None:
    v = torch.tensor([[1.0, 3.0], [2.0, 2.0], [4.0, 0.5]])
    w = torch.tensor([0.25, 0.75])
    assert torch.allclose(weighted_sum(v, w), torch.tensor([2.5, 2.0, 1.375]))
    # Minimising the second objective flips its sign but keeps "higher = better".
    assert torch.allclose(weighted_sum(v, w, maximize=[True, False]), torch.tensor([-2.0, -1.0, 0.625]))
    # Per-sample weights.
    w_rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert torch.allclose(weighted_sum(v, w_rows), torch.tensor([1.0, 2.0, 2.25]))

    ideal = torch.tensor([4.0, 3.0])
    # -max(w1 (4 - v1), w2 (3 - v2)): (1,3): -max(.75, 0) ; (2,2): -max(.5, .75) ; (4,.5): -max(0, 1.875)
    assert torch.allclose(tchebycheff_distance(v, w, ideal), torch.tensor([-0.75, -0.75, -1.875]))
    assert torch.allclose(tchebycheff_distance(-v, w, -ideal, maximize=False), tchebycheff_distance(v, w, ideal))

    lower = torch.tensor([0.0, 0.0])
    want = 0.25 * torch.log(v[:, 0] + 1e-8) + 0.75 * torch.log(v[:, 1] + 1e-8)
    assert torch.allclose(log_convex(v, w, lower), want)
    assert torch.allclose(log_convex(v, w), want)  # lower defaults to 0
    # Balanced beats lopsided at equal weights and equal sum: log(2)+log(2) > log(1)+log(3).
    eq = torch.tensor([0.5, 0.5])
    s = log_convex(torch.tensor([[2.0, 2.0], [1.0, 3.0]]), eq)
    assert s[0] > s[1]
    # Minimised objective: shifted by (lower - v), lower being the worst (largest) acceptable value.
    m = log_convex(torch.tensor([[1.0]]), torch.tensor([1.0]), torch.tensor([3.0]), maximize=False, eps=0.0)
    assert m.item() == pytest.approx(math.log(2.0))
    assert weighted_sum(v.float(), w).dtype == torch.float32


def test_tchebycheff_is_mogfn_min_form() -> None:
    """MOGFN's Tchebycheff reward min_k w_k R_k: positive for positive rewards, so R^beta and log R work."""
    v = torch.tensor([[1.0, 3.0], [2.0, 2.0], [4.0, 0.5]], dtype=torch.float64)
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    # w * v = (0.25, 2.25), (0.5, 1.5), (1.0, 0.375)
    want = torch.tensor([0.25, 0.5, 0.375], dtype=torch.float64)
    got = tchebycheff(v, w)
    assert torch.equal(got, want)
    assert torch.isfinite(torch.log(got)).all() and (got**60 > 0).all()
    # Per-sample preferences, as MOGFN-PC conditions each sample on its own w.
    w_rows = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.1, 0.9]], dtype=torch.float64)
    assert torch.equal(tchebycheff(v, w_rows), torch.tensor([0.0, 1.0, 0.4], dtype=torch.float64))
    # A minimised objective enters with a minus sign.
    assert torch.equal(tchebycheff(v, w, maximize=[True, False]), torch.tensor([-2.25, -1.5, -0.375], dtype=torch.float64))
    # The same number as the distance form with the "ideal" at the origin: -max_k w_k (0 - v_k).
    assert torch.equal(got, tchebycheff_distance(v, w, torch.zeros(2)))
    # The distance form itself stays <= 0 below a proper ideal point.
    assert (tchebycheff_distance(v, w, v.max(0).values) <= 0).all()
    # Gradient: w_k on each row's arg-min objective.
    x = v.clone().requires_grad_(True)
    tchebycheff(x, w).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[0.25, 0.0], [0.25, 0.0], [0.0, 0.75]], dtype=torch.float64))
    assert tchebycheff(v.float(), w).dtype == torch.float32


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: non_dominated_sort(torch.rand(5)), r"shape \[N, K\].*unsqueeze"),
        (lambda: non_dominated_mask(torch.rand(2, 3, 4)), r"shape \[N, K\]"),
        (lambda: non_dominated_sort(torch.zeros(4, 0)), "K = 0"),
        (lambda: non_dominated_sort(torch.tensor([[1.0, float("nan")]])), "NaN.*drop those samples"),
        (lambda: hypervolume(torch.rand(4, 3), torch.zeros(2)), r"reference must have shape \[K\] = \[3\]"),
        (lambda: hypervolume(torch.rand(4, 2), torch.tensor([0.0, float("nan")])), "reference contains NaN"),
        (lambda: hypervolume(torch.rand(4, 2), torch.zeros(2), method="grid"), "method must be"),
        (lambda: hypervolume(torch.rand(4, 2), torch.zeros(2), samples=0), "samples must be a positive int"),
        (lambda: hypervolume(torch.rand(4, 2), torch.zeros(2), method="monte_carlo"), "needs generator="),
        (lambda: hypervolume(torch.tensor([[1.0, float("inf")]]), torch.zeros(2)), "infinite"),
        (lambda: weighted_sum(torch.rand(4, 3), torch.ones(2)), r"weights must have shape \[K\] = \[3\]"),
        (lambda: weighted_sum(torch.rand(4, 2), torch.tensor([1.0, -1.0])), "maximize="),
        (lambda: tchebycheff_distance(torch.rand(4, 2), torch.ones(2), torch.ones(3)), r"ideal must have shape \[K\] = \[2\]"),
        (lambda: tchebycheff(torch.rand(4, 2), torch.ones(3)), r"weights must have shape \[K\] = \[2\]"),
        (lambda: log_convex(torch.tensor([[-1.0, 1.0]]), torch.ones(2)), "Pass lower="),
        (lambda: r2_indicator(torch.rand(4, 2), torch.ones(3, 3), torch.ones(2)), r"weights must have shape \[W, K\]"),
        (lambda: igd(torch.rand(4, 2), torch.rand(5, 3)), "reference_front has 3 objectives but values has 2"),
        (lambda: crowding_distance(torch.rand(4, 2), torch.zeros(3, dtype=torch.long)), r"ranks must be an integer tensor of shape \[N\] = \[4\]"),
        (lambda: non_dominated_sort(torch.rand(4, 2), maximize=[True]), "maximize must be a bool or a sequence of 2 bools"),
    ],
)
def test_invalid_input_errors(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_scalarisations_are_differentiable() -> None:
    """Differentiable rewards (DRaFT-style) can backpropagate through the scalarisations."""
    v = torch.tensor([[1.0, 3.0], [2.0, 2.0]], requires_grad=True)
    w = torch.tensor([0.25, 0.75])
    (weighted_sum(v, w).sum() + tchebycheff_distance(v, w, torch.tensor([4.0, 3.0])).sum() + log_convex(v, w).sum()).backward()
    # d/dv: weighted sum gives w; Tchebycheff adds w_k on each row's arg-max objective (row 0: objective 0,
    # row 1: objective 1); log gives w / v.
    want = torch.tensor([[0.25 + 0.25 + 0.25 / 1.0, 0.75 + 0.0 + 0.75 / 3.0], [0.25 + 0.0 + 0.25 / 2.0, 0.75 + 0.75 + 0.75 / 2.0]])
    assert torch.allclose(v.grad, want, atol=1e-6)
