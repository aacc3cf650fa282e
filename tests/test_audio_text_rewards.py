"""CLAP audio reward (tiny local checkpoint) and MiniLM text rewards (the real packaged model)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards import RewardError, build_reward
from rewards.audio import ClapLogMel, ClapScore, resample
from rewards.ensemble import stochastic_variance
from rewards.text import TextDiversity, TextSimilarity, packaged_minilm_path

SR = 16_000
CAPTIONS = [
    "a low piano melody",
    "a fast high violin tune",
    "slow deep drums",
    "bright flute notes",
    "a calm organ chord",
    "a plucked guitar line",
]


def _tones(freqs: list[float], seconds: float, sr: int = SR) -> torch.Tensor:
    """``[len(freqs), T]`` sines at amplitude 0.5, float32."""
    t = torch.arange(int(seconds * sr), dtype=torch.float64) / sr
    return torch.stack([0.5 * torch.sin(2 * math.pi * f * t) for f in freqs]).float()


def _assert_features_match(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Log-mel (dB) agreement with the extractor.

    The extractor stores its FFT as complex64, so bins far below a frame's peak
    carry float32 rounding in both implementations; loud bins agree tightly.
    """
    assert ours.shape == ref.shape
    err = (ours - ref).abs()
    assert err[ref > -40].max() < 1e-4
    assert (err / ref.abs().clamp_min(1.0)).max() < 1e-3


