"""Distributional metrics and rewards on embeddings (DRAGON-style rewards).

Two layers:

* Pure metric functions on embedding tensors (no models, no downloads):
  :func:`gaussian_stats`, :func:`frechet_distance`,
  :func:`frechet_distance_from_embeddings`, :func:`fd_infinity`,
  :func:`per_sample_frechet_distance`, :func:`kid` and :func:`vendi_score`.
  They compute in float64 where cancellation or eigen-decompositions make
  float32 unreliable, and return the (at least float32) dtype of their first
  input. Fréchet distance and Vendi are differentiable.
* Rewards built from *any* embedder callable (e.g. a CLIP image tower, a CLAP
  audio tower, a fixed linear map in tests) plus reference/exemplar
  embeddings: ``fd_to_reference``, ``batch_fd``, ``vendi``,
  ``exemplar_similarity`` and ``exemplar_fd``. Nothing is downloaded here;
  the caller owns the embedder.

Embedders map a batch of outputs to ``[B, D]`` (one embedding per sample) or
``[B, F, D]`` (F frame/patch embeddings per sample). Wrap one embedder in an
:class:`EmbeddingCache` and pass the same cache to several rewards so that a
set-level score and per-sample credits on the same batch embed it only once.
"""

from __future__ import annotations

import hashlib
import math
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch

from .base import MODALITIES, Reward, RewardError, RewardOutput, register_reward
from .embedders import build_embedder, exemplar_embeddings

__all__ = [
    "BatchFD",
    "EmbeddingCache",
    "ExemplarFD",
    "ExemplarSimilarity",
    "FDToReference",
    "GaussianStats",
    "Vendi",
    "fd_infinity",
    "frechet_distance",
    "frechet_distance_from_embeddings",
    "gaussian_stats",
    "kid",
    "per_sample_frechet_distance",
    "vendi_score",
]

_F64 = torch.float64


# ------------------------------------------------------------------ helpers


class GaussianStats(NamedTuple):
    """Mean ``[D]`` and covariance ``[D, D]`` of a set of embeddings."""

    mean: torch.Tensor
    cov: torch.Tensor


def _out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Result dtype: the inputs' promoted float dtype, never below float32."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_embeddings(x: Any, what: str, ndim: int = 2) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != ndim or not x.is_floating_point():
        shape = "[N, D]" if ndim == 2 else "[B, F, D]"
        got = f"shape {tuple(x.shape)} ({x.dtype})" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a float tensor {shape}; got {got}")
    return x


def _as_stats(stats: Any, what: str = "reference_stats") -> GaussianStats:
    """Accept ``GaussianStats`` or any ``(mean [D], cov [D, D])`` pair."""
    try:
        mean, cov = stats
    except (TypeError, ValueError):
        raise ValueError(
            f"{what} must be a (mean [D], cov [D, D]) pair, e.g. gaussian_stats(reference_embeddings); "
            f"got {type(stats).__name__}"
        ) from None
    mean, cov = torch.as_tensor(mean), torch.as_tensor(cov)
    if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
        raise ValueError(
            f"{what} must be (mean [D], cov [D, D]); got mean {tuple(mean.shape)} and cov {tuple(cov.shape)}"
        )
    return GaussianStats(mean, cov)


def _sym(m: torch.Tensor) -> torch.Tensor:
    # eigvalsh reads one triangle only; averaging removes the roundoff
    # asymmetry of products like S C S so both triangles agree.
    return 0.5 * (m + m.transpose(-1, -2))


def _roundoff_mask(lam: torch.Tensor) -> torch.Tensor:
    """True for eigenvalues clearly above the roundoff level of their matrix.

    Eigenvalues of an n x n symmetric matrix carry absolute errors of about
    n * eps * max|lambda|; anything below that is noise (e.g. the structural
    zero eigenvalue of a centred set), and its sqrt/log would add noise to the
    value and an unbounded 1/(2 sqrt lambda) to the gradient.
    """
    n = lam.shape[-1]
    tol = lam.detach().abs().amax(dim=-1, keepdim=True) * (n * torch.finfo(lam.dtype).eps)
    return lam > tol


def _sqrt_eigs(lam: torch.Tensor) -> torch.Tensor:
    """sqrt of PSD eigenvalues, 0 (with 0 gradient) at roundoff-level ones."""
    mask = _roundoff_mask(lam)
    # Double where: the masked branch must not see sqrt of a negative/zero
    # number, or its NaN/inf gradient leaks through the outer where.
    return torch.where(mask, torch.where(mask, lam, torch.ones_like(lam)).sqrt(), torch.zeros_like(lam))


