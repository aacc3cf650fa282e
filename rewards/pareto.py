"""Multi-objective (Pareto) scoring: dominance, fronts, crowding, quality indicators, scalarisations.

Conventions used throughout:

- A batch of K-objective scores is a tensor ``values`` of shape ``[N, K]`` (one row per sample).
- Every objective is MAXIMISED (higher is better), matching :class:`rewards.Reward`. Pass
  ``maximize=False`` (all objectives) or a length-K sequence of bools (per objective) to flip
  objectives that are minimised; reference points, ideal points and bounds are then given in the
  objectives' own units.
- Point ``a`` dominates ``b`` when ``a >= b`` in every objective and ``a > b`` in at least one.
  Identical points therefore never dominate each other and always share a front.

Everything is torch-first and works on any device; the few sequential sweeps (2-D sorting, exact
3-D hypervolume) run on the host.

Typical use in a training loop::

    from rewards.pareto import non_dominated_mask, pareto_rewards, hypervolume

    scores = reward(images).rewards                 # [B, K]
    keep = non_dominated_mask(scores)               # [B] bool: Parrot-style "reward only the front"
    credit = pareto_rewards(scores)                 # [B] scalar credit, higher = better
    hv = hypervolume(scores, reference=torch.zeros(scores.shape[1]))   # float, log it
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Literal

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
    "weighted_sum",
]

Maximize = bool | Sequence[bool] | Tensor

# Column block of the pairwise dominance tests. 512 columns x 10,000 rows keeps every temporary
# around 5 MB (bool) / 20 MB (int32) while leaving enough work per torch call to hide its overhead.
_BLOCK = 512
# Upper bound on elements of one [samples, points] (or [rows, cols, K]) temporary in the
# Monte Carlo and distance computations (~16 MB of bools / 128 MB of float64 at most).
_MAX_ELEMS = 1 << 24
# Dominance sets are stored as bitsets of 63-bit words in int64 (the sign bit is left unused so
# that words stay non-negative and a row-wise max tells "empty" from "non-empty").
_WORD_BITS = 63
_FULL_WORD = (1 << _WORD_BITS) - 1
# Above this the bitset tables would not fit comfortably and the blocked comparison paths are used.
_BITSET_MAX_BYTES = 1 << 30
# Columns per step of the bitset non-dominated sort: small blocks keep the in-block fixed point
# (up to block-size rounds on chain-like data) cheap.
_SORT_BLOCK = 128
# Words per step of the bitset non-dominated mask (8 MB of int64): larger steps only add memory
# traffic, smaller ones add per-call overhead.
_MASK_CHUNK = 1 << 20


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
    """Flip minimised objectives so that everything downstream maximises.

    Adding 0.0 turns -0.0 into +0.0: the two compare equal but are different rows for
    ``torch.unique``, which would otherwise let one "dominate" its twin.
    """
    if isinstance(maximize, bool) and maximize:
        return v + 0.0
    s = _signs(maximize, v.shape[1], v.device).to(v.dtype)
    return v * s + 0.0


def _out_dtype(values: Tensor) -> torch.dtype:
    return values.dtype if values.is_floating_point() else torch.get_default_dtype()


# --------------------------------------------------------------------------------------------
# Dominance and non-dominated sorting
# --------------------------------------------------------------------------------------------


def _unique_desc(v: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct rows in descending lexicographic order, plus the map back to the input rows.

    Working on distinct rows sorted this way gives two facts the fast paths rely on: if row i
    dominates row j then i < j, and "i >= j in every objective" with i != j already means
    "i dominates j" (no separate strictness test).

    Returns:
        uniq: ``[U, K]``; inverse: ``[N]`` long with ``v == uniq[inverse]``.
    """
    uniq, inverse = torch.unique(v, dim=0, sorted=True, return_inverse=True)
    return uniq.flip(0), (uniq.shape[0] - 1) - inverse


def _weakly_dominates(a_cols: Tensor, b_cols: Tensor) -> Tensor:
    """``[n, m]`` bool, True where point ``a_i >= b_j`` in every objective.

    Args:
        a_cols: ``[K, n]`` (objectives as rows, so each slice is contiguous).
        b_cols: ``[K, m]``.
    """
    out = a_cols[0, :, None] >= b_cols[0, None, :]
    for k in range(1, a_cols.shape[0]):
        out &= a_cols[k, :, None] >= b_cols[k, None, :]
    return out


