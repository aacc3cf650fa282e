"""Behavioural tests for the distributional metrics and rewards (rewards.distribution)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from rewards import RewardError, build_reward
from rewards.base import REWARDS
from rewards.distribution import (
    EmbeddingCache,
    fd_infinity,
    frechet_distance,
    frechet_distance_from_embeddings,
    gaussian_stats,
    kid,
    per_sample_frechet_distance,
    vendi_score,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gaussian_set(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = _gen(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + shift


def _scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The usual pytorch-fid / torchmetrics formula with scipy's sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(c1 @ c2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


# ------------------------------------------------------------ Fréchet distance


@pytest.mark.parametrize("d", [8, 32])
@pytest.mark.parametrize("n", [200, 20])  # 20 < 32 exercises the N x N (gram) path
def test_fd_matches_scipy_sqrtm(d: int, n: int) -> None:
    a = _gaussian_set(n, d, seed=1)
    b = _gaussian_set(300, d, seed=2, shift=0.3)
    expected = _scipy_fd(a.numpy(), b.numpy())
    got = frechet_distance_from_embeddings(a, b)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-6)
    mu1, c1 = gaussian_stats(a)
    mu2, c2 = gaussian_stats(b)
    assert frechet_distance(mu1, c1, mu2, c2).item() == pytest.approx(expected, rel=1e-6)
    # float32 inputs: float64 inside, float32 out.
    got32 = frechet_distance_from_embeddings(a.float(), b.float())
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(expected, rel=1e-4)


def test_fd_of_a_set_with_itself_is_zero() -> None:
    a = _gaussian_set(100, 16, seed=3)
    assert abs(frechet_distance_from_embeddings(a, a).item()) < 1e-9
    mu, cov = gaussian_stats(a)
    assert abs(frechet_distance(mu, cov, mu, cov).item()) < 1e-9


def test_fd_with_singular_reference_is_symmetric() -> None:
    # b has fewer points than dimensions: its covariance is singular, so the D x D path
    # (a first) cannot use Cholesky and falls back to eigh; b first uses the N x N path.
    a = _gaussian_set(40, 12, seed=12)
    b = _gaussian_set(6, 12, seed=13, shift=0.2)
    ab = frechet_distance_from_embeddings(a, b).item()
    ba = frechet_distance_from_embeddings(b, a).item()
    assert ab == pytest.approx(ba, rel=1e-9)


@pytest.mark.parametrize("n,d", [(12, 4), (3, 5)])  # D x D path and N x N path
def test_fd_gradcheck_first_set(n: int, d: int) -> None:
    a = _gaussian_set(n, d, seed=4).requires_grad_(True)
    b = _gaussian_set(15, d, seed=5, shift=0.5)
    assert torch.autograd.gradcheck(lambda x: frechet_distance_from_embeddings(x, b), (a,))


def test_fd_gradient_is_finite_for_rank_deficient_batch() -> None:
    # Batch smaller than D: the batch covariance is singular and has repeated zero eigenvalues.
    a = _gaussian_set(4, 16, seed=6).float().requires_grad_(True)
    b = _gaussian_set(64, 16, seed=7)
    frechet_distance_from_embeddings(a, b).backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_frechet_distance_gradient_wrt_first_covariance() -> None:
    a = _gaussian_set(40, 6, seed=8)
    b = _gaussian_set(40, 6, seed=9, shift=0.2)
    mu1, c1 = gaussian_stats(a)
    mu2, c2 = gaussian_stats(b)
    c1 = c1.clone().requires_grad_(True)
    mu1 = mu1.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m, c: frechet_distance(m, _sym(c), mu2, c2), (mu1, c1))


def _sym(c: torch.Tensor) -> torch.Tensor:
    return 0.5 * (c + c.T)


def test_fd_infinity_is_closer_to_zero_than_finite_fd() -> None:
    d = 16
    g = _gen(10)
    emb = torch.randn(2000, d, generator=g, dtype=torch.float64)
    reference = (torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64))
    finite = frechet_distance(*gaussian_stats(emb), *reference).item()
    inf = fd_infinity(emb, reference, generator=_gen(11)).item()
    assert finite > 0.02  # the c/n bias (about D(D+5)/(4N)) is clearly visible at this size
    assert abs(inf) < 0.5 * finite


def test_fd_infinity_rejects_single_size() -> None:
    emb = torch.randn(50, 4)
    with pytest.raises(ValueError, match="two distinct"):
        fd_infinity(emb, gaussian_stats(emb), sizes=[50, 50])


# ------------------------------------------------------------ per-sample FD


def test_per_sample_fd_needs_two_frames() -> None:
    ref = gaussian_stats(torch.randn(20, 8))
    with pytest.raises(ValueError, match="≥ 2 frames per sample \\(got F=1\\)"):
        per_sample_frechet_distance(torch.randn(3, 1, 8), ref)


@pytest.mark.parametrize("f", [5, 30])  # F <= D and F > D
def test_per_sample_fd_matches_per_sample_frechet_distance(f: int) -> None:
    d = 12
    frames = torch.stack([_gaussian_set(f, d, seed=20 + i, shift=0.1 * i) for i in range(4)])
    ref_mu, ref_cov = gaussian_stats(_gaussian_set(200, d, seed=30))
    got = per_sample_frechet_distance(frames, (ref_mu, ref_cov))
    assert got.shape == (4,)
    for i in range(4):
        expected = frechet_distance(*gaussian_stats(frames[i]), ref_mu, ref_cov)
        assert got[i].item() == pytest.approx(expected.item(), rel=1e-8)


# ------------------------------------------------------------ KID


def test_kid_matches_torchmetrics() -> None:
    from torchmetrics.image.kid import KernelInceptionDistance

    real = _gaussian_set(60, 10, seed=40)
    fake = _gaussian_set(50, 10, seed=41, shift=0.4)
    metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=7, subset_size=25)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(123)
    tm_mean, tm_std = metric.compute()
    torch.manual_seed(123)  # same global RNG stream -> same subsets
    mean, std = kid(real, fake, subsets=7, subset_size=25)
    assert mean.item() == pytest.approx(tm_mean.item(), rel=1e-9)
    assert std.item() == pytest.approx(tm_std.item(), rel=1e-9)


def test_kid_scores_each_subset_with_torchmetrics_poly_mmd(monkeypatch) -> None:
    """KID delegates the per-subset MMD² to torchmetrics instead of re-implementing it."""
    import torchmetrics.image.kid as tm_kid

    real_poly_mmd = tm_kid.poly_mmd
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def recording_poly_mmd(f_real, f_fake, degree, gamma, coef):
        value = real_poly_mmd(f_real, f_fake, degree, gamma, coef)
        calls.append((f_real, f_fake, value))
        return value

    monkeypatch.setattr(tm_kid, "poly_mmd", recording_poly_mmd)
    a = _gaussian_set(40, 6, seed=44)
    b = _gaussian_set(40, 6, seed=45, shift=0.5)
    mean, std = kid(a, b, subsets=4, subset_size=15, generator=_gen(2))
    assert len(calls) == 4
    assert all(f_real.shape == f_fake.shape == (15, 6) for f_real, f_fake, _ in calls)
    values = torch.stack([value for _, _, value in calls])
    assert mean.item() == pytest.approx(values.mean().item(), rel=1e-12)
    assert std.item() == pytest.approx(values.std(correction=0).item(), rel=1e-12)


def test_kid_independent_unbiased_estimator_and_generator() -> None:
    a = _gaussian_set(30, 6, seed=42)
    b = _gaussian_set(30, 6, seed=43, shift=1.0)
    # One subset of the full sets: no randomness, compare to a plain-loop estimator.
    mean, std = kid(a, b, subsets=1, subset_size=30, generator=_gen(0))

    def k(x, y):
        return (float(x @ y) / 6 + 1.0) ** 3

    m = 30
    aa = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    bb = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    ab = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    assert mean.item() == pytest.approx(aa + bb - 2 * ab, rel=1e-10)
    assert std.item() == 0.0
    # Seeded generator -> reproducible subsets.
    r1 = kid(a, b, subsets=5, subset_size=10, generator=_gen(1))
    r2 = kid(a, b, subsets=5, subset_size=10, generator=_gen(1))
    assert torch.equal(r1[0], r2[0])
    with pytest.raises(ValueError, match="subset_size"):
        kid(a, b, subset_size=100)


# ------------------------------------------------------------ Vendi


def _direct_vendi(x: torch.Tensor, q: float) -> float:
    x = x / x.norm(dim=1, keepdim=True)
    lam = np.linalg.eigvalsh((x @ x.T).numpy() / x.shape[0])
    lam = lam[lam > 1e-12]
    if q == 1:
        return float(np.exp(-(lam * np.log(lam)).sum()))
    if math.isinf(q):
        return float(1 / lam.max())
    return float((lam**q).sum() ** (1 / (1 - q)))


@pytest.mark.parametrize("q", [0.5, 1.0, 2.0, float("inf")])
def test_vendi_matches_direct_eigenvalue_formula(q: float) -> None:
    x = _gaussian_set(40, 8, seed=50, shift=0.5)
    expected = _direct_vendi(x, q)
    for method in ("primal", "dual", "auto"):
        assert vendi_score(x, q=q, method=method).item() == pytest.approx(expected, rel=1e-8)


def test_vendi_primal_equals_dual_for_many_samples() -> None:
    x = torch.randn(500, 16, generator=_gen(51))
    for q in (0.0, 0.5, 1.0, 2.0, float("inf")):
        primal = vendi_score(x, q=q, method="primal")
        dual = vendi_score(x, q=q, method="dual")
        assert dual.item() == pytest.approx(primal.item(), rel=1e-6)
    assert vendi_score(x, q=0).item() == 16  # rank of the kernel


def test_vendi_extremes() -> None:
    same = torch.randn(1, 10, generator=_gen(52)).expand(25, 10)
    for q in (0.5, 1.0, 2.0, float("inf")):
        assert vendi_score(same, q=q).item() == pytest.approx(1.0, rel=1e-6)
    ortho = torch.eye(7) * 3.0
    for q in (0.0, 0.5, 1.0, 2.0, float("inf")):
        assert vendi_score(ortho, q=q).item() == pytest.approx(7.0, rel=1e-6)


def test_vendi_kernel_path_and_gradient() -> None:
    x = _gaussian_set(30, 5, seed=53)
    sq = torch.cdist(x, x) ** 2
    rbf = torch.exp(-sq / 4.0)  # PSD with unit diagonal
    lam = np.linalg.eigvalsh(rbf.numpy() / 30)
    lam = lam[lam > 1e-12]
    expected = float(np.exp(-(lam * np.log(lam)).sum()))
    assert vendi_score(kernel=rbf).item() == pytest.approx(expected, rel=1e-8)
    with pytest.raises(ValueError, match="primal"):
        vendi_score(kernel=rbf, method="dual")
    # Linear kernel via `kernel` equals the embedding path.
    xn = x / x.norm(dim=1, keepdim=True)
    assert vendi_score(kernel=xn @ xn.T).item() == pytest.approx(vendi_score(x).item(), rel=1e-8)
    # Differentiable w.r.t. the embeddings (dual and primal).
    for n in (12, 4):
        y = _gaussian_set(n, 6, seed=54).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t: vendi_score(t, q=1.0), (y,))


# ------------------------------------------------------------ EmbeddingCache


class CountingEmbedder(torch.nn.Module):
    """Fixed linear map of flattened images, counting its calls."""

    def __init__(self, in_features: int = 3 * 8 * 8, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = _gen(seed)
        self.weight = torch.nn.Parameter(torch.randn(in_features, dim, generator=g) / 8, requires_grad=False)
        self.count = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return images.flatten(1) @ self.weight


class PatchEmbedder(torch.nn.Module):
    """4x4 patches of an 8x8 image -> F = 4 frame embeddings [B, 4, D]."""

    def __init__(self, dim: int = 6, seed: int = 1) -> None:
        super().__init__()
        g = _gen(seed)
        self.weight = torch.nn.Parameter(torch.randn(3 * 16, dim, generator=g) / 4, requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        patches = images.unfold(2, 4, 4).unfold(3, 4, 4)  # [B, 3, 2, 2, 4, 4]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, 4, 3 * 16)
        return patches @ self.weight


def _images(b: int, seed: int, level: float = 0.5, spread: float = 0.1) -> torch.Tensor:
    g = _gen(seed)
    return (level + spread * torch.randn(b, 3, 8, 8, generator=g)).clamp(0, 1)


def test_embedding_cache_embeds_each_batch_once() -> None:
    embedder = CountingEmbedder()
    cache = EmbeddingCache(embedder)
    ref = embedder(_images(50, seed=60))
    embedder.count = 0
    fd = build_reward("batch_fd", embedder=cache, reference_embeddings=ref)
    vendi = build_reward("vendi", embedder=cache)
    batch = _images(8, seed=61)
    fd(batch)
    vendi(batch)
    assert embedder.count == 1 and cache.calls == 1
    fd(batch)
    assert embedder.count == 1
    other = _images(8, seed=62)
    vendi(other)
    fd(other)
    assert embedder.count == 2
    cache.clear()
    fd(other)
    assert embedder.count == 3


def test_embedding_cache_recomputes_when_gradients_are_needed() -> None:
    embedder = CountingEmbedder()
    cache = EmbeddingCache(embedder)
    batch = _images(4, seed=63).requires_grad_(True)
    with torch.no_grad():
        cache.embed(batch)
    emb = cache.embed(batch)  # the no-grad embeddings carry no graph
    assert embedder.count == 2 and emb.requires_grad
    cache.embed(batch)
    assert embedder.count == 2
    with torch.no_grad():
        batch.mul_(0.5)  # an in-place edit bumps the tensor's version: embed again
    cache.embed(batch)
    assert embedder.count == 3


# ------------------------------------------------------------ rewards


def test_distribution_rewards_are_registered() -> None:
    for name in ("fd_to_reference", "batch_fd", "vendi", "exemplar_similarity", "exemplar_fd"):
        assert name in REWARDS


def _check(out, b: int) -> torch.Tensor:
    assert out.rewards.shape == (b,)
    assert torch.isfinite(out.rewards).all()
    return out.rewards


def test_fd_to_reference_prefers_samples_near_the_reference() -> None:
    embedder = CountingEmbedder()
    ref = embedder(_images(64, seed=70, level=0.3))
    near, far = _images(3, seed=71, level=0.3), _images(3, seed=72, level=0.8)
    batch = torch.cat([near, far])
    reward = build_reward("fd_to_reference", embedder=embedder, reference_embeddings=ref)
    r = _check(reward(batch), 6)
    assert r[:3].min() > r[3:].max()
    # Same from stats, and the frames=False credit is -||e - mu_ref||^2.
    stats = gaussian_stats(ref)
    r2 = build_reward("fd_to_reference", embedder=embedder, reference_stats=stats)(batch).rewards
    expected = -((embedder(batch).double() - stats.mean) ** 2).sum(1)
    torch.testing.assert_close(r2, expected.float())

    patches = PatchEmbedder()
    ref_frames = patches(_images(64, seed=73, level=0.3))  # [64, 4, D] -> one Gaussian over all frames
    per_sample = build_reward("fd_to_reference", embedder=patches, reference_embeddings=ref_frames, frames=True)
    out = per_sample(batch)
    r3 = _check(out, 6)
    assert r3[:3].min() > r3[3:].max()
    torch.testing.assert_close(out.metadata["fd"], -r3)


def test_fd_to_reference_frames_errors() -> None:
    embedder = CountingEmbedder()
    ref = embedder(_images(20, seed=74))
    reward = build_reward("fd_to_reference", embedder=embedder, reference_embeddings=ref, frames=True)
    with pytest.raises(RewardError, match="frame embeddings"):
        reward(_images(2, seed=75))
    single = build_reward(
        "fd_to_reference", embedder=lambda x: embedder(x)[:, None, :], reference_embeddings=ref, frames=True
    )
    with pytest.raises(ValueError, match="≥ 2 frames"):
        single(_images(2, seed=75))
    with pytest.raises(RewardError, match="exactly one"):
        build_reward("fd_to_reference", embedder=embedder)


def test_batch_fd_scores_batches_and_is_differentiable() -> None:
    embedder = CountingEmbedder()
    ref = embedder(_images(64, seed=80, level=0.3))
    reward = build_reward("batch_fd", embedder=embedder, reference_embeddings=ref)
    near = _images(8, seed=81, level=0.3).requires_grad_(True)
    out = reward(near)
    r_near = _check(out, 8)
    assert torch.all(r_near == out.metadata["set_score"])
    expected = -frechet_distance_from_embeddings(embedder(near), ref)
    assert out.metadata["set_score"].item() == pytest.approx(expected.item(), rel=1e-5)
    out.metadata["set_score"].backward()
    assert near.grad is not None and torch.isfinite(near.grad).all() and near.grad.abs().sum() > 0
    r_far = _check(reward(_images(8, seed=82, level=0.8)), 8)
    assert r_near[0] > r_far[0]
    # Non-differentiable flag: scored under no_grad.
    frozen = build_reward("batch_fd", embedder=embedder, reference_embeddings=ref, differentiable=False)
    assert not frozen(_images(8, seed=83).requires_grad_(True)).rewards.requires_grad


def test_vendi_reward_credits_unique_samples() -> None:
    embedder = CountingEmbedder()
    dup = _images(1, seed=90).expand(3, -1, -1, -1)
    batch = torch.cat([dup, _images(3, seed=91, level=0.2, spread=0.3)])
    out = build_reward("vendi", embedder=embedder)(batch)
    r = _check(out, 6)
    assert torch.allclose(r, r[0].expand(6))
    assert 1.0 < out.metadata["set_score"].item() < 6.0
    credit = out.metadata["per_sample_credit"]
    assert credit.shape == (6,) and torch.isfinite(credit).all()
    assert credit[:3].max() < credit[3:].min(), "duplicates must earn less leave-one-out credit"
    # Credit matches the definition.
    emb = embedder(batch)
    full = vendi_score(emb)
    for i in (0, 4):
        rest = torch.cat([emb[:i], emb[i + 1 :]])
        assert credit[i].item() == pytest.approx((full - vendi_score(rest)).item(), rel=1e-4, abs=1e-5)
    # A more diverse batch gets a higher set score.
    diverse = build_reward("vendi", embedder=embedder)(_images(6, seed=92, spread=0.4)).rewards
    assert diverse[0] > r[0]


def test_exemplar_similarity_and_cross_modal_exemplars() -> None:
    linear = CountingEmbedder(seed=3)
    # Cosine ignores scale, so centre the pixels: grey levels then point in different directions.
    image_tower = lambda images: linear(images - 0.5)
    exemplar_images = _images(10, seed=100, level=0.3)
    exemplars = image_tower(exemplar_images)
    near, far = _images(2, seed=101, level=0.3), _images(2, seed=102, level=0.9, spread=0.3)
    batch = torch.cat([near, far])
    for mode in ("mean_cosine", "max_cosine"):
        reward = build_reward("exemplar_similarity", embedder=image_tower, exemplar_embeddings=exemplars, mode=mode)
        r = _check(reward(batch), 4)
        assert r[:2].min() > r[2:].max()
        assert torch.all(r <= 1 + 1e-6) and torch.all(r >= -1 - 1e-6)

    # "Audio" outputs [B, T] scored against exemplars from another tower (e.g. text), same space.
    proj = torch.randn(32, 8, generator=_gen(104))
    audio_tower = lambda wav: wav @ proj
    text_exemplars = torch.randn(5, 8, generator=_gen(105)) + 3 * torch.ones(8)
    wav = torch.randn(4, 32, generator=_gen(106))
    audio = build_reward(
        "exemplar_similarity", embedder=audio_tower, exemplar_embeddings=text_exemplars, modality="audio"
    )
    assert audio.describe()["modality"] == "audio"
    _check(audio(wav), 4)
    with pytest.raises(RewardError, match="mean_cosine"):
        build_reward("exemplar_similarity", embedder=linear, exemplar_embeddings=exemplars, mode="median")


def test_exemplar_fd_prefers_samples_like_the_exemplars() -> None:
    patches = PatchEmbedder()
    exemplars = patches(_images(40, seed=110, level=0.3))
    reward = build_reward("exemplar_fd", embedder=patches, exemplar_embeddings=exemplars)
    batch = torch.cat([_images(3, seed=111, level=0.3), _images(3, seed=112, level=0.8)])
    out = reward(batch)
    r = _check(out, 6)
    assert r[:3].min() > r[3:].max()
    assert reward.kind == "instance_to_distribution"
    with pytest.raises(RewardError, match="frame embeddings"):
        build_reward("exemplar_fd", embedder=CountingEmbedder(), exemplar_embeddings=torch.randn(5, 16))(batch)