@pytest.fixture(scope="module")
def tiny_clap_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny ClapModel + ClapProcessor saved as a normal transformers folder."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapProcessor,
        RobertaTokenizerFast,
    )

    root = tmp_path_factory.mktemp("clap")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CAPTIONS * 4, vocab_size=300, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    (root / "bpe").mkdir()
    bpe.save_model(str(root / "bpe"))
    # RoBERTa positions start after the padding index, so stay below 40 - 2.
    tokenizer = RobertaTokenizerFast.from_pretrained(str(root / "bpe"), model_max_length=32)
    config = ClapConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 40,
        },
        audio_config={
            "spec_size": 64,
            "num_mel_bins": 32,
            "window_size": 4,
            "patch_size": 4,
            "patch_stride": (4, 4),
            "depths": [1, 1],
            "num_attention_heads": [2, 2],
            "patch_embeds_hidden_size": 16,
            "hidden_size": 16 * 2 ** (2 - 1),  # patch_embeds_hidden_size * 2^(len(depths) - 1)
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = ClapModel(config)
    # 1 s clips at 16 kHz, 32 mel bins: 101 frames, within the 64 * 2 the tiny HTSAT accepts.
    extractor = ClapFeatureExtractor(
        feature_size=32,
        sampling_rate=SR,
        hop_length=160,
        max_length_s=1,
        fft_window_size=512,
        frequency_min=50,
        frequency_max=8000,
        truncation="rand_trunc",
    )
    folder = root / "tiny-clap"
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(str(folder))
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def clap(tiny_clap_dir: Path) -> ClapScore:
    return ClapScore(str(tiny_clap_dir), sampling_rate=SR)


@pytest.fixture
def extractor(tiny_clap_dir: Path):
    """A fresh ClapFeatureExtractor per test (tests change its padding)."""
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor.from_pretrained(str(tiny_clap_dir))


# ------------------------------------------------------------------ audio


def test_resample_is_band_limited_and_accurate() -> None:
    t = torch.arange(SR, dtype=torch.float64) / SR
    tone = torch.sin(2 * math.pi * 440 * t)
    for new_sr in (48_000, 44_100, 8_000):
        out = resample(tone, SR, new_sr)
        assert out.shape == (new_sr,)
        expected = torch.sin(2 * math.pi * 440 * torch.arange(new_sr, dtype=torch.float64) / new_sr)
        edge = new_sr // 50  # zero padding beyond the clip attenuates the first/last few ms
        assert (out - expected)[edge:-edge].abs().max() < 1e-3
    # A 6 kHz tone is above the 4 kHz Nyquist rate of 8 kHz audio: it must vanish, not alias.
    assert resample(torch.sin(2 * math.pi * 6000 * t), SR, 8_000)[200:-200].abs().max() < 1e-3
    batch = torch.randn(2, 3, 1000)
    assert resample(batch, SR, 48_000).shape == (2, 3, 3000)


@pytest.mark.parametrize("padding", ["repeatpad", "repeat", "pad"])
def test_torch_log_mel_matches_feature_extractor(extractor, padding: str) -> None:
    """ClapLogMel reproduces ClapFeatureExtractor(truncation='rand_trunc') for short and exact clips."""
    extractor.padding = padding
    features = ClapLogMel(extractor, fusion=False)
    torch.manual_seed(0)
    for seconds in (0.3, 0.75, 1.0):
        clips = _tones([440.0, 1000.0], seconds) + 0.05 * torch.randn(2, int(seconds * SR))
        ours, is_longer = features(clips)
        ref = extractor(
            list(clips.double().numpy()), sampling_rate=SR, truncation="rand_trunc", padding=padding, return_tensors="pt"
        )["input_features"]
        assert ours.shape == (2, 1, 101, 32) and not is_longer.any()
        _assert_features_match(ours, ref)


def test_torch_log_mel_long_clips_are_centre_cropped(extractor) -> None:
    clip = _tones([330.0], 1.6)
    ours, _ = ClapLogMel(extractor, fusion=False)(clip)
    start = (clip.shape[1] - SR) // 2
    ref = extractor(list(clip[:, start : start + SR].numpy()), sampling_rate=SR, truncation="rand_trunc", return_tensors="pt")
    _assert_features_match(ours, ref["input_features"])


def test_fusion_features(extractor) -> None:
    """Fusion models get 4-channel input: copies for short clips, overview + 3 crops for long ones."""
    features = ClapLogMel(extractor, fusion=True)
    torch.manual_seed(0)
    short = 0.3 * torch.randn(2, 9000)
    ours, is_longer = features(short)
    ref = extractor(list(short.double().numpy()), sampling_rate=SR, truncation="fusion", return_tensors="pt")
    assert ours.shape == (2, 4, 101, 32) and not is_longer.any()
    _assert_features_match(ours, ref["input_features"])

    long = 0.3 * torch.randn(2, 40_000)  # 251 frames -> crop starts in 0..150, thirds' middles 25, 76, 126
    ours, is_longer = features(long)
    assert ours.shape == (2, 4, 101, 32) and is_longer.all()
    # Reference mel of the whole clip (HTK filters), via the extractor's own helper.
    full = torch.tensor(
        np.stack([extractor._np_extract_fbank_features(w, extractor.mel_filters) for w in long.double().numpy()])
    ).float()
    for channel, start in zip((1, 2, 3), (25, 76, 126)):
        _assert_features_match(ours[:, channel], full[:, start : start + 101])
    overview = torch.nn.functional.interpolate(full[:, None], size=(101, 32), mode="bilinear", align_corners=False)
    _assert_features_match(ours[:, 0], overview[:, 0])


def test_clap_score_equals_model_on_extractor_features(clap: ClapScore, extractor, tiny_clap_dir: Path) -> None:
    from transformers import AutoTokenizer, ClapModel

    waves = _tones([440.0, 1500.0], 0.75)
    prompts = ["a low piano melody", "bright flute notes"]
    out = clap(waves, prompts)
    assert out.rewards.shape == (2,) and torch.isfinite(out.rewards).all()
    assert clap.describe()["differentiable"] is True

    model = ClapModel.from_pretrained(str(tiny_clap_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_clap_dir))
    inputs = extractor(list(waves.numpy()), sampling_rate=SR, truncation="rand_trunc", return_tensors="pt")
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        audio = model.get_audio_features(input_features=inputs["input_features"], is_longer=inputs["is_longer"])
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    audio, text = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (audio, text))
    expected = torch.nn.functional.cosine_similarity(audio, text, dim=-1)
    torch.testing.assert_close(out.rewards, expected, atol=1e-4, rtol=0)

    # The registry builds the same reward; train() must not unfreeze BatchNorm/dropout.
    built = build_reward("clap_score", model=str(tiny_clap_dir), sampling_rate=SR)
    built.train()
    assert not built.model.training
    torch.testing.assert_close(built(waves, prompts).rewards, out.rewards)