class _AtLeastSets:
    """Bitsets answering "which points are >= a query in every objective" for a fixed point set.

    Points must be sorted by objective 0 in descending order, so for objective 0 the answer is
    simply "the first c points". For each other objective k the answer is the set of the c_k
    largest points in that objective, a prefix of their order in k; all N such prefixes are
    stored as rows of a table of 63-bit words (``[N + 1, W]`` int64, row c = first c points), built
    with one cumulative sum: the bits of distinct points never overlap, so sum == OR. A query then
    costs K - 1 row gathers and ANDs of W = ceil(N / 63) words instead of N * K comparisons.

    Memory: (K - 1) * (N + 1) * W * 8 bytes, about N^2 (K - 1) / 8 bytes (37 MB for N = 10,000, K = 4).
    """

    def __init__(self, pts: Tensor) -> None:
        n, k = pts.shape
        self.n, self.k = n, k
        self.words = (n + _WORD_BITS - 1) // _WORD_BITS
        dev = pts.device
        idx = torch.arange(n, device=dev)
        self.word_of = idx // _WORD_BITS
        self.bit_of = torch.ones(n, dtype=torch.int64, device=dev) << (idx % _WORD_BITS)
        self.sorted_desc: list[Tensor] = []
        self.tables: list[Tensor] = []
        for obj in range(1, k):
            order = torch.argsort(pts[:, obj], descending=True, stable=True)
            table = torch.zeros(n + 1, self.words, dtype=torch.int64, device=dev)
            flat = (idx + 1) * self.words + self.word_of.index_select(0, order)
            table.view(-1).index_copy_(0, flat, self.bit_of.index_select(0, order))
            self.tables.append(table.cumsum_(0))
            # Negated so that it is ascending, as torch.searchsorted wants.
            self.sorted_desc.append(-pts[:, obj].index_select(0, order))
        self._col = torch.arange(self.words, device=dev)

    def first(self, count: Tensor) -> Tensor:
        """``[m, W]`` bitsets of the points with index < count (``count``: ``[m]`` long)."""
        full_words = count // _WORD_BITS
        partial = (torch.ones_like(count) << (count % _WORD_BITS)) - 1
        col = self._col[None, :]
        return torch.where(
            col < full_words[:, None],
            torch.full((), _FULL_WORD, dtype=torch.int64, device=count.device),
            torch.where(col == full_words[:, None], partial[:, None], torch.zeros((), dtype=torch.int64, device=count.device)),
        )

    def at_least(self, q: Tensor, count0: Tensor) -> Tensor:
        """``[m, W]`` bitsets: points among the first ``count0`` with p_k >= q_k for k = 1..K-1.

        Args:
            q: ``[m, K]`` queries (column 0 is ignored; ``count0`` encodes objective 0).
            count0: ``[m]`` long.
        """
        out = self.first(count0)
        for obj, (neg_sorted, table) in enumerate(zip(self.sorted_desc, self.tables), start=1):
            rows = torch.searchsorted(neg_sorted, -q[:, obj].contiguous(), right=True)
            out &= table.index_select(0, rows)
        return out

    def bits_to_dense(self, sets: Tensor, cols: Tensor) -> Tensor:
        """``[m, len(cols)]`` bool: membership of points ``cols`` in each of the ``m`` bitsets."""
        words = sets.index_select(1, self.word_of.index_select(0, cols))
        return ((words >> (cols % _WORD_BITS)[None, :]) & 1).bool()


def _bitsets_fit(n: int, k: int) -> bool:
    words = (n + _WORD_BITS - 1) // _WORD_BITS
    return (k - 1) * (n + 1) * words * 8 <= _BITSET_MAX_BYTES


