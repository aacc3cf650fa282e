"""laion-clap .pt checkpoints -> transformers ClapModel (rewards.laion_clap), against laion-clap's own outputs.

The fixtures in tests/data/laion_clap/ were made by make_fixture.py with laion-clap's released model
code (CLAP, HTSAT_Swin_Transformer, AFF fusion, torchlibrosa front end, RobertaModel), built tiny;
reference.safetensors holds that code's outputs on fixed inputs. laion-clap is not needed here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from rewards import RewardError
from rewards.laion_clap import (
    EXTRAS_FILE,
    LaionClapError,
    convert_laion_clap,
    load_laion_clap_state_dict,
    main,
    to_laion_clap_state_dict,
)

# The tiny models' 128-point STFT leaves some of the extractor's HTK mel filters empty (real ones use 1024).
pytestmark = pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")

DATA = Path(__file__).parent / "data" / "laion_clap"
PLAIN_PT = DATA / "tiny_htsat.pt"
FUSION_PT = DATA / "tiny_htsat_fusion.pt"
# Conversion is exact arithmetic on the same float32 weights; only summation order differs.
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: a second thread only adds synchronisation (25x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "reference.safetensors"))


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((DATA / "reference.json").read_text())


@pytest.fixture(scope="module")
def plain():
    return convert_laion_clap(PLAIN_PT)


@pytest.fixture(scope="module")
def fused():
    # The fixture's 32-wide text encoder does not follow RoBERTa's 64 per head.
    return convert_laion_clap(FUSION_PT, text_num_heads=1)


def _recipe_waveforms(meta: dict) -> torch.Tensor:
    """The fixture's clips, from the same recipe function make_fixture.py used."""
    spec = importlib.util.spec_from_file_location("laion_make_fixture", DATA / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = meta["audio_cfg"]
    return torch.stack([module.waveform(k, p, cfg["clip_samples"], cfg["sample_rate"]) for k, p in meta["waveforms"]])


@torch.no_grad()
def _audio(model, features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
    """Projected, unnormalised audio embedding: laion's audio_projection(encode_audio(x)["embedding"])."""
    return model.audio_projection(model.audio_model(input_features=features, is_longer=is_longer).pooler_output)


@torch.no_grad()
def _text(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model.text_projection(model.text_model(input_ids=ids, attention_mask=mask).pooler_output)


def _max_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest absolute difference; NaN (e.g. a negative variance from swapped BatchNorm stats) counts as infinite."""
    return float(torch.nan_to_num((ours - theirs).abs(), nan=math.inf).max())


def _plain_error(model, ref) -> float:
    audio = _max_error(_audio(model, ref["plain.mel"]), ref["plain.audio_embeds"])
    text = _max_error(_text(model, ref["plain.input_ids"], ref["plain.attention_mask"]), ref["plain.text_embeds"])
    return max(audio, text)


def _fusion_error(model, ref, is_longer: torch.Tensor | None = None) -> float:
    longer = ref["fusion.longer"] if is_longer is None else is_longer
    return _max_error(_audio(model, ref["fusion.mel_fusion"].float(), longer), ref["fusion.audio_embeds"])


# ------------------------------------------------------------- (a) same outputs as laion-clap


def test_converted_model_reproduces_laion_embeddings(plain, ref, meta) -> None:
    """Same mel in, same embeddings out: catches any mis-mapped, mis-split or missing tensor."""
    audio = _audio(plain, ref["plain.mel"])
    text = _text(plain, ref["plain.input_ids"], ref["plain.attention_mask"])
    assert audio.shape == ref["plain.audio_embeds"].shape == (3, meta["joint_embed_shape"])
    torch.testing.assert_close(audio, ref["plain.audio_embeds"], atol=ATOL, rtol=0)
    torch.testing.assert_close(text, ref["plain.text_embeds"], atol=ATOL, rtol=0)
    # transformers' public feature methods return laion's normalised embeddings.
    with torch.no_grad():
        normed = plain.get_audio_features(input_features=ref["plain.mel"]).pooler_output
        normed_text = plain.get_text_features(
            input_ids=ref["plain.input_ids"], attention_mask=ref["plain.attention_mask"]
        ).pooler_output
    torch.testing.assert_close(normed, ref["plain.audio_embeds_normalized"], atol=ATOL, rtol=0)
    torch.testing.assert_close(normed_text, ref["plain.text_embeds_normalized"], atol=ATOL, rtol=0)
    # Separate audio/text temperatures, not swapped.
    assert plain.logit_scale_a.item() == meta["logit_scale_a"] and plain.logit_scale_t.item() == meta["logit_scale_t"]
    assert plain.laion_clap_arch.enable_fusion is False and plain.config.audio_config.enable_fusion is False


def test_converted_fusion_model_reproduces_laion_embeddings(fused, ref) -> None:
    """Fusion (aff_2d): long clips go through mel_conv2d + AFF, short ones skip it, as in laion's eval path."""
    assert fused.config.audio_config.enable_fusion is True
    assert _fusion_error(fused, ref) < ATOL
    short = _audio(fused, ref["fusion.mel_fusion"][[1, 0]].float(), torch.tensor([[False], [False]]))
    torch.testing.assert_close(short, ref["fusion.short_audio_embeds"], atol=ATOL, rtol=0)
    text = _text(fused, ref["fusion.input_ids"], ref["fusion.attention_mask"])
    torch.testing.assert_close(text, ref["fusion.text_embeds"], atol=ATOL, rtol=0)


def _swap(state: dict, a: str, b: str) -> None:
    state[a], state[b] = state[b].clone(), state[a].clone()


def _interleaved_qkv(state: dict) -> None:
    """The bug of splitting laion's qkv per channel (view(C, 3)) instead of in three blocks."""
    for key in [k for k in state if k.endswith("attention.self.query.weight")]:
        base = key[: -len("query.weight")]
        fused_w = torch.cat([state[base + p + ".weight"] for p in ("query", "key", "value")])
        for i, p in enumerate(("query", "key", "value")):
            state[base + p + ".weight"] = fused_w[i::3].clone()


MUTATIONS = {
    "qkv split per channel instead of in blocks": _interleaved_qkv,
    "query/key swapped": lambda s: _swap(
        s,
        "audio_model.audio_encoder.layers.0.blocks.0.attention.self.query.weight",
        "audio_model.audio_encoder.layers.0.blocks.0.attention.self.key.weight",
    ),
    "bn0 running mean/var swapped": lambda s: _swap(
        s, "audio_model.audio_encoder.batch_norm.running_mean", "audio_model.audio_encoder.batch_norm.running_var"
    ),
    "projection layers swapped": lambda s: _swap(
        s, "audio_projection.linear1.weight", "audio_projection.linear2.weight"
    ),
    "relative-position tables of the wrong block": lambda s: _swap(
        s,
        "audio_model.audio_encoder.layers.0.blocks.0.attention.self.relative_position_bias_table",
        "audio_model.audio_encoder.layers.0.blocks.1.attention.self.relative_position_bias_table",
    ),
    "norm1/norm2 swapped": lambda s: _swap(
        s,
        "audio_model.audio_encoder.layers.1.blocks.1.layernorm_before.weight",
        "audio_model.audio_encoder.layers.1.blocks.1.layernorm_after.weight",
    ),
    "text layers in the wrong order": lambda s: [
        _swap(s, k, k.replace("layer.0.", "layer.1.")) for k in list(s) if k.startswith("text_model.encoder.layer.0.")
    ],
    "pooler left at random init": lambda s: s.__setitem__(
        "text_model.pooler.dense.weight", torch.randn_like(s["text_model.pooler.dense.weight"])
    ),
}


@pytest.mark.parametrize("bug", sorted(MUTATIONS))
def test_reference_comparison_catches_mapping_bugs(plain, ref, bug: str) -> None:
    """Each named converter bug moves the embeddings far beyond the tolerance used above."""
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    MUTATIONS[bug](state)
    broken = type(plain)(plain.config).eval()
    broken.load_state_dict(state)
    assert _plain_error(broken, ref) > 100 * ATOL


def test_reference_comparison_catches_config_bugs(plain, fused, ref) -> None:
    # transformers' ClapTextConfig defaults to layer_norm_eps=1e-12; laion's roberta-base uses 1e-5.
    for module in plain.text_model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-12
    try:
        assert _plain_error(plain, ref) > 10 * ATOL  # ~8e-4 with these RoBERTa-scale (0.02) embeddings
    finally:
        for module in plain.text_model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = 1e-5
    assert _plain_error(plain, ref) < ATOL
    # A fusion model fed as if no clip were long (fusion flag / is_longer lost) no longer matches.
    assert _fusion_error(fused, ref, torch.zeros(3, 1, dtype=torch.bool)) > 100 * ATOL


def test_feature_extractor_matches_laion_front_end(plain, ref, meta, tmp_path: Path) -> None:
    """The written ClapFeatureExtractor (and ClapLogMel) compute laion's torchlibrosa log-mel from a waveform.

    laion's non-fusion model takes waveforms and makes its mel inside (STFT as float32 convolutions);
    transformers' extractor works in float64 numpy. Loud bins agree to ~2e-5 dB, the quietest
    (-100 dB floor region) to ~0.01 dB; the embeddings from the extractor's features stay within 1e-4.
    """
    from transformers import ClapFeatureExtractor

    from rewards.audio import ClapLogMel

    convert_laion_clap(PLAIN_PT, tmp_path / "hf")
    extractor = ClapFeatureExtractor.from_pretrained(str(tmp_path / "hf"))
    cfg = meta["audio_cfg"]
    assert (extractor.sampling_rate, extractor.hop_length, extractor.fft_window_size, extractor.feature_size) == (
        cfg["sample_rate"],
        cfg["hop_size"],
        cfg["window_size"],
        cfg["mel_bins"],
    )
    assert (extractor.frequency_min, extractor.frequency_max) == (cfg["fmin"], cfg["fmax"])
    assert extractor.truncation == "rand_trunc" and extractor.padding == "repeatpad"
    assert extractor.nb_max_samples == cfg["clip_samples"]  # 2 s: the longest whole second the tiny HTS-AT holds

    waves = _recipe_waveforms(meta)
    laion_mel = ref["plain.mel"]
    hf_mel = extractor(list(waves.double().numpy()), sampling_rate=cfg["sample_rate"], return_tensors="pt")[
        "input_features"
    ]
    ours, _ = ClapLogMel(extractor, fusion=False)(waves)
    for mel in (hf_mel, ours):
        assert mel.shape == laion_mel.shape
        err = (mel.float() - laion_mel).abs()
        assert err[laion_mel > -40].max() < 1e-3
        assert err.max() < 0.05
    torch.testing.assert_close(_audio(plain, hf_mel.float()), ref["plain.audio_embeds"], atol=1e-4, rtol=0)


def test_front_end_weights_must_match_the_written_extractor() -> None:
    """transformers' ClapFeatureExtractor defaults to frequency_min=0; laion uses 50 Hz. The melW check catches it."""
    with pytest.raises(LaionClapError, match=r"melW.*not the Slaney filter bank.*fmin=0"):
        convert_laion_clap(PLAIN_PT, audio_cfg={"fmin": 0})
    with pytest.raises(LaionClapError, match="STFT kernels are 128 long"):
        convert_laion_clap(PLAIN_PT, audio_cfg={"window_size": 1024})


# ------------------------------------------------------------- (b) exact round trip


@pytest.mark.parametrize("checkpoint,kwargs", [(PLAIN_PT, {}), (FUSION_PT, {"text_num_heads": 1})])
def test_round_trip_is_exact(checkpoint: Path, kwargs: dict, tmp_path: Path) -> None:
    """to_laion_clap_state_dict(convert(x)) == x: same keys in the same order, same dtypes, same values."""
    from transformers import ClapModel

    original = load_laion_clap_state_dict(checkpoint)
    model = convert_laion_clap(checkpoint, tmp_path / "hf", **kwargs)
    for back in (
        to_laion_clap_state_dict(model),
        # From the saved folder: weights from model.safetensors, the rest from laion_clap_extras.safetensors.
        to_laion_clap_state_dict(ClapModel.from_pretrained(str(tmp_path / "hf")), extras=tmp_path / "hf"),
    ):
        assert list(back) == list(original)
        for key, value in original.items():
            assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    # Without the extras only the tensors ClapModel has no place for are absent.
    bare = to_laion_clap_state_dict(ClapModel.from_pretrained(str(tmp_path / "hf")))
    assert set(original) - set(bare) == set(model.laion_clap_extras)
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in model.laion_clap_extras} == {
        "audio_branch.spectrogram_extractor",
        "audio_branch.logmel_extractor",
        "audio_branch.tscam_conv",
        "audio_branch.head",
        "text_transform.sequential",
        "audio_transform.sequential",
    }
    assert (tmp_path / "hf" / EXTRAS_FILE).is_file()


def test_bare_and_wrapped_checkpoints_load_alike(tmp_path: Path) -> None:
    """{'state_dict': {'module.*'}} (training checkpoint, DDP) and a bare state dict give the same model."""
    wrapped = torch.load(PLAIN_PT, map_location="cpu", weights_only=True)
    assert set(wrapped) == {"epoch", "name", "state_dict"} and all(
        k.startswith("module.") for k in wrapped["state_dict"]
    )
    bare = load_laion_clap_state_dict(PLAIN_PT)
    torch.save(bare, tmp_path / "bare.pt")
    a, b = convert_laion_clap(PLAIN_PT).state_dict(), convert_laion_clap(tmp_path / "bare.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------- (c) clear errors


def _save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def test_transformers_state_dict_is_rejected_by_name(plain, tmp_path: Path) -> None:
    path = _save(plain.state_dict(), tmp_path / "hf_state.pt")
    with pytest.raises(LaionClapError) as info:
        convert_laion_clap(path)
    message = str(info.value)
    assert "not a laion-clap CLAP checkpoint" in message
    assert "audio_branch.patch_embed.proj.weight" in message  # an expected key it lacks
    assert "audio_model.*" in message and "text_model.*" in message  # the prefixes it has
    assert "transformers ClapModel state dict" in message


@pytest.mark.parametrize(
    "state,needle",
    [
        ({"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(2)}, r"foo\.\* \(1\), bar\.\* \(1\)"),
        ({"visual.conv1.weight": torch.zeros(2), "token_embedding.weight": torch.zeros(2)}, "open_clip"),
    ],
)
def test_foreign_state_dicts_are_rejected(state: dict, needle: str, tmp_path: Path) -> None:
    with pytest.raises(LaionClapError, match=needle):
        convert_laion_clap(_save(state, tmp_path / "x.pt"))


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path: Path) -> None:
    state = load_laion_clap_state_dict(PLAIN_PT)
    del state["audio_projection.2.weight"]
    state["audio_branch.layers.0.blocks.0.attn.extra_scale"] = torch.ones(1)
    state["text_projection.0.weight"] = torch.zeros(16, 63)
    with pytest.raises(LaionClapError) as info:
        convert_laion_clap(_save(state, tmp_path / "bad.pt"))
    message = str(info.value)
    assert "1 missing keys (audio_projection.2.weight)" in message
    unplaced = "no place in the inferred layout (audio_branch.layers.0.blocks.0.attn.extra_scale) — not dropped"
    assert unplaced in message
    assert "text_projection.0.weight (16, 63) (expected (16, 64))" in message


def test_geometry_buffers_are_checked(tmp_path: Path) -> None:
    """A shifted-window mask that is not the one for the inferred spectrogram size fails, naming it."""
    state = load_laion_clap_state_dict(PLAIN_PT)
    state["audio_branch.layers.1.blocks.1.attn_mask"] = torch.zeros_like(
        state["audio_branch.layers.1.blocks.1.attn_mask"]
    )
    with pytest.raises(LaionClapError, match=r"layers\.1\.blocks\.1\.attn_mask .*spectrogram size 64, window 4"):
        convert_laion_clap(_save(state, tmp_path / "mask.pt"))


def test_unsupported_encoders_and_contradicting_arguments(tmp_path: Path) -> None:
    with pytest.raises(LaionClapError, match=r"unknown audio encoder amodel='PANN-14'.*HTSAT-tiny"):
        convert_laion_clap(PLAIN_PT, amodel="PANN-14")
    with pytest.raises(
        LaionClapError, match=r"amodel='HTSAT-tiny' has patch width 96 and depths \[2, 2, 6, 2\].*width 4"
    ):
        convert_laion_clap(PLAIN_PT, amodel="HTSAT-tiny")
    with pytest.raises(LaionClapError, match="enable_fusion=True but the checkpoint has no fusion weights"):
        convert_laion_clap(PLAIN_PT, enable_fusion=True)
    with pytest.raises(LaionClapError, match="enable_fusion=False but the checkpoint has fusion weights"):
        convert_laion_clap(FUSION_PT, enable_fusion=False, text_num_heads=1)
    with pytest.raises(LaionClapError, match="32 wide.*pass text_num_heads"):
        convert_laion_clap(FUSION_PT)
    state = load_laion_clap_state_dict(FUSION_PT)
    state["audio_branch.patch_embed.fusion_model.local_att2.0.weight"] = torch.zeros(1, 4, 1, 1)
    with pytest.raises(LaionClapError, match="iaff_2d"):
        convert_laion_clap(_save(state, tmp_path / "iaff.pt"), text_num_heads=1)
    pann = {
        "audio_branch.conv_block1.conv1.weight": torch.zeros(1),
        "text_branch.embeddings.word_embeddings.weight": torch.zeros(1),
    }
    with pytest.raises(LaionClapError, match="PANN"):
        convert_laion_clap(_save(pann, tmp_path / "pann.pt"))


def test_files_needing_full_unpickling_are_refused(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": load_laion_clap_state_dict(PLAIN_PT), "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(LaionClapError, match="weights_only=True"):
        convert_laion_clap(path)
    with pytest.raises(LaionClapError, match="does not exist"):
        convert_laion_clap(tmp_path / "nope.pt")


# ------------------------------------------------------------- (d) ClapScore and the CLI


def _tiny_tokenizer(folder: Path) -> Path:
    """A byte-level BPE saved as RoBERTa tokenizer files (the fixture's text encoder has 300 ids)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    captions = ["a low piano melody", "a fast high violin tune", "slow deep drums", "bright flute notes"]
    bpe.train_from_iterator(
        captions * 4, vocab_size=300, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    folder.mkdir(parents=True)
    bpe.save_model(str(folder))
    return folder


def test_clap_score_loads_a_laion_checkpoint_path(ref, meta, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rewards.laion_clap as laion_clap
    from rewards.audio import ClapScore

    monkeypatch.setattr(laion_clap, "_cached_roberta_tokenizer", lambda: None)  # whatever this machine's HF cache holds
    pt = tmp_path / "tiny_htsat.pt"
    shutil.copy(PLAIN_PT, pt)
    with pytest.raises(RewardError, match=r"no tokenizer inside.*tokenizer"):
        ClapScore(model=str(pt), sampling_rate=16_000)
    _tiny_tokenizer(tmp_path / "tokenizer")

    # At the model's own rate, ClapScore's embeddings of the recipe clips are laion-clap's.
    native = ClapScore(model=str(pt), sampling_rate=meta["audio_cfg"]["sample_rate"])
    cache = tmp_path / "tiny_htsat.transformers"
    assert (cache / "config.json").is_file() and (cache / "tokenizer_config.json").is_file()
    assert native.tokenizer.model_max_length == 38  # laion's 77-token limit, capped by the tiny 40 positions
    with torch.no_grad():
        emb = native.embed_audio(_recipe_waveforms(meta))
    torch.testing.assert_close(emb, ref["plain.audio_embeds_normalized"], atol=1e-4, rtol=0)

    stamp = (cache / "config.json").stat().st_mtime_ns
    reward = ClapScore(model=str(pt), sampling_rate=16_000)  # the cached conversion is reused
    assert (cache / "config.json").stat().st_mtime_ns == stamp
    t = torch.arange(16_000, dtype=torch.float64) / 16_000
    waves = torch.stack([0.5 * torch.sin(2 * math.pi * f * t) for f in (440.0, 1500.0)]).float()
    out = reward(waves, ["a low piano melody", "bright flute notes"])
    assert out.rewards.shape == (2,) and torch.isfinite(out.rewards).all() and out.rewards.abs().max() <= 1

    os.utime(pt, ns=(stamp + 10**9, stamp + 10**9))  # a changed checkpoint is converted again
    ClapScore(model=str(pt), sampling_rate=16_000)
    assert (cache / "config.json").stat().st_mtime_ns != stamp


def test_conversion_cache_falls_back_to_a_temp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only checkpoint folder: the conversion goes to $TMPDIR/genalign-laion-clap/ instead."""
    import tempfile

    import rewards.laion_clap as laion_clap

    shared = tmp_path / "read-only"
    shared.mkdir()
    shutil.copy(PLAIN_PT, shared / "tiny_htsat.pt")
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(prefix: str = "", dir: str | None = None) -> str:  # noqa: A002 - tempfile's signature
        if dir is not None and Path(dir) == shared:
            raise PermissionError(13, "Permission denied", dir)  # tests run as root: chmod would not stop them
        return real_mkdtemp(prefix=prefix, dir=dir)

    monkeypatch.setattr(laion_clap.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(laion_clap.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    folder = laion_clap.converted_folder(shared / "tiny_htsat.pt", tokenizer=_tiny_tokenizer(tmp_path / "tok"))
    assert folder.parent == tmp_path / "tmp" / "genalign-laion-clap" and (folder / "model.safetensors").is_file()
    assert not (shared / "tiny_htsat.transformers").exists()
    assert laion_clap.converted_folder(shared / "tiny_htsat.pt") == folder  # found again without a tokenizer
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no half-written temporary folders left


def test_cli_writes_a_loadable_folder(ref, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import ClapModel, ClapProcessor

    tokenizer = _tiny_tokenizer(tmp_path / "tok")
    assert main([str(PLAIN_PT), str(tmp_path / "out"), "--tokenizer", str(tokenizer)]) == 0
    assert "kept 15 laion-only tensors" in capsys.readouterr().out
    processor = ClapProcessor.from_pretrained(str(tmp_path / "out"))
    model = ClapModel.from_pretrained(str(tmp_path / "out")).eval()
    assert processor.feature_extractor.truncation == "rand_trunc"
    torch.testing.assert_close(_audio(model, ref["plain.mel"]), ref["plain.audio_embeds"], atol=ATOL, rtol=0)
    tokens = processor.tokenizer(["a low piano melody"], return_tensors="pt")
    assert F.normalize(_text(model, tokens["input_ids"], tokens["attention_mask"]), dim=-1).shape == (1, 16)

    assert main([str(tmp_path / "missing.pt"), str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
