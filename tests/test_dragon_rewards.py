"""What DRAGON asks of the reward library: a frame-level CLAP embedder, distributional rewards built from YAML (an
embedder name and an exemplar folder, text file or tensor file), scoring of precomputed embeddings, a cache that
embeds each sample once across batches and subsets, and Fréchet distances that agree with an independent
computation."""

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from rewards import RewardError, build_reward
from rewards.distribution import EmbeddingCache
from rewards.embedders import EXEMPLAR_CACHE_STATS, ClapAudioEmbedder, build_embedder, exemplar_embeddings

ROOT = Path(__file__).resolve().parents[1]
TONES = ROOT / "genalign" / "worlds" / "assets" / "tones"
CLAP = {"name": "clap_audio", "kwargs": {"model": str(TONES / "clap"), "sampling_rate": 16_000}}
CLAP_FRAMES = {"name": "clap_audio", "kwargs": {**CLAP["kwargs"], "frames": True}}


def _fd_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of two point sets by the textbook formula (scipy's sqrtm of C1 C2)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(c1 @ c2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * root))


class Patches(torch.nn.Module):
    """A fixed linear frame embedder of 2×2 images: [B, 3, 2, 2] -> [B, 4, 3] (a frame per pixel)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.flatten(2).transpose(1, 2) @ self.weight


@pytest.fixture(scope="module")
def clips():
    from genalign.worlds.tones import clip_seeds, sample_tones, synthesize_batch

    tones = sample_tones(6, np.random.default_rng(5))
    return synthesize_batch(tones, clip_seeds("data", 6, seed=0, held_out=True))


# ------------------------------------------------------------------------------------ frame-level CLAP


def test_clap_frames_are_the_embeddings_of_each_window(clips):
    """Fails if the windows are cut at the wrong places (the last one must end at the clip's end), if frames
    are mixed across clips by the reshape, or if the pooled path differs from ClapScore's embedding."""
    embedder = build_embedder(CLAP_FRAMES)
    assert isinstance(embedder, ClapAudioEmbedder)
    frames = embedder(clips[:2])
    starts = [0, 4000, 8000, 12000, 16000]  # 1-s windows every 0.25 s of a 2-s clip at 16 kHz
    assert frames.shape == (2, len(starts), 32)
    for b in range(2):
        for f, s in enumerate(starts):
            alone = embedder.clap.embed_audio(clips[b : b + 1, s : s + 16000])[0]
            torch.testing.assert_close(frames[b, f], alone, atol=1e-5, rtol=1e-5)
    pooled = build_embedder(CLAP)(clips[:2])
    torch.testing.assert_close(pooled, embedder.clap.embed_audio(clips[:2]))


# ------------------------------------------------------------------------------ rewards built from YAML


def test_exemplar_rewards_build_from_an_embedder_name_and_an_exemplar_folder(clips):
    """Fails if a path is not read as an exemplar folder, if the per-sample FD is not against the Gaussian of the
    exemplars' frames, or if the modality is not taken from the embedder (audio, not the image default)."""
    folder = TONES / "exemplars" / "reward"
    reward = build_reward("exemplar_fd", embedder=CLAP_FRAMES, exemplar_embeddings=str(folder))
    assert reward.modality == "audio"
    scores = reward(clips).rewards
    embedder = reward.embeddings.embedder
    wavs = embedder.load_examples(sorted(folder.glob("*.wav")))
    reference = embedder(wavs).reshape(-1, 32).double().numpy()
    own = embedder(clips).double().numpy()
    expected = [-_fd_numpy(own[i], reference) for i in range(len(clips))]
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_text_and_tensor_exemplars_and_the_exemplar_cache(tmp_path, clips):
    """Fails if a .txt file is not embedded by the text tower (cross-modal exemplars), a tensor file is not
    loaded as embeddings, or the same source is embedded again by the same embedder."""
    captions = tmp_path / "exemplars.txt"
    captions.write_text("a fast plucked melody in a high register\n\na bright fast plucked string\n")
    embedder = build_embedder(CLAP)
    hits = EXEMPLAR_CACHE_STATS["hits"]
    texts = exemplar_embeddings(embedder, captions)
    torch.testing.assert_close(texts, embedder.embed_texts(["a fast plucked melody in a high register",
                                                            "a bright fast plucked string"]))
    assert exemplar_embeddings(embedder, captions) is texts and EXEMPLAR_CACHE_STATS["hits"] == hits + 1
    torch.save(texts, tmp_path / "exemplars.pt")
    similarity = build_reward("exemplar_similarity", embedder=embedder, exemplar_embeddings=str(tmp_path / "exemplars.pt"))
    direction = torch.nn.functional.normalize(texts.mean(0), dim=0)
    torch.testing.assert_close(similarity(clips).rewards, embedder(clips) @ direction, atol=1e-5, rtol=1e-5)


def test_bad_sources_and_embedder_specs_name_the_fix(tmp_path):
    """Fails if a typo in the embedder name, an unknown argument or a missing folder gives a bare KeyError /
    TypeError / FileNotFoundError instead of a RewardError saying what to pass."""
    with pytest.raises(RewardError, match="did you mean 'clap_audio'"):
        build_embedder({"name": "clap_audi"})
    with pytest.raises(RewardError, match="unknown arguments \\['window'\\]"):
        build_embedder({"name": "clap_audio", "kwargs": {"window": 1}})
    with pytest.raises(RewardError, match="does not exist"):
        build_reward("batch_fd", embedder=Patches(), reference_embeddings=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match="holds no audio files"):
        exemplar_embeddings(build_embedder(CLAP), tmp_path / "empty")


# -------------------------------------------------------------------- precomputed embeddings and the cache


def test_set_level_scores_of_precomputed_embeddings_agree_with_scoring_outputs():
    """Fails if score_embeddings and reward(outputs) disagree, the set FD is not over all B·F frames, the
    leave-one-out credit is not R(all) − R(all without i), or compare_sets has the wrong sign."""
    g = torch.Generator().manual_seed(1)
    reference = torch.rand(40, 3, 2, 2, generator=g, dtype=torch.float64)
    x = torch.rand(6, 3, 2, 2, generator=g, dtype=torch.float64) ** 2
    fd = build_reward("batch_fd", embedder=Patches(), reference_embeddings=Patches()(reference))
    emb = fd.embed(x)
    set_score = fd.set_score(emb)
    torch.testing.assert_close(fd(x).metadata["set_score"], set_score)
    points, ref_points = emb.reshape(-1, 3).numpy(), Patches()(reference).reshape(-1, 3).numpy()
    assert float(set_score) == pytest.approx(-_fd_numpy(points, ref_points), rel=1e-6)
    credit = fd.per_sample_credit(emb)
    brute = [float(set_score - fd(x[[j for j in range(6) if j != i]]).metadata["set_score"]) for i in range(6)]
    np.testing.assert_allclose(credit.numpy(), brute, rtol=1e-9, atol=1e-12)
    assert float(fd.compare_sets(emb[:3], emb[3:])) == pytest.approx(float(fd.set_score(emb[:3]) - fd.set_score(emb[3:])))


def test_the_cache_embeds_each_sample_once_across_batches_subsets_and_gathered_sets():
    """Fails if the cache is keyed by the batch object (a gathered copy or a subset would be embedded again),
    if different content collides, or if the hit and miss counts are wrong."""
    patches = Patches()
    cache = EmbeddingCache(patches)
    g = torch.Generator().manual_seed(2)
    first, second = (torch.rand(4, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    cache.embed(first)
    cache.embed(second)
    gathered = torch.cat([first, second])  # what a set score on every process's outputs sees
    emb = cache.embed(gathered)
    cache.embed(gathered[[5, 1, 2]])
    assert patches.calls == 2 and cache.misses == 8 and cache.hits == 11
    torch.testing.assert_close(emb, patches(gathered))
    changed = gathered.clone()
    changed[3, 0, 0, 0] += 1e-9  # one changed value is a new sample
    cache.embed(changed)
    assert cache.misses == 9 and cache.hits == 18