def _mask_sorted(u: Tensor) -> Tensor:
    """Non-dominated flags for distinct rows in descending lexicographic order (``[U]`` bool)."""
    n, k = u.shape
    if k == 1:
        return torch.arange(n, device=u.device) == 0
    if k == 2:
        # Everything before j has x >= x_j, so j is dominated exactly when an earlier point
        # reaches its y: compare y_j with the running maximum of the earlier ys.
        y = u[:, 1]
        prev_max = torch.cummax(y, 0).values[:-1]
        return torch.cat([torch.ones(1, dtype=torch.bool, device=u.device), y[1:] > prev_max])
    if not _bitsets_fit(n, k):
        return _mask_sorted_dense(u)
    sets = _AtLeastSets(u)
    mask = torch.empty(n, dtype=torch.bool, device=u.device)
    step = max(1, _MASK_CHUNK // sets.words)
    for a in range(0, n, step):
        j = torch.arange(a, min(a + step, n), device=u.device)
        # Rows are distinct and sorted, so j's dominators are exactly the earlier rows that are >=
        # it in objectives 1..K-1 (objective 0 holds for every earlier row).
        mask[a : a + step] = sets.at_least(u[a : a + step], j).amax(1) == 0  # words are >= 0: amax == 0 iff empty
    return mask


def _mask_sorted_dense(u: Tensor) -> Tensor:
    """Memory-light fallback of :func:`_mask_sorted` for K >= 3: pairwise comparisons in blocks."""
    n = u.shape[0]
    cols = u.T.contiguous()
    mask = torch.empty(n, dtype=torch.bool, device=u.device)
    # Anything dominated is dominated by some non-dominated point (dominance is transitive and the
    # set is finite), so each block only needs testing against the front found so far: N*|front|
    # work instead of N^2 when fronts are small.
    front = cols[:, :0]
    for a in range(0, n, _BLOCK):
        blk = cols[:, a : a + _BLOCK]
        inner = _weakly_dominates(blk, blk)
        inner.fill_diagonal_(False)
        dominated = inner.any(0)
        if front.shape[1]:
            dominated |= _weakly_dominates(front, blk).any(0)
        mask[a : a + _BLOCK] = ~dominated
        front = torch.cat([front, blk[:, ~dominated]], dim=1)
    return mask


def _ranks_sorted_2d(u: Tensor) -> Tensor:
    """Front index of distinct 2-D rows in descending lexicographic order, O(U log U).

    Points are visited in order of decreasing x; every front seen so far is summarised by the y of
    its latest member (the largest y in that front). Front f dominates the new point iff that y is
    >= the point's y, and the set of dominating fronts is always a prefix 0..r-1 (if front f
    dominates p, so does front f-1, by transitivity), so a binary search finds r.
    """
    neg_last: list[float] = []  # -(y of the latest member of each front); non-decreasing
    ranks: list[int] = []
    for y in u[:, 1].tolist():
        r = bisect.bisect_right(neg_last, -y)
        if r == len(neg_last):
            neg_last.append(-y)
        else:
            neg_last[r] = -y
        ranks.append(r)
    return torch.tensor(ranks, dtype=torch.long, device=u.device)


def _longest_chain_in_block(inner: Tensor, start: Tensor) -> Tensor:
    """Fixed point of r_j = max(start_j, max_{i: inner[j, i]} r_i + 1) on a block's dominance DAG.

    Ranks only grow and are bounded by the longest chain, so this stops after at most
    (longest chain inside the block + 1) rounds.
    """
    if not bool(inner.any()):
        return start
    zero = torch.zeros((), dtype=start.dtype, device=start.device)
    r = start
    while True:
        new = torch.maximum(start, torch.where(inner, r[None, :] + 1, zero).amax(1))
        if torch.equal(new, r):
            return r
        r = new


def _ranks_sorted(u: Tensor) -> Tensor:
    """Front index of distinct rows in descending lexicographic order (``[U]`` long).

    The front index of a point is the length of the longest dominance chain ending at it, i.e.
    rank_j = 1 + max(rank_i : i dominates j), and it equals the number of fronts that contain a
    dominator of j (if a rank-f point dominates j, so does some rank-(f-1) point, by transitivity).
    Dominators precede j, so columns are processed in blocks: the fronts built from earlier blocks
    are kept as bitsets and a vectorised binary search counts those intersecting each point's
    dominator set; dominance inside the block is settled by a short fixed-point iteration.
    """
    n, k = u.shape
    if k == 1:
        return torch.arange(n, device=u.device)
    if k == 2:
        return _ranks_sorted_2d(u)
    if not _bitsets_fit(n, k + 1):  # + 1: the front bitsets take another table's worth
        return _ranks_sorted_dense(u)
    dev = u.device
    sets = _AtLeastSets(u)
    fronts = torch.zeros(n, sets.words, dtype=torch.int64, device=dev)
    n_fronts = 0
    ranks = torch.empty(n, dtype=torch.long, device=dev)
    block = _SORT_BLOCK
    for a in range(0, n, block):
        j = torch.arange(a, min(a + block, n), device=dev)
        dom = sets.at_least(u[a : a + block], j)  # [b, W]: strict dominators of each point of the block
        lo = torch.zeros(j.shape[0], dtype=torch.long, device=dev)
        hi = torch.full_like(lo, n_fronts)
        # Invariant: fronts < lo hold a dominator, fronts >= hi do not.
        while True:
            active = lo < hi
            if not bool(active.any()):
                break
            mid = torch.where(active, (lo + hi) // 2, 0)
            hit = (dom & fronts.index_select(0, mid)).amax(1) > 0
            lo = torch.where(active & hit, mid + 1, lo)
            hi = torch.where(active & ~hit, mid, hi)
        inner = sets.bits_to_dense(dom, j)  # [b, b]: inner[x, y] = block point y dominates x
        r = _longest_chain_in_block(inner, lo)
        ranks[a : a + j.shape[0]] = r
        # Distinct bits, so adding them is the same as OR-ing them in.
        fronts.view(-1).index_add_(0, r * sets.words + sets.word_of[a : a + block], sets.bit_of[a : a + block])
        n_fronts = max(n_fronts, int(r.max()) + 1)
    return ranks


def _ranks_sorted_dense(u: Tensor) -> Tensor:
    """Memory-light fallback of :func:`_ranks_sorted` (K >= 3): blocked pairwise comparisons.

    Same longest-chain recursion, with the dominance relation computed one ``[N, block]`` slice
    at a time by direct comparison; O(N^2 K / 2) work but only O(N * block) memory.
    """
    n = u.shape[0]
    cols = u.T.contiguous()
    ranks = torch.zeros(n, dtype=torch.long, device=u.device)
    zero = torch.zeros((), dtype=torch.long, device=u.device)
    for a in range(0, n, _BLOCK):
        b = min(a + _BLOCK, n)
        dom = _weakly_dominates(cols[:, :b], cols[:, a:b])  # [b, b - a]
        if a > 0:
            from_before = torch.where(dom[:a], ranks[:a, None] + 1, zero).amax(0)
        else:
            from_before = torch.zeros(b - a, dtype=torch.long, device=u.device)
        inner = dom[a:].T.contiguous()
        inner.fill_diagonal_(False)
        ranks[a:b] = _longest_chain_in_block(inner, from_before)
    return ranks


def non_dominated_mask(values: Tensor, *, maximize: Maximize = True) -> Tensor:
    """Flag the points that no other point dominates (the first Pareto front).

    Args:
        values: ``[N, K]`` scores, higher is better (see ``maximize``).
        maximize: True (all objectives maximised), False (all minimised), or ``K`` bools.

    Returns:
        ``[N]`` bool on ``values.device``; identical points get the same flag.

    Cost: O(N log N) for K <= 2 (sort + running maximum). For K >= 3, O(N^2 (K - 1) / 63) word
    operations on bitsets taking about N^2 (K - 1) / 8 bytes (37 MB for N = 10,000, K = 4; tens of
    milliseconds on two CPU cores); above 1 GiB of bitsets it switches to blocked pairwise
    comparisons against the front found so far (O(N * |front| * K) work, O(N * block) memory).
    """
    v = _orient(_check_values(values), maximize)
    if v.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=v.device)
    uniq, inverse = _unique_desc(v)
    return _mask_sorted(uniq).index_select(0, inverse)


def non_dominated_sort(values: Tensor, *, maximize: Maximize = True) -> Tensor:
    """Pareto rank of every point: 0 for the first front, 1 for the front left after removing it, ...

    Args:
        values: ``[N, K]`` scores, higher is better (see ``maximize``).
        maximize: True (all objectives maximised), False (all minimised), or ``K`` bools.

    Returns:
        ``[N]`` long ranks on ``values.device``; identical points share a rank.

    Cost: O(N log N) for K <= 2 (sort + binary search). For K >= 3, O(N^2 (K - 1 + log F) / 63)
    word operations (F = number of fronts) on bitsets taking about N^2 K / 8 bytes (50 MB for
    N = 10,000, K = 4; well under a second on two CPU cores, also on chain-like data with
    thousands of fronts); above 1 GiB it switches to blocked pairwise comparisons
    (O(N^2 K / 2) work, O(N * block) memory).
    """
    v = _orient(_check_values(values), maximize)
    if v.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=v.device)
    uniq, inverse = _unique_desc(v)
    return _ranks_sorted(uniq).index_select(0, inverse)


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