def test_mc_dropout_reaches_clap_and_leaves_batch_norm_alone(clap: ClapScore) -> None:
    """MC dropout switches CLAP's text dropout on (ClapScore.train() keeps it off) but not its BatchNorm."""
    waves = _tones([440.0, 1500.0], 0.75)
    prompts = ["a low piano melody", "bright flute notes"]
    clap.train()
    assert not any(m.training for m in clap.model.modules()), "normal use stays in eval mode"
    norms = [m for m in clap.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms, "the tiny HTSAT has a BatchNorm2d"
    stats = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in norms]
    modes = {name: m.training for name, m in clap.named_modules()}
    deterministic = clap(waves, prompts).rewards
    torch.manual_seed(0)
    with torch.no_grad():
        mean, variance = stochastic_variance(clap, waves, prompts, passes=4)
    assert mean.shape == variance.shape == (2,)
    assert (variance > 0).all()
    for m, (running_mean, running_var, tracked) in zip(norms, stats, strict=True):
        assert torch.equal(m.running_mean, running_mean) and torch.equal(m.running_var, running_var)
        assert int(m.num_batches_tracked) == tracked
    assert {name: m.training for name, m in clap.named_modules()} == modes
    torch.testing.assert_close(clap(waves, prompts).rewards, deterministic, rtol=0, atol=0)


def test_clap_score_gradients_reach_waveform(tiny_clap_dir: Path) -> None:
    """Stereo 8 kHz input: down-mix, resampling and the log-mel all stay in the graph."""
    reward = ClapScore(str(tiny_clap_dir), sampling_rate=8_000)
    waves = _tones([220.0, 660.0], 0.5, sr=8_000)[:, None].repeat(1, 2, 1).requires_grad_(True)  # [2, 2, T]
    out = reward(waves, ["slow deep drums", "a fast high violin tune"])
    out.rewards.sum().backward()
    assert waves.grad is not None and torch.isfinite(waves.grad).all()
    assert waves.grad.abs().sum() > 0


def test_clap_score_resampling_is_consistent(clap: ClapScore, tiny_clap_dir: Path) -> None:
    """The same tone at 8 kHz (resampled inside) and 16 kHz scores nearly the same."""
    low_rate = ClapScore(str(tiny_clap_dir), sampling_rate=8_000)
    prompts = ["a calm organ chord", "a plucked guitar line"]
    direct = clap(_tones([440.0, 880.0], 0.75), prompts).rewards
    resampled = low_rate(_tones([440.0, 880.0], 0.75, sr=8_000), prompts).rewards
    assert (direct - resampled).abs().max() < 2e-2


def test_clap_score_errors(clap: ClapScore, tmp_path: Path, tiny_clap_dir: Path) -> None:
    with pytest.raises(RewardError, match="expects audio"):
        clap(torch.rand(2, 3, 8, 8), ["a", "b"])  # images
    with pytest.raises(RewardError, match="one prompt"):
        clap(_tones([440.0, 880.0], 0.2))
    with pytest.raises(RewardError, match="32768"):
        clap(_tones([440.0, 880.0], 0.2) * 30000, ["a", "b"])  # int16-scale PCM
    missing = tmp_path / "no-such-clap"
    with pytest.raises(RewardError, match="does not exist") as info:
        ClapScore(str(missing), sampling_rate=SR)
    assert str(missing) in str(info.value) and "model=" in str(info.value)
    with pytest.raises(RewardError, match="sampling_rate"):
        ClapScore(str(tiny_clap_dir))
    with pytest.raises(RewardError, match="common divisor"):
        ClapScore(str(tiny_clap_dir), sampling_rate=44_101)


# ------------------------------------------------------------------- text


@pytest.fixture(scope="module")
def similarity() -> TextSimilarity:
    return TextSimilarity()


