"""Multi-objective (Pareto) scoring: dominance, fronts, crowding, quality indicators, scalarisations.

Conventions used throughout:

- A batch of K-objective scores is a tensor ``values`` of shape ``[N, K]`` (one row per sample).
- Every objective is MAXIMISED (higher is better), matching :class:`rewards.Reward`. Pass
  ``maximize=False`` (all objectives) or a length-K sequence of bools (per objective) to flip
  objectives that are minimised; reference points, ideal points and bounds are then given in the
  objectives' own units.
- Point ``a`` dominates ``b`` when ``a >= b`` in every objective and ``a > b`` in at least one.
  Identical points therefore never dominate each other and always share a front.

Non-dominated sorting, hypervolume and IGD / IGD+ run in the compiled ``moocore`` library on a
float64 host copy of the scores (it is faster than any torch formulation we measured, see
docs/benchmarks.md); their results come back on the input's device. The dominance mask for
training batches, crowding distance, R2 and the scalarisations are torch on any device, and the
scalarisations are differentiable.

Typical use in a training loop::

    from rewards.pareto import non_dominated_mask, pareto_rewards, hypervolume

    scores = reward(images).rewards                 # [B, K]
    keep = non_dominated_mask(scores)               # [B] bool: Parrot-style "reward only the front"
    credit = pareto_rewards(scores)                 # [B] scalar credit, higher = better
    hv = hypervolume(scores, reference=torch.zeros(scores.shape[1]))   # float, log it
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import moocore
import numpy as np
import torch
from torch import Tensor

__all__ = [
    "crowding_distance",
    "hypervolume",
    "igd",
    "igd_plus",
    "log_convex",
    "non_dominated_mask",
    "non_dominated_sort",
    "pareto_rewards",
    "r2_indicator",
    "tchebycheff",
    "tchebycheff_distance",
    "weighted_sum",
]

Maximize = bool | Sequence[bool] | Tensor

# Upper bound on elements of one [rows, cols] comparison temporary (the dominance mask) or
# [rows, cols, K] one (R2): ~16 MB of bools / 128 MB of float64 at most.
_MAX_ELEMS = 1 << 24

# --------------------------------------------------------------------------------------------
# Input checking and orientation
# --------------------------------------------------------------------------------------------


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _to_tensor(x: object, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except Exception as exc:
        raise ValueError(f"{name} must be a torch tensor (or array-like); got {_describe(x)}") from exc


def _check_no_nan(t: Tensor, name: str) -> None:
    if t.is_floating_point() and bool(torch.isnan(t).any()):
        bad = torch.isnan(t).reshape(t.shape[0], -1).any(-1).nonzero().flatten()[:5].tolist() if t.ndim else []
        where = f" (first rows with NaN: {bad})" if t.ndim else ""
        raise ValueError(
            f"{name} contains NaN{where}; NaN has no order, so drop those samples or replace the NaN "
            f"with a finite score (e.g. the worst score in the batch) before Pareto scoring"
        )


def _check_values(values: object, name: str = "values") -> Tensor:
    """Validate a ``[N, K]`` score matrix and return it as a float tensor."""
    v = _to_tensor(values, name)
    if v.ndim != 2:
        raise ValueError(
            f"{name} must have shape [N, K] (N samples, K objectives); got {_describe(v)}. "
            f"Use values.unsqueeze(0) for a single point or values.unsqueeze(1) for a single objective"
        )
    if v.shape[1] == 0:
        raise ValueError(f"{name} has K = 0 objectives (shape {tuple(v.shape)}); pass at least one column")
    if v.is_complex():
        raise ValueError(f"{name} is complex ({v.dtype}); Pareto dominance needs real-valued scores")
    if not v.is_floating_point():
        v = v.to(torch.float64)
    _check_no_nan(v, name)
    return v


def _check_vector(x: object, k: int, name: str, like: Tensor) -> Tensor:
    """Validate a ``[K]`` vector (reference point, ideal point, bounds) against K objectives."""
    t = _to_tensor(x, name)
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1 or t.shape[0] != k:
        raise ValueError(
            f"{name} must have shape [K] = [{k}] to match values' {k} objectives; got {_describe(t)}. "
            f"Give one entry per objective, in the same column order as values"
        )
    if t.is_complex():
        raise ValueError(f"{name} is complex ({t.dtype}); it must be real-valued")
    t = t.to(device=like.device, dtype=torch.float64)
    _check_no_nan(t, name)
    return t


def _check_weights(weights: object, k: int, name: str, like: Tensor, *, allow_rows: int | None) -> Tensor:
    """Validate non-negative weights of shape ``[K]`` (or ``[rows, K]`` when ``allow_rows`` is set)."""
    w = _to_tensor(weights, name)
    ok_shape = (w.ndim == 1 and w.shape[0] == k) or (
        allow_rows is not None and w.ndim == 2 and w.shape[1] == k and w.shape[0] in (1, allow_rows)
    )
    if not ok_shape:
        rows = f" or [{allow_rows}, {k}] (one weight vector per sample)" if allow_rows is not None else ""
        raise ValueError(
            f"{name} must have shape [K] = [{k}]{rows} to match values' {k} objectives; got {_describe(w)}"
        )
    if w.is_complex():
        raise ValueError(f"{name} is complex ({w.dtype}); it must be real-valued")
    w = w.to(device=like.device, dtype=torch.float64)
    _check_no_nan(w, name)
    if bool(torch.isinf(w).any()):
        raise ValueError(f"{name} contains inf; use finite weights (only their ratios matter for ranking)")
    if bool((w < 0).any()):
        raise ValueError(
            f"{name} has negative entries ({w.flatten()[:8].tolist()}); weights must be >= 0. To minimise an "
            f"objective instead of maximising it, keep its weight positive and pass maximize=[..., False, ...]"
        )
    return w


def _signs(maximize: Maximize, k: int, device: torch.device) -> Tensor:
    """+1 for maximised objectives, -1 for minimised ones: ``[K]`` float64."""
    if isinstance(maximize, bool):
        return torch.full((k,), 1.0 if maximize else -1.0, dtype=torch.float64, device=device)
    m = torch.as_tensor(maximize)
    if m.dtype != torch.bool or m.ndim != 1 or m.shape[0] != k:
        raise ValueError(
            f"maximize must be a bool or a sequence of {k} bools (one per objective); got {_describe(m)} "
            f"with values {m.flatten()[:8].tolist()}"
        )
    return torch.where(m, 1.0, -1.0).to(device=device, dtype=torch.float64)


def _orient(v: Tensor, maximize: Maximize) -> Tensor:
    """Flip minimised objectives so that everything downstream maximises."""
    if isinstance(maximize, bool) and maximize:
        return v
    return v * _signs(maximize, v.shape[1], v.device).to(v.dtype)


def _host(t: Tensor) -> np.ndarray:
    """The float64 CPU copy moocore reads (no gradient)."""
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _out_dtype(values: Tensor) -> torch.dtype:
    return values.dtype if values.is_floating_point() else torch.get_default_dtype()


# --------------------------------------------------------------------------------------------
# Dominance and non-dominated sorting
# --------------------------------------------------------------------------------------------


def non_dominated_mask(values: Tensor, *, maximize: Maximize = True) -> Tensor:
    """Flag the points that no other point dominates (the first Pareto front), in torch.

    Meant for training batches that live on an accelerator: the pairwise comparison runs on
    ``values.device`` without a host round trip, in column blocks of at most ``2**24`` comparisons.
    For large sets on the CPU, ``non_dominated_sort(values) == 0`` (moocore) is faster.

    Args:
        values: ``[N, K]`` scores, higher is better (see ``maximize``).
        maximize: True (all objectives maximised), False (all minimised), or ``K`` bools.

    Returns:
        ``[N]`` bool on ``values.device``; identical points get the same flag.

    Cost: O(N^2 K) comparisons, O(N * block) memory.
    """
    v = _orient(_check_values(values), maximize)
    n, k = v.shape
    cols = v.T.contiguous()  # [K, N]: one contiguous row per objective
    mask = torch.empty(n, dtype=torch.bool, device=v.device)
    block = max(1, _MAX_ELEMS // max(1, n))
    for start in range(0, n, block):
        candidates = cols[:, start : start + block]  # [K, b]
        # [N, b]: point i is >= candidate j everywhere / > it somewhere.
        at_least = cols[0, :, None] >= candidates[0, None, :]
        better = cols[0, :, None] > candidates[0, None, :]
        for obj in range(1, k):
            at_least &= cols[obj, :, None] >= candidates[obj, None, :]
            better |= cols[obj, :, None] > candidates[obj, None, :]
        mask[start : start + block] = ~(at_least & better).any(0)
    return mask


def non_dominated_sort(values: Tensor, *, maximize: Maximize = True) -> Tensor:
    """Pareto rank of every point: 0 for the first front, 1 for the front left after removing it, ...

    Computed by ``moocore.pareto_rank`` on a float64 host copy.

    Args:
        values: ``[N, K]`` scores, higher is better (see ``maximize``).
        maximize: True (all objectives maximised), False (all minimised), or ``K`` bools.

    Returns:
        ``[N]`` long ranks on ``values.device``; identical points share a rank.

    Cost: O(N log N) for K = 2, O(N^2 log N) for K = 3, O(N^2 log^(K-2) N) beyond (moocore).
    """
    v = _orient(_check_values(values), maximize)
    if v.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=v.device)
    ranks = moocore.pareto_rank(_host(v), maximise=True)
    return torch.from_numpy(ranks).to(device=v.device, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Crowding distance and a per-sample Pareto credit
# --------------------------------------------------------------------------------------------


def crowding_distance(
    values: Tensor, ranks: Tensor | None = None, *, maximize: Maximize = True
) -> Tensor:
    """NSGA-II crowding distance, computed separately inside each front.

    For every objective k the points of a front are sorted by v_k; the two extremes get ``inf`` and
    every other point adds ``(v_k[next] - v_k[prev]) / (max_k - min_k)``, the gap between its
    neighbours relative to the front's range in that objective (0 when the range is 0). Larger
    means more isolated, i.e. more valuable for diversity.

    Conventions that make the result well defined:
    - Ties in v_k are ordered by the points' full score vectors (lexicographically), so the result
      does not depend on the order of the rows.
    - Exact duplicates inside a front: the first row (lowest index) is scored as above, the copies
      get 0 (a copy adds no diversity).
    - Fronts with one or two distinct points: all ``inf``.

    Args:
        values: ``[N, K]`` scores.
        ranks: ``[N]`` integer front labels (any integers; points with equal labels form a group).
            Default: :func:`non_dominated_sort` of ``values``.
        maximize: orientation, only used to compute ``ranks`` when they are not given (crowding
            itself does not depend on the direction of the objectives).

    Returns:
        ``[N]`` crowding distances (``inf`` at the extremes of each front), float.
    """
    v = _check_values(values)
    n, k = v.shape
    out_dtype = _out_dtype(v)
    if ranks is None:
        ranks = non_dominated_sort(v, maximize=maximize)
    else:
        ranks = _to_tensor(ranks, "ranks")
        if ranks.shape != (n,) or ranks.is_floating_point() or ranks.is_complex() or ranks.dtype == torch.bool:
            raise ValueError(
                f"ranks must be an integer tensor of shape [N] = [{n}] (one front label per row of "
                f"values); got {_describe(ranks)}. Pass non_dominated_sort(values) or leave it None"
            )
        ranks = ranks.to(v.device)
    if n == 0:
        return torch.zeros(0, dtype=out_dtype, device=v.device)

    v64 = v.to(torch.float64) + 0.0
    # Deduplicate per front; torch.unique sorts (label, scores) lexicographically, which also
    # provides the deterministic tie order promised above.
    key = torch.cat([ranks.to(torch.float64)[:, None], v64], dim=1)
    uniq, inverse = torch.unique(key, dim=0, sorted=True, return_inverse=True)
    u_n = uniq.shape[0]
    group = uniq[:, 0]
    uv = uniq[:, 1:]

    dist = torch.zeros(u_n, dtype=torch.float64, device=v.device)
    for obj in range(k):
        order = torch.sort(uv[:, obj], stable=True).indices
        order = order.index_select(0, torch.sort(group.index_select(0, order), stable=True).indices)
        g = group.index_select(0, order)
        x = uv[:, obj].index_select(0, order)
        new_group = torch.ones(u_n, dtype=torch.bool, device=v.device)
        new_group[1:] = g[1:] != g[:-1]
        is_first = new_group
        is_last = torch.ones(u_n, dtype=torch.bool, device=v.device)
        is_last[:-1] = new_group[1:]
        # Per-point index of its group's first and last element in this sorted order.
        seg_id = torch.cumsum(new_group.long(), 0) - 1
        starts = new_group.nonzero().flatten()
        ends = is_last.nonzero().flatten()
        span = (x[ends] - x[starts])[seg_id]
        contrib = torch.zeros(u_n, dtype=torch.float64, device=v.device)
        if u_n > 2:
            gap = x[2:] - x[:-2]
            inner_span = span[1:-1]
            contrib[1:-1] = torch.where(inner_span > 0, gap / torch.where(inner_span > 0, inner_span, 1.0), 0.0)
        contrib[is_first | is_last] = math.inf
        dist.index_add_(0, order, contrib)

    first_row = torch.full((u_n,), n, dtype=torch.long, device=v.device)
    first_row.scatter_reduce_(0, inverse, torch.arange(n, device=v.device), reduce="amin")
    out = torch.zeros(n, dtype=torch.float64, device=v.device)
    out[first_row] = dist
    return out.to(out_dtype)


def pareto_rewards(values: Tensor, *, maximize: Maximize = True) -> Tensor:
    """One scalar credit per sample from its Pareto rank and crowding distance (higher = better).

    ``credit_i = -rank_i + min(cd_i, K + 1/2) / (K + 1)``

    where ``rank_i`` is the :func:`non_dominated_sort` front index and ``cd_i`` the
    :func:`crowding_distance` inside that front. Each normalised gap is at most 1, so a finite
    ``cd`` is at most K and the crowding bonus lies in [0, K/(K+1)]; front extremes (``cd = inf``)
    get (K + 1/2)/(K + 1) < 1, just above every interior point. Hence:

    - every sample of front r scores strictly more than every sample of front r + 1
      (credits of front r lie in [-r, -r + 1));
    - within a front, isolated samples (and the extremes) beat crowded ones and duplicates;
    - non-dominated samples are exactly those with credit >= 0, which is the Parrot-style
      "reward only the batch-wise Pareto-optimal samples" selection
      (``credit.clamp(min=0)`` or ``non_dominated_mask``).

    Args:
        values: ``[N, K]`` scores, higher is better (see ``maximize``).
        maximize: True, False, or ``K`` bools.

    Returns:
        ``[N]`` credits, float, on ``values.device``.
    """
    v = _orient(_check_values(values), maximize)
    k = v.shape[1]
    ranks = non_dominated_sort(v)
    cd = crowding_distance(v, ranks).to(torch.float64)
    bonus = cd.clamp(max=k + 0.5) / (k + 1)
    return (bonus - ranks.to(torch.float64)).to(_out_dtype(v))

# --------------------------------------------------------------------------------------------
# Hypervolume
# --------------------------------------------------------------------------------------------


def hypervolume(
    values: Tensor,
    reference: Tensor,
    *,
    method: Literal["auto", "exact", "monte_carlo"] = "auto",
    samples: int = 100_000,
    generator: torch.Generator | None = None,
    maximize: Maximize = True,
) -> float:
    """Hypervolume: the volume dominated by ``values`` and dominating ``reference``.

    With maximised objectives the reference sits below the points (e.g. the worst acceptable
    scores); a point contributes only if it is strictly better than the reference in every
    objective. Larger is better; it grows whenever the front improves anywhere.

    Args:
        values: ``[N, K]`` scores (see ``maximize``).
        reference: ``[K]`` reference point in the objectives' own units.
        method: ``"auto"`` or ``"exact"`` (the same: moocore's exact algorithms for every K,
            O(N log N) for K <= 3, O(N^2) for K = 4, O(N^(K-2)) beyond, so thousands of points are
            instant up to K = 4), or ``"monte_carlo"`` (moocore's unbiased Monte Carlo estimate,
            for K >= 5 with many points; needs ``generator``).
        samples: Monte Carlo sample count.
        generator: required by ``"monte_carlo"``, which draws its seed from it, so the estimate is
            reproducible and the global torch RNG (the training random stream) is never touched.
        maximize: True, False, or ``K`` bools.

    Returns:
        The hypervolume as a Python float (0.0 when no point beats the reference).
    """
    v = _check_values(values)
    k = v.shape[1]
    ref = _check_vector(reference, k, "reference", v)
    if bool(torch.isinf(ref).any()):
        raise ValueError(f"reference must be finite (got {ref.tolist()}); an infinite corner gives an infinite volume")
    if method not in ("auto", "exact", "monte_carlo"):
        raise ValueError(f"method must be 'auto', 'exact' or 'monte_carlo'; got {method!r}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int; got {samples!r}")
    if method == "monte_carlo" and generator is None:
        raise ValueError(
            "method='monte_carlo' needs generator=torch.Generator().manual_seed(...): the estimate never "
            "draws from the global torch RNG, so that it cannot shift the training random stream"
        )
    # On the host from here: moocore reads numpy, orients by `maximise` and ignores the points that
    # do not beat the reference in every objective.
    points, corner = _host(v), _host(ref)
    signs = _host(_signs(maximize, k, torch.device("cpu")))
    if np.isinf(points).any():
        beats = ((points - corner) * signs > 0).all(1)
        if np.isposinf(points[beats] * signs).any():
            raise ValueError(
                "values has +inf (in the improving direction) for points that beat the reference, so the "
                "hypervolume is infinite; clip the scores to a finite range first"
            )
    maximise = (signs > 0).tolist()
    if method == "monte_carlo":
        seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
        return float(
            moocore.hv_approx(points, ref=corner, maximise=maximise, nsamples=samples, seed=seed, method="DZ2019-MC")
        )
    return float(moocore.hypervolume(points, ref=corner, maximise=maximise))


# --------------------------------------------------------------------------------------------
# Distance-based indicators
# --------------------------------------------------------------------------------------------


def r2_indicator(values: Tensor, weights: Tensor, ideal: Tensor, *, maximize: Maximize = True) -> float:
    """R2 indicator: mean over weight vectors of the best weighted Tchebycheff distance to ``ideal``.

    ``R2 = mean_w min_i max_k w_k * (ideal_k - v_ik)`` (in the maximisation orientation), i.e. the
    mean over ``w`` of ``-max_i tchebycheff_distance(values, w, ideal)[i]``. Lower is
    better. The distance is signed rather than absolute so that improving a point never worsens
    R2 even if it passes the ideal point.

    Args:
        values: ``[N, K]`` scores (see ``maximize``).
        weights: ``[W, K]`` non-negative weight vectors (or ``[K]`` for one).
        ideal: ``[K]`` ideal (utopian) point in the objectives' own units.

    Returns:
        R2 as a Python float.
    """
    v = _check_values(values)
    n, k = v.shape
    if n == 0:
        raise ValueError("values is empty (N = 0); R2 needs at least one point")
    w = _to_tensor(weights, "weights")
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2 or w.shape[1] != k or w.shape[0] == 0:
        raise ValueError(f"weights must have shape [W, K] with K = {k} and W >= 1; got {_describe(w)}")
    w = _check_weights(w, k, "weights", v, allow_rows=w.shape[0])
    s = _signs(maximize, k, v.device)
    gap = (_check_vector(ideal, k, "ideal", v) - v.to(torch.float64)) * s  # [N, K], >= 0 below the ideal
    rows = max(1, _MAX_ELEMS // max(1, n * k))
    best = [(w[a : a + rows, None, :] * gap[None]).amax(-1).amin(-1) for a in range(0, w.shape[0], rows)]
    return float(torch.cat(best).mean())



def _distance_indicator(values: Tensor, reference_front: Tensor, maximize: Maximize, plus: bool) -> float:
    v = _check_values(values)
    n, k = v.shape
    ref = _check_values(reference_front, "reference_front")
    if ref.shape[1] != k:
        raise ValueError(
            f"reference_front has {ref.shape[1]} objectives but values has {k}; both must be [*, K] with "
            f"the same columns"
        )
    if n == 0 or ref.shape[0] == 0:
        raise ValueError(
            f"values ({n} rows) and reference_front ({ref.shape[0]} rows) must both be non-empty"
        )
    s = _signs(maximize, k, v.device)
    points = _host(v.to(torch.float64) * s)
    front = _host(ref.to(device=v.device, dtype=torch.float64) * s)
    indicator = moocore.igd_plus if plus else moocore.igd
    return float(indicator(points, ref=front, maximise=True))


def igd(values: Tensor, reference_front: Tensor, *, maximize: Maximize = True) -> float:
    """Inverted generational distance: mean over reference-front points of the Euclidean distance
    to the nearest point of ``values``. Lower is better (0 when every reference point is matched).
    Computed by ``moocore.igd``.

    Args:
        values: ``[N, K]`` scores.
        reference_front: ``[M, K]`` points of the target (true or best-known) front.
        maximize: orientation; Euclidean distance does not depend on it, kept for symmetry with
            :func:`igd_plus`.
    """
    return _distance_indicator(values, reference_front, maximize, plus=False)


def igd_plus(values: Tensor, reference_front: Tensor, *, maximize: Maximize = True) -> float:
    """IGD+: like :func:`igd` but with the dominance-aware distance
    ``d+(z, a) = sqrt(sum_k max(z_k - a_k, 0)^2)`` (maximisation), which ignores the objectives where
    point ``a`` already beats reference point ``z``. Weakly Pareto compliant; lower is better.
    Computed by ``moocore.igd_plus``.

    Args:
        values: ``[N, K]`` scores (see ``maximize``).
        reference_front: ``[M, K]`` points of the target front.
    """
    return _distance_indicator(values, reference_front, maximize, plus=True)


# --------------------------------------------------------------------------------------------
# Scalarisations (per-sample, higher = better)
# --------------------------------------------------------------------------------------------


def _scalarisation_inputs(values: Tensor, weights: Tensor, maximize: Maximize) -> tuple[Tensor, Tensor, Tensor]:
    v = _check_values(values)
    n, k = v.shape
    w = _check_weights(weights, k, "weights", v, allow_rows=n)
    s = _signs(maximize, k, v.device)
    return v, w, s


def weighted_sum(values: Tensor, weights: Tensor, *, maximize: Maximize = True) -> Tensor:
    """Linear scalarisation ``sum_k w_k * v_k`` (minimised objectives enter with a minus sign).

    Only reaches points on the convex hull of the front; use :func:`tchebycheff` to reach the rest.

    Args:
        values: ``[N, K]`` scores.
        weights: ``[K]`` non-negative weights, or ``[N, K]`` for per-sample preferences.

    Returns:
        ``[N]``, higher = better.
    """
    v, w, s = _scalarisation_inputs(values, weights, maximize)
    return (v.to(torch.float64) * (w * s)).sum(-1).to(_out_dtype(v))


def tchebycheff(values: Tensor, weights: Tensor, *, maximize: Maximize = True) -> Tensor:
    """Weighted Tchebycheff scalarisation for maximisation: ``min_k w_k * v_k``.

    MOGFN's Tchebycheff reward (Jain et al., 2023): the weighted worst objective. For positive
    rewards and positive weights it is positive, so it can be raised to a power ``R^beta`` or
    logged as a GFlowNet reward; maximising it over a front reaches every Pareto-optimal point
    (concave parts included) by choosing the weights. A zero weight makes its term 0, so with
    positive rewards the value is then 0 for every sample: use strictly positive weights (Dirichlet
    samples are; move simplex-grid vertices slightly inwards). For the distance form to an ideal
    point see :func:`tchebycheff_distance`.

    Args:
        values: ``[N, K]`` scores (minimised objectives enter with a minus sign).
        weights: ``[K]`` non-negative weights, or ``[N, K]`` for per-sample preferences.

    Returns:
        ``[N]``, higher = better.
    """
    v, w, s = _scalarisation_inputs(values, weights, maximize)
    return (w * (v.to(torch.float64) * s)).amin(-1).to(_out_dtype(v))


def tchebycheff_distance(
    values: Tensor, weights: Tensor, ideal: Tensor, *, maximize: Maximize = True
) -> Tensor:
    """Negated weighted Tchebycheff distance to an ideal point: ``-max_k w_k * (ideal_k - v_k)``.

    The decomposition-based MOO form (MOEA/D): 0 at the ideal point in every weighted objective and
    negative below it, so it cannot be logged or used as ``R^beta``; :func:`tchebycheff` is the
    positive form for reward-proportional samplers. Maximising it over a front can reach every
    Pareto-optimal point by choosing the weights.

    Args:
        values: ``[N, K]`` scores.
        weights: ``[K]`` (or ``[N, K]``) non-negative weights.
        ideal: ``[K]`` ideal/utopian point (at least as good as every value), objectives' own units.

    Returns:
        ``[N]``, higher = better (at most 0 when ``ideal`` is at least as good as every value).
    """
    v, w, s = _scalarisation_inputs(values, weights, maximize)
    z = _check_vector(ideal, v.shape[1], "ideal", v)
    gap = (z - v.to(torch.float64)) * s
    return -(w * gap).amax(-1).to(_out_dtype(v))


def log_convex(
    values: Tensor,
    weights: Tensor,
    lower: Tensor | None = None,
    *,
    eps: float = 1e-8,
    maximize: Maximize = True,
) -> Tensor:
    """Log-product scalarisation ``sum_k w_k * log(v_k - lower_k + eps)``.

    It is the log of the weighted geometric mean ``prod_k (v_k - lower_k)^{w_k}`` (a Nash-product
    style objective): each objective is first shifted to be positive, then a relative gain counts
    the same in every objective, so balanced improvements win over pushing one objective further
    while another sits near its bound; a sample at ``lower`` in any objective scores about
    ``w_k * log(eps)``. Its level sets are curved, so unlike :func:`weighted_sum` it can select
    points on non-convex parts of a front.

    Args:
        values: ``[N, K]`` scores.
        weights: ``[K]`` (or ``[N, K]``) non-negative weights.
        lower: ``[K]`` worst acceptable value of each objective (for a minimised objective: its
            largest acceptable value); every value must be strictly better than ``lower - eps``.
            Default: 0 for every objective.
        eps: keeps the log finite for values at the bound.

    Returns:
        ``[N]``, higher = better.
    """
    v, w, s = _scalarisation_inputs(values, weights, maximize)
    k = v.shape[1]
    lo = torch.zeros(k, dtype=torch.float64, device=v.device) if lower is None else _check_vector(lower, k, "lower", v)
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative number; got {eps!r}")
    shifted = (v.to(torch.float64) - lo) * s + eps
    bad = shifted <= 0
    if bool(bad.any()):
        i, j = (int(t) for t in bad.nonzero()[0])
        raise ValueError(
            f"log_convex needs every value strictly better than lower - eps; sample {i}, objective {j} has "
            f"value {float(v[i, j])} vs lower {float(lo[j])}. Pass lower= a bound at or below every score "
            f"(above it for minimised objectives), e.g. values.min(0).values - margin for maximised objectives"
        )
    return (w * torch.log(shifted)).sum(-1).to(_out_dtype(v))