def _hv2d(p: Tensor) -> float:
    """Area dominated by ``p`` (``[n, 2]``, all coordinates > 0) above the origin.

    Sweeping x from high to low, the height of the dominated region at abscissa t is the largest y
    among points with x >= t: a running maximum. Only positive terms are summed, so there is no
    cancellation error.
    """
    order = torch.argsort(p[:, 0], descending=True)
    x = p[:, 0].index_select(0, order)
    y_top = torch.cummax(p[:, 1].index_select(0, order), 0).values
    widths = x - torch.cat([x[1:], x.new_zeros(1)])
    return float((widths * y_top).sum())


def _hv3d(p: Tensor) -> float:
    """Volume dominated by ``p`` (``[n, 3]``, all coordinates > 0) above the origin.

    Sweep z from high to low: between consecutive z values the cross-section is the 2-D area
    dominated by the points seen so far. That area is maintained incrementally on a staircase
    (x ascending, y strictly descending): inserting a point adds exactly the region above the
    current staircase, found by walking left over the steps the point covers, which are then
    removed. Each point is inserted and removed at most once: O(n log n) comparisons.
    """
    order = torch.argsort(p[:, 2], descending=True)
    xs, ys, zs = p.index_select(0, order).T.tolist()
    zs.append(0.0)
    stair_x: list[float] = []
    stair_y: list[float] = []
    area = 0.0
    vol = 0.0
    for i in range(len(xs)):
        px, py = xs[i], ys[i]
        j = bisect.bisect_left(stair_x, px)
        # stair_y[j] is the highest step at x >= px; if it reaches py the point adds nothing.
        if j == len(stair_x) or stair_y[j] < py:
            h = stair_y[j] if j < len(stair_x) else 0.0
            right = j + 1 if j < len(stair_x) and stair_x[j] == px else j  # a step at x == px is covered
            prev_x = px
            left = j - 1
            while left >= 0 and stair_y[left] <= py:
                area += (prev_x - stair_x[left]) * (py - h)
                h = stair_y[left]
                prev_x = stair_x[left]
                left -= 1
            area += (prev_x - (stair_x[left] if left >= 0 else 0.0)) * (py - h)
            stair_x[left + 1 : right] = [px]
            stair_y[left + 1 : right] = [py]
        vol += (zs[i] - zs[i + 1]) * area
    return vol