@pytest.fixture(scope="module")
def diversity() -> TextDiversity:
    return TextDiversity()


def test_packaged_minilm_loads_offline(similarity: TextSimilarity) -> None:
    folder = packaged_minilm_path()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    emb = similarity.embed_texts(["a cat sits on the mat", "stock market report", "hello"])
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_embeddings_match_sentence_transformers(similarity: TextSimilarity) -> None:
    st = pytest.importorskip("sentence_transformers")
    texts = ["a cat sits on the mat", "Quarterly stock market report, with a long appendix of tables."]
    reference = st.SentenceTransformer(str(packaged_minilm_path()), device="cpu").encode(
        texts, convert_to_tensor=True, normalize_embeddings=True
    )
    torch.testing.assert_close(similarity.embed_texts(texts), reference.float().cpu(), atol=1e-5, rtol=0)


def test_text_similarity_has_real_semantics(similarity: TextSimilarity) -> None:
    out = similarity(["a kitten on a rug", "stock market report"], ["a cat sits on the mat"] * 2)
    assert out.rewards.shape == (2,)
    assert out.rewards[0] > out.rewards[1] + 0.3

    fixed = TextSimilarity(target="a cat sits on the mat")
    torch.testing.assert_close(fixed(["a kitten on a rug", "stock market report"]).rewards, out.rewards)
    # A list target is a reference set: the score is the mean similarity to its members.
    pair = TextSimilarity(target=["a cat sits on the mat", "stock market report"])
    emb = similarity.embed_texts(["a kitten on a rug", "a cat sits on the mat", "stock market report"])
    torch.testing.assert_close(pair(["a kitten on a rug"]).rewards, (emb[1:] @ emb[0]).mean()[None])


def test_mc_dropout_reaches_the_text_encoder(similarity: TextSimilarity) -> None:
    """MC dropout switches MiniLM's dropout on although SentenceEmbedder.train() keeps it off."""
    texts, targets = ["a kitten on a rug", "stock market report"], ["a cat sits on the mat"] * 2
    similarity.train()
    assert not any(m.training for m in similarity.embedder.encoder.modules())
    modes = {name: m.training for name, m in similarity.named_modules()}
    deterministic = similarity(texts, targets).rewards
    torch.manual_seed(0)
    mean, variance = stochastic_variance(similarity, texts, targets, passes=3)
    assert mean.shape == variance.shape == (2,)
    assert (variance > 0).all()
    assert {name: m.training for name, m in similarity.named_modules()} == modes
    torch.testing.assert_close(similarity(texts, targets).rewards, deterministic, rtol=0, atol=0)


def test_text_diversity(diversity: TextDiversity) -> None:
    same = diversity(["a cat sits on the mat"] * 3)
    varied = diversity(["a cat sits on the mat", "stock market report", "how to bake sourdough bread"])
    assert same.rewards.shape == varied.rewards.shape == (3,)
    assert same.rewards[0] < 0.01
    assert varied.rewards[0] > 0.5
    assert torch.all(varied.rewards == varied.rewards[0])
    credit = varied.metadata["per_sample_credit"]
    assert credit.shape == (3,)
    torch.testing.assert_close(credit.mean(), varied.rewards[0])
    # The odd one out earns the most credit.
    odd = diversity(["a cat sits on the mat", "a kitten on a rug", "stock market report"])
    assert int(odd.metadata["per_sample_credit"].argmax()) == 2


def test_text_reward_errors(similarity: TextSimilarity, diversity: TextDiversity) -> None:
    with pytest.raises(RewardError, match="condition"):
        similarity(["a kitten on a rug"])
    with pytest.raises(RewardError, match="batch_decode"):
        similarity(torch.ones(2, 5, dtype=torch.long), ["a", "b"])
    with pytest.raises(RewardError, match="at least 2"):
        diversity(["only one"])
    with pytest.raises(RewardError, match="target"):
        TextSimilarity(target=[])
    with pytest.raises(RewardError, match="single string"):
        diversity("not a list")