def _psd_sqrt(c: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix ``[..., D, D]`` via eigh."""
    lam, v = torch.linalg.eigh(_sym(c))
    return (v * lam.clamp_min(0).sqrt().unsqueeze(-2)) @ v.transpose(-1, -2)


def _psd_factor(c: torch.Tensor) -> torch.Tensor:
    """A factor ``F`` with ``F Fᵀ = C`` for a PSD matrix ``[..., D, D]``.

    Cholesky when C is numerically positive definite (several times cheaper
    than an eigendecomposition with eigenvectors), else the symmetric square
    root from eigh, which also handles singular C (e.g. fewer points than
    dimensions). Meant for a side that needs no gradient (the reference):
    the eigh backward has 1/(lambda_i - lambda_j) terms that blow up for the
    repeated eigenvalues rank-deficient covariances always have.
    """
    factor, info = torch.linalg.cholesky_ex(_sym(c))
    if not bool((info != 0).any()):
        return factor
    return _psd_sqrt(c)


def _trace_sqrt_product(
    cov1: torch.Tensor, cov2: torch.Tensor, factor2: torch.Tensor | None = None
) -> torch.Tensor:
    """``tr((C1 C2)^{1/2})`` for ``[..., D, D]`` PSD matrices.

    With C2 = F Fᵀ (``factor2``; Cholesky or the symmetric square root),
    C1 C2 is similar to Fᵀ C1 F, a symmetric PSD matrix (with F = C1^{1/2}
    this is the textbook C1^{1/2} C2 C1^{1/2}), so the trace of the square
    root is the sum of the square roots of its eigenvalues. The factor is
    taken of the side that does not need a gradient, so gradients only flow
    through ``eigvalsh`` (whose backward is well defined even for repeated
    eigenvalues).
    """
    if factor2 is None:
        if cov2.requires_grad and not cov1.requires_grad:
            cov1, cov2 = cov2, cov1  # the trace is symmetric in the two sets
        factor2 = _psd_factor(cov2)
    m = factor2.transpose(-1, -2) @ cov1 @ factor2
    return _sqrt_eigs(torch.linalg.eigvalsh(_sym(m))).sum(dim=-1)


def _fd_to_stats(
    x: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor, factor2: torch.Tensor | None = None
) -> torch.Tensor:
    """Fréchet distance of the Gaussian of ``x [..., N, D]`` to ``(mean2, cov2)``; float64 ``[...]``.

    With C1 = A Aᵀ, A = X_cᵀ / sqrt(N - 1) (X_c the centred set), the
    non-zero eigenvalues of C1 C2 equal those of Aᵀ C2 A (N x N), so for
    N <= D the trace term needs neither C1 nor any matrix square root. That is
    the common reward case (batch or frame count below the embedding size).
    """
    n, d = x.shape[-2], x.shape[-1]
    x = x.to(_F64)
    mean2 = mean2.to(device=x.device, dtype=_F64)
    cov2 = cov2.to(device=x.device, dtype=_F64)
    mean1 = x.mean(dim=-2)
    xc = x - mean1.unsqueeze(-2)
    mean_term = (mean1 - mean2).pow(2).sum(dim=-1)
    trace1 = xc.pow(2).sum(dim=(-2, -1)) / (n - 1)
    trace2 = torch.diagonal(cov2).sum()
    if n <= d:
        gram = xc @ cov2 @ xc.transpose(-1, -2) / (n - 1)
        trace_sqrt = _sqrt_eigs(torch.linalg.eigvalsh(_sym(gram))).sum(dim=-1)
    else:
        cov1 = xc.transpose(-1, -2) @ xc / (n - 1)
        if factor2 is not None:
            factor2 = factor2.to(device=x.device, dtype=_F64)
        trace_sqrt = _trace_sqrt_product(cov1, cov2, factor2)
    return mean_term + trace1 + trace2 - 2.0 * trace_sqrt


# ------------------------------------------------------------------ metrics


def gaussian_stats(emb: torch.Tensor) -> GaussianStats:
    """Mean and unbiased covariance of a set of embeddings.

    Args:
        emb: ``[N, D]`` with N >= 2.

    Returns:
        :class:`GaussianStats` ``(mean [D], cov [D, D])``, float64 (the
        covariance of high-dimensional features loses digits in float32), on
        ``emb.device``. Differentiable.
    """
    emb = _check_embeddings(emb, "gaussian_stats: emb")
    if emb.shape[0] < 2:
        raise ValueError(f"gaussian_stats needs at least 2 embeddings for a covariance; got N={emb.shape[0]}")
    x = emb.to(_F64)
    mean = x.mean(dim=0)
    xc = x - mean
    return GaussianStats(mean, xc.T @ xc / (x.shape[0] - 1))


def frechet_distance(
    mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor
) -> torch.Tensor:
    """Fréchet distance between two Gaussians.

    ``‖μ1 − μ2‖² + tr(C1 + C2 − 2 (C1^{1/2} C2 C1^{1/2})^{1/2})``, with the
    trace of the square root computed as the sum of the square roots of the
    (clamped) eigenvalues of the symmetric PSD product Fᵀ C1 F, F Fᵀ = C2
    (Cholesky, or eigh's square root when C2 is singular), which has the
    same eigenvalues: no ``sqrtm`` of a non-symmetric matrix, no complex
    parts. Differentiable w.r.t. either side; the factor is taken of a side
    without gradient when there is one, which keeps the gradient stable for
    rank-deficient covariances.

    Args:
        mu1, mu2: ``[D]`` means.
        cov1, cov2: ``[D, D]`` PSD covariances.

    Returns:
        Scalar tensor in the inputs' float dtype (at least float32).
    """
    mu1, cov1, mu2, cov2 = (torch.as_tensor(t) for t in (mu1, cov1, mu2, cov2))
    d = mu1.shape[-1]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"frechet_distance expects mu [D] and cov [D, D] for both sets; got mu1 {tuple(mu1.shape)}, "
            f"cov1 {tuple(cov1.shape)}, mu2 {tuple(mu2.shape)}, cov2 {tuple(cov2.shape)}"
        )
    dtype = _out_dtype(mu1, cov1)
    dev = mu1.device
    mu1, cov1, mu2, cov2 = (t.to(device=dev, dtype=_F64) for t in (mu1, cov1, mu2, cov2))
    mean_term = (mu1 - mu2).pow(2).sum()
    fd = mean_term + torch.trace(cov1) + torch.trace(cov2) - 2.0 * _trace_sqrt_product(cov1, cov2)
    return fd.to(dtype)


def frechet_distance_from_embeddings(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fréchet distance between the Gaussians of two embedding sets.

    Args:
        a: ``[N, D]`` (N >= 2), e.g. generated samples; differentiable.
        b: ``[M, D]`` (M >= 2), e.g. the reference set.

    Returns:
        Scalar tensor in ``a``'s float dtype (at least float32).
    """
    a = _check_embeddings(a, "frechet_distance_from_embeddings: a")
    b = _check_embeddings(b, "frechet_distance_from_embeddings: b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: a has D={a.shape[1]}, b has D={b.shape[1]}")
    if a.shape[0] < 2:
        raise ValueError(f"Fréchet distance needs at least 2 embeddings in a; got N={a.shape[0]}")
    mean2, cov2 = gaussian_stats(b.to(a.device))
    return _fd_to_stats(a, mean2, cov2).to(_out_dtype(a))


def fd_infinity(
    emb: torch.Tensor,
    reference_stats: Any,
    *,
    sizes: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """FD∞: Fréchet distance extrapolated to infinitely many samples (Chong & Forsyth 2020).

    The finite-sample FD is biased upward by about c/n. We compute the FD of
    one random subset (without replacement) of ``emb`` per size n, fit
    ``FD(n) = FD∞ + c / n`` by least squares and return the intercept.

    Args:
        emb: ``[N, D]`` generated embeddings.
        reference_stats: ``(mean [D], cov [D, D])`` of the reference set.
        sizes: subset sizes (each in [2, N], at least two distinct values);
            default 10 sizes evenly spaced from N/5 to N (the paper uses 15
            sizes from N/10 to N with N = 50k).
        generator: torch RNG for the subsets (default: the global RNG).

    Returns:
        Scalar tensor, ``emb``'s float dtype (at least float32); differentiable.
    """
    emb = _check_embeddings(emb, "fd_infinity: emb")
    mean2, cov2 = _as_stats(reference_stats)
    n_total, d = emb.shape
    if mean2.shape[0] != d:
        raise ValueError(f"embedding size D={d} does not match the reference stats' D={mean2.shape[0]}")
    if sizes is None:
        lo = max(2, n_total // 5)
        sizes = sorted({round(s) for s in torch.linspace(lo, n_total, 10).tolist()})
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) < 2 or min(sizes) < 2 or max(sizes) > n_total:
        raise ValueError(
            f"fd_infinity needs at least two distinct subset sizes in [2, N={n_total}]; got {sizes}"
        )
    mean2 = mean2.to(device=emb.device, dtype=_F64)
    cov2 = cov2.to(device=emb.device, dtype=_F64)
    # One reference factor serves every subset size.
    factor2 = _psd_factor(cov2) if max(sizes) > d else None
    fds = []
    for n in sizes:
        idx = torch.randperm(n_total, generator=generator, device=generator.device if generator else "cpu")[:n]
        fds.append(_fd_to_stats(emb[idx.to(emb.device)], mean2, cov2, factor2))
    y = torch.stack(fds)
    x = 1.0 / torch.tensor(sizes, dtype=_F64, device=emb.device)
    # Closed-form simple linear regression (differentiable, no lstsq backward).
    xm, ym = x.mean(), y.mean()
    slope = ((x - xm) * (y - ym)).sum() / (x - xm).pow(2).sum()
    return (ym - slope * xm).to(_out_dtype(emb))


def per_sample_frechet_distance(frames: torch.Tensor, reference_stats: Any) -> torch.Tensor:
    """Per-sample Fréchet distance ("per-song FAD"): each sample's frame Gaussian vs the reference.

    Args:
        frames: ``[B, F, D]``: F >= 2 frame/patch embeddings per sample.
        reference_stats: ``(mean [D], cov [D, D])`` of the reference frames.

    Returns:
        ``[B]`` in ``frames``' float dtype (at least float32); differentiable.
    """
    frames = _check_embeddings(frames, "per_sample_frechet_distance: frames", ndim=3)
    _, f, d = frames.shape
    if f < 2:
        raise ValueError(
            f"per-sample Fréchet distance needs ≥ 2 frames per sample (got F={f}): pass frame- or "
            f"patch-level embeddings [B, F, D] (e.g. one embedding per audio window or image patch), "
            f"not one pooled embedding per sample"
        )
    mean2, cov2 = _as_stats(reference_stats)
    if mean2.shape[0] != d:
        raise ValueError(f"frame embedding size D={d} does not match the reference stats' D={mean2.shape[0]}")
    factor2 = _psd_factor(cov2.to(device=frames.device, dtype=_F64)) if f > d else None
    return _fd_to_stats(frames, mean2, cov2, factor2).to(_out_dtype(frames))


def kid(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel Inception Distance: unbiased MMD² with a polynomial kernel, over random subsets.

    Each subset's MMD² is torchmetrics' own estimator (``torchmetrics.image.kid.poly_mmd``, kernel
    ``(γ xᵀy + coef)^degree`` with γ = 1/D by default). The subsets are drawn here rather than by
    ``KernelInceptionDistance.compute``, which samples them from the global RNG: ``generator``
    makes them reproducible without touching the training random stream. Per subset ``a``'s
    indices are drawn before ``b``'s, so with ``generator=None`` and the same global seed the
    subsets match torchmetrics' with ``a`` = real features.

    Args:
        a: ``[N, D]``; b: ``[M, D]``; both need at least ``subset_size`` rows.

    Returns:
        ``(mean, std)`` over subsets (population std, as torchmetrics), in the
        inputs' float dtype (at least float32).
    """
    # Imported on use: torchmetrics' image package takes seconds to import and only KID needs it.
    from torchmetrics.image.kid import poly_mmd

    a = _check_embeddings(a, "kid: a")
    b = _check_embeddings(b, "kid: b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: a has D={a.shape[1]}, b has D={b.shape[1]}")
    if min(a.shape[0], b.shape[0]) < subset_size:
        raise ValueError(
            f"kid: subset_size={subset_size} is larger than the sets (N={a.shape[0]}, M={b.shape[0]}); "
            f"lower subset_size or pass more samples"
        )
    if subset_size < 2 or subsets < 1:
        raise ValueError(f"kid needs subset_size >= 2 and subsets >= 1; got {subset_size}, {subsets}")
    gamma = 1.0 / a.shape[1] if gamma is None else float(gamma)
    dtype = _out_dtype(a, b)
    # A cubic kernel of 2048-dim features spans many orders of magnitude.
    a64, b64 = a.to(_F64), b.to(device=a.device, dtype=_F64)
    m = subset_size
    rng_device = generator.device if generator is not None else "cpu"
    scores = []
    for _ in range(subsets):
        fa = a64[torch.randperm(a.shape[0], generator=generator, device=rng_device)[:m].to(a.device)]
        fb = b64[torch.randperm(b.shape[0], generator=generator, device=rng_device)[:m].to(a.device)]
        scores.append(poly_mmd(fa, fb, degree, gamma, coef))
    s = torch.stack(scores)
    return s.mean().to(dtype), s.std(correction=0).to(dtype)


def _vendi_from_eigenvalues(lam: torch.Tensor, q: float) -> torch.Tensor:
    """exp(Rényi_q entropy) of eigenvalues ``[..., n]`` normalised to sum to 1."""
    lam = lam.clamp_min(0)
    p = lam / lam.sum(dim=-1, keepdim=True)
    mask = _roundoff_mask(p)
    safe = torch.where(mask, p, torch.ones_like(p))
    if q == 0:
        return mask.sum(dim=-1).to(p.dtype)  # rank: a count, no gradient
    if math.isinf(q):
        return 1.0 / p.amax(dim=-1)
    if q == 1:
        # Masking (not xlogy) keeps d(p log p)/dp = log p + 1 finite at p = 0.
        entropy = -torch.where(mask, safe * safe.log(), torch.zeros_like(p)).sum(dim=-1)
        return entropy.exp()
    power_sum = torch.where(mask, safe**q, torch.zeros_like(p)).sum(dim=-1)
    return power_sum ** (1.0 / (1.0 - q))


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny ** 0.5)


def vendi_score(
    emb: torch.Tensor | None = None,
    *,
    kernel: torch.Tensor | None = None,
    q: float = 1.0,
    normalize: bool = True,
    method: Literal["auto", "primal", "dual"] = "auto",
) -> torch.Tensor:
    """Vendi score (Friedman & Dieng 2023) and its order-q variants (Pasarkar & Dieng 2023).

    ``VS_q = exp(H_q(λ))``, λ the eigenvalues of K/N, H_q the Rényi entropy:
    q = 1 Shannon, q = inf gives 1 / max λ, q = 0 the number of non-zero
    eigenvalues, otherwise ``(Σ λ^q)^{1/(1-q)}``. The eigenvalues are divided
    by their sum first, a no-op when K_ii = 1 (``normalize=True`` or any
    correlation kernel) that makes unnormalised kernels scale-invariant.

    With embeddings the kernel is linear, K = X Xᵀ (cosine when
    ``normalize``); its non-zero eigenvalues equal those of the D x D dual
    XᵀX / N, which ``method="auto"`` uses when N > D (O(N D² + D³) instead of
    O(N³)). An arbitrary PSD ``kernel`` always uses the primal form.

    Args:
        emb: ``[N, D]`` embeddings, or None when ``kernel`` is given.
        kernel: ``[N, N]`` symmetric PSD similarity matrix.
        q: order, >= 0 (``float("inf")`` allowed).
        normalize: L2-normalise rows of ``emb`` (cosine kernel).
        method: "auto", "primal" (N x N) or "dual" (D x D, embeddings only).

    Returns:
        Scalar tensor in [1, N], input float dtype (at least float32);
        differentiable except for q = 0.
    """
    if (emb is None) == (kernel is None):
        raise ValueError("vendi_score needs exactly one of emb [N, D] or kernel [N, N]")
    q = float(q)
    if not q >= 0:
        raise ValueError(f"vendi_score order q must be >= 0 (or inf); got {q}")
    if method not in ("auto", "primal", "dual"):
        raise ValueError(f"vendi_score method must be 'auto', 'primal' or 'dual'; got {method!r}")
    if kernel is not None:
        if not isinstance(kernel, torch.Tensor) or kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
            raise ValueError(f"vendi_score kernel must be a square [N, N] tensor; got {getattr(kernel, 'shape', kernel)}")
        if method == "dual":
            raise ValueError("vendi_score method='dual' needs embeddings; a kernel matrix only has the primal form")
        lam = torch.linalg.eigvalsh(_sym(kernel.to(_F64))) / kernel.shape[0]
        return _vendi_from_eigenvalues(lam, q).to(_out_dtype(kernel))
    emb = _check_embeddings(emb, "vendi_score: emb")
    n, d = emb.shape
    x = emb.to(_F64)
    if normalize:
        x = _normalize_rows(x)
    dual = method == "dual" or (method == "auto" and n > d)
    gram = x.T @ x if dual else x @ x.T
    lam = torch.linalg.eigvalsh(_sym(gram)) / n
    return _vendi_from_eigenvalues(lam, q).to(_out_dtype(emb))


def _vendi_leave_one_out(emb: torch.Tensor, q: float, normalize: bool) -> torch.Tensor:
    """``[B]``: Vendi score of the set without sample i, for every i (float64).

    Batched: the dual drops x_i x_iᵀ from XᵀX; the primal drops row/column i
    of K. The empty set (B = 1) scores 0.
    """
    b, d = emb.shape
    if b == 1:
        return torch.zeros(1, dtype=_F64, device=emb.device)
    x = emb.to(_F64)
    if normalize:
        x = _normalize_rows(x)
    if b - 1 > d:
        grams = (x.T @ x).unsqueeze(0) - x.unsqueeze(2) * x.unsqueeze(1)  # [B, D, D]
    else:
        keep = ~torch.eye(b, dtype=torch.bool, device=emb.device)
        idx = torch.arange(b, device=emb.device).expand(b, b)[keep].view(b, b - 1)
        k = x @ x.T
        grams = k[idx.unsqueeze(2), idx.unsqueeze(1)]  # [B, B-1, B-1]
    return _vendi_from_eigenvalues(torch.linalg.eigvalsh(_sym(grams)) / (b - 1), q)


# ------------------------------------------------------------ embeddings


def _row_key(row: Any) -> Any:
    """A content key of one sample (a tensor row or a string); None when the sample cannot be keyed."""
    if isinstance(row, torch.Tensor):
        data = row.detach().cpu().contiguous()
        digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).digest()
        return (tuple(data.shape), str(data.dtype), digest)
    if isinstance(row, str):
        return ("str", row)
    return None


def _identity(outputs: Any) -> tuple:
    if isinstance(outputs, torch.Tensor):
        return (id(outputs), tuple(outputs.shape), outputs.dtype, outputs.device, outputs._version)
    return (id(outputs), len(outputs) if hasattr(outputs, "__len__") else None)


class EmbeddingCache(torch.nn.Module):
    """Embeds each sample once and shares the result between rewards, batches and calls.

    Wraps an embedder callable (``outputs -> [B, D]`` or ``[B, F, D]``). Without gradients, embeddings are
    kept per sample, keyed by the sample's content (a hash of its bytes, shape and dtype; strings by value),
    for the last ``capacity`` samples: a batch, any subset of it, and a batch gathered from several processes
    that holds it are all served from the cache, and only samples never seen are embedded (in one call).
    Pass one cache to several rewards (e.g. ``batch_fd`` for the set score and ``vendi`` for per-sample
    credits) and the embedder runs once per batch.

    When gradients are needed (grad enabled and ``outputs.requires_grad``) the batch is embedded with
    autograd, and that graph is reused only for the very same tensor object (same in-place version).

    Attributes:
        embedder: the wrapped callable (registered as a submodule when it is an ``nn.Module``, so
            ``.to(device)`` moves it).
        calls: how many times the embedder has run.
        hits, misses: samples served from the cache / embedded.
    """

    def __init__(self, embedder: Callable[[Any], torch.Tensor], capacity: int = 65_536) -> None:
        super().__init__()
        if isinstance(embedder, EmbeddingCache):
            embedder = embedder.embedder
        if not callable(embedder):
            raise RewardError(
                f"embedder must be a callable mapping outputs to embeddings [B, D] or [B, F, D] "
                f"(e.g. a CLIP image tower); got {type(embedder).__name__}"
            )
        self.embedder = embedder
        self.capacity = int(capacity)
        self.calls = self.hits = self.misses = 0
        self.clear()

    def clear(self) -> None:
        """Forget every cached embedding."""
        self._rows: OrderedDict[Any, torch.Tensor] = OrderedDict()
        self._graph: tuple[Callable[[], Any], tuple, torch.Tensor] | None = None

    def _run(self, outputs: Any) -> torch.Tensor:
        emb = self.embedder(outputs)
        self.calls += 1
        if not isinstance(emb, torch.Tensor):
            raise RewardError(
                f"embedder returned {type(emb).__name__}; it must return a tensor [B, D] or [B, F, D] "
                f"(for HF models, take e.g. .image_embeds or .pooler_output)"
            )
        return emb

    def _store(self, key: Any, emb: torch.Tensor) -> None:
        self._rows[key] = emb.detach()
        self._rows.move_to_end(key)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    def embed(self, outputs: Any) -> torch.Tensor:
        """Embeddings of ``outputs`` (``[B, D]`` or ``[B, F, D]``), each sample computed once."""
        if torch.is_grad_enabled() and isinstance(outputs, torch.Tensor) and outputs.requires_grad:
            return self._embed_with_graph(outputs)
        samples = list(outputs) if not isinstance(outputs, torch.Tensor) else outputs.unbind(0)
        keys = [_row_key(s) for s in samples]
        if any(k is None for k in keys):  # unkeyable samples: embed the batch as it is
            self.misses += len(keys)
            return self._run(outputs).detach()
        missing = [i for i, k in enumerate(keys) if k not in self._rows]
        fresh: dict[Any, torch.Tensor] = {}
        if missing:
            index = torch.tensor(missing, device=outputs.device) if isinstance(outputs, torch.Tensor) else None
            subset = outputs[index] if index is not None else [outputs[i] for i in missing]
            with torch.no_grad():
                emb = self._run(subset)
            if emb.ndim < 2 or emb.shape[0] != len(missing):
                return emb  # the reward's shape check names the problem
            for i, row in zip(missing, emb):
                fresh[keys[i]] = row
                self._store(keys[i], row)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([fresh[k] if k in fresh else self._rows[k] for k in keys])

    def _embed_with_graph(self, outputs: torch.Tensor) -> torch.Tensor:
        if self._graph is not None:
            ref, identity, emb = self._graph
            if ref() is outputs and identity == _identity(outputs):
                self.hits += outputs.shape[0]
                return emb
        emb = self._run(outputs)
        self.misses += outputs.shape[0]
        self._graph = (weakref.ref(outputs), _identity(outputs), emb)
        return emb

    def forward(self, outputs: Any) -> torch.Tensor:
        return self.embed(outputs)


# ---------------------------------------------------------------- rewards


def _batch_size(outputs: Any) -> int:
    return int(outputs.shape[0]) if isinstance(outputs, torch.Tensor) else len(outputs)


def _device_of(outputs: Any, emb: torch.Tensor) -> torch.device:
    return outputs.device if isinstance(outputs, torch.Tensor) else emb.device


class _EmbeddingReward(Reward):
    """Shared plumbing: the embedder (wrapped in an :class:`EmbeddingCache`), modality, differentiability, and
    the public scoring of precomputed embeddings.

    ``reward(outputs)`` is ``reward.score_embeddings(reward.embed(outputs))``. Algorithms that score many
    subsets of one set of outputs (DRAGON's set construction) embed once with :meth:`embed` and then call
    :meth:`score_embeddings`, :meth:`set_score`, :meth:`per_sample_credit` or :meth:`compare_sets` on slices
    of the embeddings, so the embedder never runs again.
    """

    modality = "image"
    differentiable = True

    def __init__(
        self, embedder: Any, *, modality: str | None = None, differentiable: bool = True
    ) -> None:
        super().__init__()
        if not isinstance(embedder, EmbeddingCache):
            embedder = build_embedder(embedder)
        modality = modality or getattr(getattr(embedder, "embedder", embedder), "modality", None) or "image"
        if modality not in MODALITIES:
            raise RewardError(
                f"reward '{self.name}' got modality={modality!r}; use one of {list(MODALITIES)}"
            )
        self.modality = modality
        # Whether gradients flow through the embedder; False -> scoring under no_grad.
        self.differentiable = bool(differentiable)
        self.embeddings = embedder if isinstance(embedder, EmbeddingCache) else EmbeddingCache(embedder)

    def _load_set(self, source: Any) -> torch.Tensor:
        """Embeddings of a reference or exemplar set given as a path (see `rewards.embedders`) or a tensor."""
        if isinstance(source, (str, os.PathLike)):
            return exemplar_embeddings(self.embeddings.embedder, source)
        return source

    def embed(self, outputs: Any) -> torch.Tensor:
        """Embeddings ``[B, D]`` or ``[B, F, D]`` of ``outputs``, from the cache when seen before."""
        return self._embed(outputs)

    def score(self, outputs: Any, conditions: Sequence[str] | None) -> RewardOutput:
        emb = self._embed(outputs)
        out = self.score_embeddings(emb)
        device = _device_of(outputs, emb)
        return RewardOutput(out.rewards.to(device), out.metadata)

    def score_embeddings(self, emb: torch.Tensor) -> RewardOutput:
        """The reward of precomputed embeddings ``[B, D]`` / ``[B, F, D]``: ``rewards`` [B] and metadata
        (``set_score`` for set-level rewards)."""
        raise NotImplementedError

    def set_score(self, emb: torch.Tensor) -> torch.Tensor:
        """The scalar score of a set of embeddings: the set-level value (``metadata["set_score"]``) of a
        distribution-level reward, the mean per-sample reward of an instance-level one."""
        out = self.score_embeddings(emb)
        value = (out.metadata or {}).get("set_score")
        return out.rewards.mean() if value is None else value

    def per_sample_credit(self, emb: torch.Tensor) -> torch.Tensor:
        """[B] leave-one-out credit R(set) − R(set without i) on precomputed embeddings."""
        with torch.no_grad():
            total = self.set_score(emb)
            keep = ~torch.eye(emb.shape[0], dtype=torch.bool, device=emb.device)
            return torch.stack([total - self.set_score(emb[keep[i]]) for i in range(emb.shape[0])])

    def compare_sets(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """R(first) − R(second) on precomputed embeddings: > 0 when the first set is better."""
        with torch.no_grad():
            return self.set_score(first) - self.set_score(second)

    def _embed(self, outputs: Any) -> torch.Tensor:
        """Embed via the (shared) cache and check the result: ``[B, D]`` or ``[B, F, D]``."""
        emb = self.embeddings.embed(outputs)
        b = _batch_size(outputs)
        if emb.ndim not in (2, 3) or emb.shape[0] != b or not emb.is_floating_point():
            raise RewardError(
                f"reward '{self.name}': the embedder returned {emb.dtype} shape {tuple(emb.shape)} for a "
                f"batch of {b}; it must return float embeddings [B, D] or frame embeddings [B, F, D]"
            )
        if not bool(torch.isfinite(emb.detach()).all()):
            raise RewardError(f"reward '{self.name}': the embedder returned NaN/inf embeddings")
        return emb

    @staticmethod
    def _pooled(emb: torch.Tensor) -> torch.Tensor:
        # One embedding per sample: frame embeddings are mean-pooled.
        return emb.mean(dim=1) if emb.ndim == 3 else emb


def _reference_from(
    name: str, embeddings: torch.Tensor | None, stats: Any, what: str = "reference"
) -> GaussianStats:
    """Reference Gaussian from embeddings ``[M, D]`` / frames ``[M, F, D]`` (flattened) or stats."""
    if (embeddings is None) == (stats is None):
        raise RewardError(
            f"reward '{name}' needs exactly one of {what}_embeddings [M, D] or {what}_stats (mean, cov)"
        )
    if stats is not None:
        try:
            return _as_stats(stats, f"{what}_stats")
        except ValueError as exc:
            raise RewardError(f"reward '{name}': {exc}") from None
    emb = torch.as_tensor(embeddings)
    if emb.ndim == 3:  # frame embeddings of reference clips: one Gaussian over all frames
        emb = emb.reshape(-1, emb.shape[-1])
    if emb.ndim != 2 or emb.shape[0] < 2 or not emb.is_floating_point():
        raise RewardError(
            f"reward '{name}' needs {what}_embeddings as a float tensor [M, D] (or frames [M, F, D]) with "
            f"at least 2 rows; got {emb.dtype} shape {tuple(emb.shape)}"
        )
    return gaussian_stats(emb.detach())


class _GaussianReferenceReward(_EmbeddingReward):
    """Holds a reference Gaussian as float64 buffers (they move with ``.to(device)``)."""

    def _set_reference(self, stats: GaussianStats) -> None:
        self.register_buffer("ref_mean", stats.mean.detach().to(_F64).clone())
        self.register_buffer("ref_cov", stats.cov.detach().to(_F64).clone())

    def _ref_stats(self, device: torch.device) -> GaussianStats:
        return GaussianStats(self.ref_mean.to(device, _F64), self.ref_cov.to(device, _F64))

    def _check_dim(self, d: int) -> None:
        if d != self.ref_mean.shape[0]:
            raise RewardError(
                f"reward '{self.name}': embedding size D={d} does not match the reference's "
                f"D={self.ref_mean.shape[0]}; embed the reference with the same embedder"
            )

    def _per_sample_fd(self, emb: torch.Tensor) -> torch.Tensor:
        if emb.ndim != 3:
            raise RewardError(
                f"reward '{self.name}' needs frame embeddings [B, F, D] (F >= 2 frames/patches per sample) "
                f"for a per-sample Fréchet distance; the embedder returned shape {tuple(emb.shape)}"
            )
        self._check_dim(emb.shape[-1])
        try:
            return per_sample_frechet_distance(emb, self._ref_stats(emb.device))
        except ValueError as exc:
            raise RewardError(f"reward '{self.name}': {exc}") from None


@register_reward("fd_to_reference")
class FDToReference(_GaussianReferenceReward):
    """Instance-to-distribution Fréchet reward; higher (closer to the reference) is better.

    * ``frames=True``: the embedder returns ``[B, F, D]`` (F >= 2 frame or
      patch embeddings, e.g. audio windows); score = −per-sample FD of each
      sample's frame Gaussian to the reference Gaussian ("per-song FAD").
    * ``frames=False``: one embedding per sample (``[B, F, D]`` is
      mean-pooled); a single point has no covariance, so the score is the
      mean term of the FD only: −‖e_i − μ_ref‖². It is the per-sample part of
      the set FD that depends on e_i alone, a simple, documented stand-in for
      a leave-one-in credit.

    Args:
        embedder: callable or :class:`EmbeddingCache`.
        reference_embeddings: ``[M, D]`` (or frames ``[M, F, D]``, pooled into
            one Gaussian over all frames); or give ``reference_stats``.
        reference_stats: ``(mean [D], cov [D, D])``.
        frames: see above.
        modality: what the outputs are ("image", "audio", ...).
        differentiable: whether gradients flow through the embedder.

    Returns (score): ``[B]``; ``metadata["fd"]`` holds the per-sample FD
    (or squared mean distance) without the sign.
    """

    kind = "instance_to_distribution"

    def __init__(
        self,
        embedder: Any,
        reference_embeddings: torch.Tensor | str | os.PathLike | None = None,
        reference_stats: Any = None,
        frames: bool = False,
        *,
        modality: str | None = None,
        differentiable: bool = True,
    ) -> None:
        super().__init__(embedder, modality=modality, differentiable=differentiable)
        self.frames = bool(frames)
        reference = None if reference_embeddings is None else self._load_set(reference_embeddings)
        self._set_reference(_reference_from(self.name, reference, reference_stats))

    def score_embeddings(self, emb: torch.Tensor) -> RewardOutput:
        """``[B, F, D]`` (frames) or ``[B, D]`` -> ``[B]`` = −(per-sample FD) or −‖e_i − μ_ref‖²."""
        if self.frames:
            dist = self._per_sample_fd(emb)
        else:
            e = self._pooled(emb)
            self._check_dim(e.shape[-1])
            dist = (e.to(_F64) - self.ref_mean.to(e.device, _F64)).pow(2).sum(dim=-1).to(_out_dtype(e))
        return RewardOutput(-dist, {"fd": dist.detach()})

    def extra_repr(self) -> str:
        return f"frames={self.frames}, " + super().extra_repr()


@register_reward("batch_fd")
class BatchFD(_GaussianReferenceReward):
    """Distribution-to-distribution reward: −FD(batch, reference), repeated for every sample.

    The batch's embeddings (``[B, D]``; frame embeddings ``[B, F, D]`` are
    flattened to B·F points, as dataset-level FAD does) form one Gaussian,
    compared with the reference Gaussian. ``rewards`` is ``[B]`` with −FD in
    every entry (for algorithms that want per-sample rewards, combine with a
    credit-assignment strategy); ``metadata["set_score"]`` holds the scalar
    −FD (with gradient when the embedder is differentiable). Needs at least
    2 points per batch.
    """

    kind = "distribution_to_distribution"

    def __init__(
        self,
        embedder: Any,
        reference_embeddings: torch.Tensor | str | os.PathLike | None = None,
        reference_stats: Any = None,
        *,
        modality: str | None = None,
        differentiable: bool = True,
    ) -> None:
        super().__init__(embedder, modality=modality, differentiable=differentiable)
        reference = None if reference_embeddings is None else self._load_set(reference_embeddings)
        self._set_reference(_reference_from(self.name, reference, reference_stats))

    def score_embeddings(self, emb: torch.Tensor) -> RewardOutput:
        """``[B, D]`` or ``[B, F, D]`` -> ``[B]`` filled with −FD(set, reference)."""
        points = emb.reshape(-1, emb.shape[-1])
        self._check_dim(points.shape[-1])
        if points.shape[0] < 2:
            raise RewardError(
                f"reward '{self.name}' needs at least 2 samples (or frames) per batch to fit a Gaussian; "
                f"got {points.shape[0]} — score larger batches"
            )
        mean2, cov2 = self._ref_stats(points.device)
        set_score = -_fd_to_stats(points, mean2, cov2).to(_out_dtype(points))
        return RewardOutput(set_score.expand(emb.shape[0]).clone(), {"set_score": set_score})


@register_reward("vendi")
class Vendi(_EmbeddingReward):
    """Distribution-to-distribution diversity reward: the batch's Vendi score, no reference.

    ``rewards`` is ``[B]`` with the batch Vendi score in every entry;
    ``metadata["set_score"]`` the scalar and ``metadata["per_sample_credit"]``
    the leave-one-out credit ``Vendi(all) − Vendi(all without i)`` (detached;
    duplicates of other samples get low or negative credit). Frame
    embeddings ``[B, F, D]`` are mean-pooled to one embedding per sample.

    Args:
        embedder: callable or :class:`EmbeddingCache`.
        q: Vendi order (1 = Shannon; see :func:`vendi_score`).
        normalize: cosine kernel (True) or raw linear kernel.
    """

    kind = "distribution_to_distribution"

    def __init__(
        self,
        embedder: Any,
        q: float = 1.0,
        normalize: bool = True,
        *,
        modality: str | None = None,
        differentiable: bool = True,
    ) -> None:
        super().__init__(embedder, modality=modality, differentiable=differentiable)
        if not float(q) >= 0:
            raise RewardError(f"reward 'vendi' got q={q!r}; the Vendi order must be >= 0 (or inf)")
        self.q = float(q)
        self.normalize = bool(normalize)

    def score_embeddings(self, emb: torch.Tensor) -> RewardOutput:
        """``[B, D]`` (or pooled ``[B, F, D]``) -> ``[B]`` filled with the set's Vendi score."""
        emb = self._pooled(emb)
        value = vendi_score(emb, q=self.q, normalize=self.normalize)
        rewards = value.expand(emb.shape[0]).clone()
        return RewardOutput(rewards, {"set_score": value, "per_sample_credit": self.per_sample_credit(emb)})

    def per_sample_credit(self, emb: torch.Tensor) -> torch.Tensor:
        """[B] Vendi(all) − Vendi(all without i), from B eigen-decompositions batched in one call."""
        emb = self._pooled(emb).detach()
        value = vendi_score(emb, q=self.q, normalize=self.normalize)
        return (value.to(_F64) - _vendi_leave_one_out(emb, self.q, self.normalize)).to(value.dtype)

    def extra_repr(self) -> str:
        return f"q={self.q}, normalize={self.normalize}, " + super().extra_repr()


@register_reward("exemplar_similarity")
class ExemplarSimilarity(_EmbeddingReward):
    """Instance-to-distribution reward: cosine similarity to an exemplar set.

    ``mode="mean_cosine"``: cosine between each sample's embedding and the
    mean of the L2-normalised exemplar embeddings (the exemplar "centroid
    direction"); ``mode="max_cosine"``: the highest cosine to any exemplar.

    Cross-modal exemplars work whenever both towers share one embedding
    space: e.g. for audio outputs pass a CLAP *audio* tower as ``embedder``
    and CLAP *text* embeddings of captions as ``exemplar_embeddings`` (or a
    CLIP image tower with CLIP text embeddings for images).

    Args:
        embedder: callable or :class:`EmbeddingCache`; ``[B, F, D]`` outputs
            are mean-pooled.
        exemplar_embeddings: ``[E, D]``.
        mode: "mean_cosine" or "max_cosine".
    """

    kind = "instance_to_distribution"

    def __init__(
        self,
        embedder: Any,
        exemplar_embeddings: torch.Tensor | str | os.PathLike,
        mode: Literal["mean_cosine", "max_cosine"] = "mean_cosine",
        *,
        modality: str | None = None,
        differentiable: bool = True,
    ) -> None:
        super().__init__(embedder, modality=modality, differentiable=differentiable)
        if mode not in ("mean_cosine", "max_cosine"):
            raise RewardError(f"reward 'exemplar_similarity' got mode={mode!r}; use 'mean_cosine' or 'max_cosine'")
        ex = torch.as_tensor(self._load_set(exemplar_embeddings))
        ex = self._pooled(ex) if ex.ndim == 3 else ex
        if ex.ndim != 2 or ex.shape[0] < 1 or not ex.is_floating_point():
            raise RewardError(
                f"reward 'exemplar_similarity' needs exemplar_embeddings as a float tensor [E, D] with E >= 1; "
                f"got {ex.dtype} shape {tuple(ex.shape)}"
            )
        self.mode = mode
        self.register_buffer("exemplars", _normalize_rows(ex.detach().to(_F64)))

    def score_embeddings(self, emb: torch.Tensor) -> RewardOutput:
        """``[B, D]`` (or pooled ``[B, F, D]``) -> ``[B]`` cosine similarity in [-1, 1]."""
        emb = self._pooled(emb)
        if emb.shape[-1] != self.exemplars.shape[-1]:
            raise RewardError(
                f"reward 'exemplar_similarity': embedding size D={emb.shape[-1]} does not match the exemplars' "
                f"D={self.exemplars.shape[-1]}; use towers that share one embedding space"
            )
        e = _normalize_rows(emb.to(_F64))
        ex = self.exemplars.to(e.device, _F64)
        if self.mode == "mean_cosine":
            sim = e @ _normalize_rows(ex.mean(dim=0))
        else:
            sim = (e @ ex.T).amax(dim=-1)
        return RewardOutput(sim.to(_out_dtype(emb)))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, " + super().extra_repr()


@register_reward("exemplar_fd")
class ExemplarFD(_GaussianReferenceReward):
    """Instance-to-distribution reward: −per-sample FD to the exemplar set's Gaussian.

    The embedder must return frame embeddings ``[B, F, D]`` with F >= 2; the
    exemplar Gaussian is fitted on ``exemplar_embeddings`` ``[E, D]`` (or on
    all frames of ``[E, F, D]``; at least 2 points). Higher is better;
    ``metadata["fd"]`` holds the unsigned distances.
    """

    kind = "instance_to_distribution"

    def __init__(
        self,
        embedder: Any,
        exemplar_embeddings: torch.Tensor | str | os.PathLike,
        *,
        modality: str | None = None,
        differentiable: bool = True,
    ) -> None:
        super().__init__(embedder, modality=modality, differentiable=differentiable)
        self._set_reference(_reference_from(self.name, self._load_set(exemplar_embeddings), None, what="exemplar"))

    def score_embeddings(self, emb: torch.Tensor) -> RewardOutput:
        """Frames ``[B, F, D]`` -> ``[B]`` = −per-sample FD."""
        dist = self._per_sample_fd(emb)
        return RewardOutput(-dist, {"fd": dist.detach()})