def _hv_exact(p: Tensor) -> float:
    """Exact hypervolume above the origin of ``p`` (``[n, K]``, coordinates > 0).

    K <= 3 use the sweeps above; K >= 4 slice along the last objective and recurse, which costs
    O(n^(K-2) log n): fine up to about a thousand points at K = 4, slow beyond.
    """
    n, k = p.shape
    if n == 0:
        return 0.0
    if k == 1:
        return float(p[:, 0].max())
    if k == 2:
        return _hv2d(p)
    if k == 3:
        return _hv3d(p)
    p = p[non_dominated_mask(p)]
    order = torch.argsort(p[:, -1], descending=True)
    p = p[order]
    z = p[:, -1].tolist() + [0.0]
    proj = p[:, :-1]
    vol = 0.0
    section = 0.0
    for i in range(p.shape[0]):
        # A new point whose projection is covered by an earlier one leaves the section unchanged.
        if i == 0 or not bool((proj[:i] >= proj[i]).all(1).any()):
            section = _hv_exact(proj[: i + 1])
        vol += (z[i] - z[i + 1]) * section
    return vol


def _hv_monte_carlo(p: Tensor, samples: int, generator: torch.Generator | None) -> float:
    """Unbiased Monte Carlo hypervolume of ``p`` (``[n, K]``, coordinates > 0) above the origin.

    Samples are uniform in the box [0, max p] that contains the whole dominated region, so
    E[box * hits / samples] is the hypervolume exactly. Whether a sample is covered is one
    "is any point >= it in every objective" query on the bitset tables.
    """
    p = p[non_dominated_mask(p)]
    n, k = p.shape
    upper = p.max(0).values
    box = float(upper.prod())
    gen_device = generator.device if generator is not None else torch.device("cpu")
    p = p[torch.argsort(p[:, 0], descending=True)]
    sets = _AtLeastSets(p) if _bitsets_fit(n, k) else None
    neg_x = -p[:, 0].contiguous()
    cols = p.T.contiguous()
    hits = 0
    chunk = max(1, min(samples, _MAX_ELEMS // (8 * (sets.words if sets is not None else n))))
    for done in range(0, samples, chunk):
        m = min(chunk, samples - done)
        s = torch.rand(m, k, generator=generator, dtype=torch.float64, device=gen_device).to(p.device) * upper
        if sets is not None:
            count0 = torch.searchsorted(neg_x, -s[:, 0].contiguous(), right=True)
            covered = sets.at_least(s, count0).amax(1) > 0
        else:
            covered = torch.zeros(m, dtype=torch.bool, device=p.device)
            step = max(1, _MAX_ELEMS // m)
            for a in range(0, n, step):
                covered |= _weakly_dominates(cols[:, a : a + step], s.T).any(0)
        hits += int(covered.sum())
    return box * hits / samples


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
        method: ``"exact"`` (K = 2: sort + running max; K = 3: z-sweep over an incremental 2-D
            staircase, O(N log N), N = 10,000 in well under a second; K >= 4: recursive slicing,
            O(N^(K-2) log N), fine up to about a thousand points at K = 4), ``"monte_carlo"``, or
            ``"auto"`` (exact for K <= 3, Monte Carlo for K >= 4).
        samples: Monte Carlo sample count; the standard error is
            ``box * sqrt(q (1 - q) / samples)`` with q the covered fraction of the bounding box.
        generator: seeds the Monte Carlo samples (reproducible when given). The estimate is
            unbiased either way.
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
    s = _signs(maximize, k, v.device)
    # Shift so the reference is the origin: all later arithmetic is on positive numbers.
    p = v.to(torch.float64) * s - ref * s
    p = p[(p > 0).all(1)]
    if p.shape[0] == 0:
        return 0.0
    if bool(torch.isinf(p).any()):
        raise ValueError(
            "values has +inf (in the improving direction) for points that beat the reference, so the "
            "hypervolume is infinite; clip the scores to a finite range first"
        )
    if method == "auto":
        method = "exact" if k <= 3 else "monte_carlo"
    if method == "exact" or k == 1:
        return _hv_exact(p)
    return _hv_monte_carlo(p, samples, generator)


# --------------------------------------------------------------------------------------------
# Distance-based indicators
# --------------------------------------------------------------------------------------------


def r2_indicator(values: Tensor, weights: Tensor, ideal: Tensor, *, maximize: Maximize = True) -> float:
    """R2 indicator: mean over weight vectors of the best weighted Tchebycheff distance to ``ideal``.

    ``R2 = mean_w min_i max_k w_k * (ideal_k - v_ik)`` (in the maximisation orientation). Lower is
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


def _nearest(ref: Tensor, pts: Tensor, plus: bool) -> Tensor:
    """For each row of ``ref`` (``[M, K]``), the distance to the nearest row of ``pts`` (``[N, K]``)."""
    m, k = ref.shape
    n = pts.shape[0]
    rows = max(1, _MAX_ELEMS // max(1, n * k))
    out = []
    for a in range(0, m, rows):
        r = ref[a : a + rows]
        if plus:
            # IGD+ only counts how far a point falls short of the reference point.
            d = (r[:, None, :] - pts[None]).clamp(min=0).square().sum(-1).sqrt()
        else:
            d = torch.cdist(r, pts, compute_mode="donot_use_mm_for_euclid_dist")
        out.append(d.amin(1))
    return torch.cat(out)


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
    p = v.to(torch.float64) * s
    r = ref.to(device=v.device, dtype=torch.float64) * s
    return float(_nearest(r, p, plus).mean())


def igd(values: Tensor, reference_front: Tensor, *, maximize: Maximize = True) -> float:
    """Inverted generational distance: mean over reference-front points of the Euclidean distance
    to the nearest point of ``values``. Lower is better (0 when every reference point is matched).

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


def tchebycheff(
    values: Tensor, weights: Tensor, ideal: Tensor, *, maximize: Maximize = True
) -> Tensor:
    """Weighted Tchebycheff scalarisation in maximisation form: ``-max_k w_k * (ideal_k - v_k)``.

    Maximising it over a front can reach every Pareto-optimal point (including concave parts) by
    choosing the weights; 0 means "at the ideal point in every weighted objective".

    Args:
        values: ``[N, K]`` scores.
        weights: ``[K]`` (or ``[N, K]``) non-negative weights.
        ideal: ``[K]`` ideal/utopian point (at least as good as every value), objectives' own units.

    Returns:
        ``[N]``, higher = better.
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
