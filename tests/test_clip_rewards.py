"""CLIP-family rewards on tiny random models saved in the public checkpoints' file layouts.

Every reward is built from local paths, which is exactly what a hub id becomes after download; the hub
branch itself is exercised by stubbing `hf_hub_download` (no network is ever attempted).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

import rewards.clip_rewards as cr
from genalign.worlds.tiny import character_clip_tokenizer
from rewards import REWARDS, RewardError, build_reward
from rewards.ensemble import stochastic_variance

TINY_OPEN_CLIP = "test-tiny-ViT"
PROMPTS = ["a red circle", "a blue square", "two green stars"]
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------ fixtures: tiny checkpoints


def _tiny_hf_clip(attention_dropout: float = 0.0):
    """A random tiny transformers CLIPModel, its character tokenizer and a 32-pixel image processor."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    torch.manual_seed(0)
    tokenizer = character_clip_tokenizer(model_max_length=16)
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=attention_dropout,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
        attention_dropout=attention_dropout,
    )
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, tokenizer, processor


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory) -> dict[str, Path]:
    """A tiny transformers CLIPModel saved three ways: everything in one folder (the openai/clip-*
    layout), weights only (PickScore_v1), and tokenizer + image processor only (laion/CLIP-ViT-H-14)."""
    model, tokenizer, processor = _tiny_hf_clip()
    root = tmp_path_factory.mktemp("hf-clip")
    paths = {"full": root / "clip", "weights": root / "pickscore", "processor": root / "processor"}
    for key in ("full", "weights"):
        model.save_pretrained(paths[key])
    for key in ("full", "processor"):
        tokenizer.save_pretrained(paths[key])
        processor.save_pretrained(paths[key])
    return paths


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny open_clip ViT registered as TINY_OPEN_CLIP, saved as a plain state dict (open_clip hub
    layout), as an HPS checkpoint ({"state_dict": ...}), plus a random aesthetic head `.pth`."""
    import open_clip

    root = tmp_path_factory.mktemp("open-clip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    config_file = root / f"{TINY_OPEN_CLIP}.json"
    config_file.write_text(json.dumps(config))
    open_clip.add_model_config(config_file)

    torch.manual_seed(1)
    state = open_clip.create_model(TINY_OPEN_CLIP).state_dict()
    clip_file = root / "open_clip_pytorch_model.bin"
    torch.save(state, clip_file)
    hps_dir = root / "hps"
    hps_dir.mkdir()
    hps_file = hps_dir / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": state}, hps_file)

    # The released head's layout: Linear layers at Sequential indices 0, 2, 4, 6, 7 (dropouts between).
    widths = [(config["embed_dim"], 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    head = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), widths, strict=True):
        layer = torch.nn.Linear(fan_in, fan_out)
        head[f"layers.{index}.weight"], head[f"layers.{index}.bias"] = layer.weight.detach(), layer.bias.detach()
    head_file = root / cr.AESTHETIC_HEAD_FILENAME
    torch.save(head, head_file)
    return {"clip": clip_file, "hps": hps_file, "head": head_file}


@pytest.fixture
def images() -> torch.Tensor:
    # Away from 0 and 1 so that small gradient steps never hit the clamp.
    return 0.2 + 0.6 * torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


# ------------------------------------------------------------------ helpers


def _reference_pixels(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CLIP eval transform on tensors: bicubic shortest-side resize, crop, normalise."""
    x = TF.resize(x, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.normalize(TF.center_crop(x, [size, size]), OPENAI_MEAN, OPENAI_STD)


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected feature.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _hf_cosine(model_dir: Path, processor_dir: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine via the public CLIPModel API, independent of the reward; also returns logit_scale.exp()."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    tokens = AutoTokenizer.from_pretrained(processor_dir)(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = _features(model.get_image_features(pixel_values=_reference_pixels(x, 32)))
        text = _features(model.get_text_features(**tokens))
    return F.cosine_similarity(image, text, dim=-1), model.logit_scale.exp().detach()


def _open_clip_reference(checkpoint: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image and text embeddings from open_clip's own loader and tokenizer."""
    import open_clip

    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=str(checkpoint)).eval()
    with torch.no_grad():
        image = model.encode_image(_reference_pixels(x, 32), normalize=True)
        text = model.encode_text(open_clip.get_tokenizer(TINY_OPEN_CLIP)(PROMPTS), normalize=True)
    return image, text


def _check_gradient_ascent(reward, images: torch.Tensor, prompts, steps: int = 4, lr: float = 0.5) -> None:
    """Gradients reach the pixels, are finite and non-zero, and following them raises every score."""
    x = images.clone().requires_grad_(True)
    start = reward(x, prompts).rewards
    (grad,) = torch.autograd.grad(start.sum(), x)
    assert torch.isfinite(grad).all()
    assert (grad.flatten(1).abs().sum(dim=1) > 0).all()
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(reward(x, prompts).rewards.sum(), x)
        step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        x = (x + lr * step).clamp(0, 1)
    with torch.no_grad():
        end = reward(x, prompts).rewards
    assert (end > start.detach()).all(), (start, end)


def _stub_hub(monkeypatch, files: dict[tuple[str, str], Path]) -> list[tuple[str, str]]:
    """Replace the hub download: known (repo, filename) pairs resolve to local files, others fail."""
    calls: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str, local_files_only: bool = False) -> str:
        calls.append((repo_id, filename))
        if (repo_id, filename) in files:
            return str(files[(repo_id, filename)])
        raise FileNotFoundError(f"{repo_id}/{filename} is not available offline")

    monkeypatch.setattr(cr, "hf_hub_download", fake_download)
    return calls


# ------------------------------------------------------------------ shared behaviour


def test_registered_and_differentiable():
    for name, cls in [("clip_score", cr.ClipScore), ("pickscore", cr.PickScore),
                      ("laion_aesthetic", cr.LaionAesthetic), ("hpsv2", cr.HPSv2)]:
        assert REWARDS[name] is cls
        assert cls.differentiable and cls.modality == "image"


def test_preprocess_matches_torchvision_on_non_square_images():
    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    spec = cr.ImageInputSpec(resize=32, crop=(32, 32), mean=OPENAI_MEAN, std=OPENAI_STD)
    torch.testing.assert_close(cr.clip_preprocess(x, spec), _reference_pixels(x, 32), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ clip_score


def test_clip_score_matches_clip_model(hf_clip, images):
    reward = cr.ClipScore(model=str(hf_clip["full"]))
    out = reward(images, PROMPTS).rewards
    cosine, _ = _hf_cosine(hf_clip["full"], hf_clip["full"], images)
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, (100 * cosine).clamp(min=0), atol=1e-4, rtol=1e-4)
    raw = cr.ClipScore(model=str(hf_clip["full"]), raw=True)
    torch.testing.assert_close(raw(images, PROMPTS).rewards, cosine, atol=1e-6, rtol=1e-5)


def test_clip_score_gradients_raise_the_score(hf_clip, images):
    # raw cosine: the clipped score of a random model may sit at 0, where its gradient vanishes.
    _check_gradient_ascent(cr.ClipScore(model=str(hf_clip["full"]), raw=True), images, PROMPTS)


def test_clip_score_dtype_and_frozen(hf_clip, images):
    # dtype as a YAML config writes it
    reward = cr.ClipScore(model=str(hf_clip["full"]), raw=True, dtype="bfloat16", device="cpu")
    assert next(reward.model.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in reward.parameters())
    reward.train()
    assert not reward.model.training
    out = reward(images, PROMPTS).rewards
    assert out.dtype == torch.float32
    reference = cr.ClipScore(model=str(hf_clip["full"]), raw=True)(images, PROMPTS).rewards
    torch.testing.assert_close(out, reference, atol=0.05, rtol=0)


def test_mc_dropout_reaches_the_frozen_clip(tmp_path, images):
    """stochastic_variance turns on CLIP's attention dropout, which ClipScore.train() keeps off."""
    model, tokenizer, processor = _tiny_hf_clip(attention_dropout=0.3)
    for part in (model, tokenizer, processor):
        part.save_pretrained(tmp_path)
    reward = cr.ClipScore(str(tmp_path), raw=True)
    reward.train()
    assert not any(m.training for m in reward.model.modules()), "normal use stays in eval mode"
    modes = {name: m.training for name, m in reward.named_modules()}
    deterministic = reward(images, PROMPTS).rewards
    torch.manual_seed(0)
    with torch.no_grad():
        mean, variance = stochastic_variance(reward, images, PROMPTS, passes=4)
    assert mean.shape == variance.shape == (3,)
    assert (variance > 0).all()
    assert {name: m.training for name, m in reward.named_modules()} == modes
    torch.testing.assert_close(reward(images, PROMPTS).rewards, deterministic, rtol=0, atol=0)


def test_clip_score_requires_prompts(hf_clip, images):
    reward = cr.ClipScore(model=str(hf_clip["full"]))
    with pytest.raises(RewardError, match="prompts are required"):
        reward(images)


def test_clip_score_load_errors_name_the_checkpoint(tmp_path):
    missing = str(tmp_path / "no" / "such" / "clip")
    with pytest.raises(RewardError, match="local path") as info:
        cr.ClipScore(model=missing)
    assert missing in str(info.value)
    with pytest.raises(RewardError, match="local path") as info:
        cr.ClipScore(model="genalign-test/no-such-clip", local_files_only=True)
    assert "genalign-test/no-such-clip" in str(info.value)


# ------------------------------------------------------------------ pickscore


def test_pickscore_split_layout_matches_reference(hf_clip, images):
    reward = build_reward("pickscore", model=str(hf_clip["weights"]), processor=str(hf_clip["processor"]))
    out = reward(images, PROMPTS).rewards
    cosine, scale = _hf_cosine(hf_clip["weights"], hf_clip["processor"], images)
    assert out.shape == (3,) and torch.isfinite(out).all()
    torch.testing.assert_close(out, scale * cosine, atol=1e-4, rtol=1e-4)
    _check_gradient_ascent(reward, images, PROMPTS)
    with pytest.raises(RewardError, match="prompts are required"):
        reward(images)


def test_pickscore_processor_errors_name_the_processor(hf_clip):
    with pytest.raises(RewardError, match="local path") as info:
        cr.PickScore(model=str(hf_clip["weights"]), processor="genalign-test/no-such-processor",
                     local_files_only=True)
    assert "PickScore processor 'genalign-test/no-such-processor'" in str(info.value)


# ------------------------------------------------------------------ laion_aesthetic


def test_aesthetic_matches_reference_and_loads_head_from_hub(open_clip_files, images, monkeypatch):
    calls = _stub_hub(monkeypatch, {(cr.DEFAULT_AESTHETIC_HEAD, cr.AESTHETIC_HEAD_FILENAME): open_clip_files["head"]})
    reward = cr.LaionAesthetic(clip_model=TINY_OPEN_CLIP, clip_pretrained=str(open_clip_files["clip"]))
    assert calls == [(cr.DEFAULT_AESTHETIC_HEAD, cr.AESTHETIC_HEAD_FILENAME)]
    out = reward(images).rewards
    embedding, _ = _open_clip_reference(open_clip_files["clip"], images)
    head = torch.load(open_clip_files["head"], weights_only=True)
    h = embedding
    for index in (0, 2, 4, 6, 7):  # linear layers only: the released head has no activations
        h = F.linear(h, head[f"layers.{index}.weight"], head[f"layers.{index}.bias"])
    assert out.shape == (3,) and torch.isfinite(out).all()
    torch.testing.assert_close(out, h.squeeze(-1), atol=1e-5, rtol=1e-4)
    reward.train()
    assert not reward.head.training  # dropout stays off
    _check_gradient_ascent(reward, images, None)


def test_aesthetic_builds_local_openai_weights_with_quick_gelu(open_clip_files, images, monkeypatch, tmp_path):
    """OpenAI's CLIPs use QuickGELU: a local copy of the weights the 'openai' tag points to must be
    built the way the tag builds it, not with plain ViT-L-14's GELU (the docs example's path)."""
    import open_clip
    from open_clip.transformer import QuickGELU

    assert open_clip.get_pretrained_cfg("ViT-L-14", "openai")["quick_gelu"] is True
    # Give the tiny architecture an 'openai' tag as ViT-L-14 has one.
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED, TINY_OPEN_CLIP, {"openai": {"hf_hub": "genalign-test/tiny-openai/", "quick_gelu": True}}
    )
    clip_file, head = str(open_clip_files["clip"]), str(open_clip_files["head"])
    reward = cr.LaionAesthetic(clip_model=TINY_OPEN_CLIP, clip_pretrained=clip_file, head=head)
    assert any(isinstance(m, QuickGELU) for m in reward.model.modules())

    pixels = cr.clip_preprocess(images, reward.image_spec)
    with torch.no_grad():
        quick = open_clip.create_model(TINY_OPEN_CLIP, pretrained=clip_file, force_quick_gelu=True).eval()
        gelu = open_clip.create_model(TINY_OPEN_CLIP, pretrained=clip_file).eval()
        quick_embedding = quick.encode_image(pixels, normalize=True)
        gelu_embedding = gelu.encode_image(pixels, normalize=True)
        torch.testing.assert_close(reward.model.encode_image(pixels, normalize=True), quick_embedding)
        with_quick, with_gelu = reward.head(quick_embedding), reward.head(gelu_embedding)
    assert (quick_embedding - gelu_embedding).abs().max() > 1e-3, "the activation changes the embedding"
    torch.testing.assert_close(reward(images).rewards, with_quick, atol=1e-6, rtol=1e-6)

    # GELU-trained weights with one's own head: quick_gelu=False.
    plain = cr.LaionAesthetic(clip_model=TINY_OPEN_CLIP, clip_pretrained=clip_file, head=head, quick_gelu=False)
    assert not any(isinstance(m, QuickGELU) for m in plain.model.modules())
    torch.testing.assert_close(plain(images).rewards, with_gelu, atol=1e-6, rtol=1e-6)
    # ... which a '-quickgelu' architecture cannot honour: one error naming the fix.
    config = json.loads((open_clip_files["clip"].parent / f"{TINY_OPEN_CLIP}.json").read_text())
    quick_file = tmp_path / f"{TINY_OPEN_CLIP}-quickgelu.json"
    quick_file.write_text(json.dumps({**config, "quick_gelu": True}))
    open_clip.add_model_config(quick_file)
    with pytest.raises(RewardError, match="without '-quickgelu'"):
        cr.LaionAesthetic(clip_model=f"{TINY_OPEN_CLIP}-quickgelu", clip_pretrained=clip_file, head=head, quick_gelu=False)


def test_aesthetic_load_errors(open_clip_files, monkeypatch, tmp_path):
    with pytest.raises(RewardError, match="local path") as info:
        cr.LaionAesthetic(clip_model=TINY_OPEN_CLIP, clip_pretrained=str(open_clip_files["clip"]),
                          head=str(tmp_path / "missing" / "head.pth"))
    assert "LAION aesthetic head" in str(info.value)
    with pytest.raises(RewardError, match="local path") as info:
        cr.LaionAesthetic(clip_model=TINY_OPEN_CLIP, clip_pretrained=str(open_clip_files["clip"]),
                          head="genalign-test/no-such-head", local_files_only=True)
    assert "genalign-test/no-such-head" in str(info.value)
    # The default tag resolves to its hub file (safetensors first); no network is attempted here.
    calls = _stub_hub(monkeypatch, {})
    with pytest.raises(RewardError, match="local path") as info:
        cr.LaionAesthetic()
    repo = "timm/vit_large_patch14_clip_224.openai"
    assert calls == [(repo, "open_clip_model.safetensors"), (repo, "open_clip_pytorch_model.bin")]
    assert repo in str(info.value) and "tag 'openai'" in str(info.value)


# ------------------------------------------------------------------ hpsv2


def test_hpsv2_matches_reference_from_file_folder_and_hub(open_clip_files, images, monkeypatch):
    reward = cr.HPSv2(checkpoint=str(open_clip_files["hps"]), clip_model=TINY_OPEN_CLIP)
    out = reward(images, PROMPTS).rewards
    image, text = _open_clip_reference(open_clip_files["hps"], images)
    assert out.shape == (3,) and torch.isfinite(out).all()
    torch.testing.assert_close(out, (image * text).sum(-1), atol=1e-5, rtol=1e-4)

    from_folder = build_reward("hpsv2", checkpoint=str(open_clip_files["hps"].parent), clip_model=TINY_OPEN_CLIP)
    torch.testing.assert_close(from_folder(images, PROMPTS).rewards, out)

    calls = _stub_hub(monkeypatch, {(cr.DEFAULT_HPS_CHECKPOINT, "HPS_v2.1_compressed.pt"): open_clip_files["hps"]})
    from_hub = cr.HPSv2(clip_model=TINY_OPEN_CLIP)
    assert calls == [(cr.DEFAULT_HPS_CHECKPOINT, "HPS_v2.1_compressed.pt")]
    torch.testing.assert_close(from_hub(images, PROMPTS).rewards, out)

    _check_gradient_ascent(reward, images, PROMPTS)
    with pytest.raises(RewardError, match="prompts are required"):
        reward(images)


def test_hpsv2_load_errors(open_clip_files, monkeypatch, tmp_path):
    missing = str(tmp_path / "nowhere" / "HPS_v2.1_compressed.pt")
    with pytest.raises(RewardError, match="local path") as info:
        cr.HPSv2(checkpoint=missing, clip_model=TINY_OPEN_CLIP)
    assert missing in str(info.value)
    with pytest.raises(RewardError, match="local path") as info:
        cr.HPSv2(checkpoint="genalign-test/no-such-hps", clip_model=TINY_OPEN_CLIP, local_files_only=True)
    assert "HPS v2.1 checkpoint 'genalign-test/no-such-hps'" in str(info.value)
    calls = _stub_hub(monkeypatch, {})
    with pytest.raises(RewardError, match="local path"):
        cr.HPSv2(version="v2.0", clip_model=TINY_OPEN_CLIP)
    assert calls == [(cr.DEFAULT_HPS_CHECKPOINT, "HPS_v2_compressed.pt")]
    with pytest.raises(RewardError, match="unknown HPS version"):
        cr.HPSv2(version="v3", clip_model=TINY_OPEN_CLIP)
    with pytest.raises(RewardError, match="floating-point dtype"):
        cr.HPSv2(checkpoint=str(open_clip_files["hps"]), clip_model=TINY_OPEN_CLIP, dtype="int8")
    with pytest.raises(RewardError, match="open_clip architecture"):
        cr.HPSv2(checkpoint=str(open_clip_files["hps"]), clip_model="no-such-architecture")


def _directional_fd_check(reward, images: torch.Tensor, prompts, eps: float = 1e-2) -> None:
    """Autograd's directional derivative equals a central finite difference along random directions."""
    x = images.clone().clamp(0.1, 0.9).requires_grad_(True)
    (grad,) = torch.autograd.grad(reward(x, prompts).rewards.sum(), x)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(x.shape, generator=gen)
        v = v / v.norm()
        with torch.no_grad():
            plus = reward(x + eps * v, prompts).rewards.sum()
            minus = reward(x - eps * v, prompts).rewards.sum()
        numeric = (plus - minus) / (2 * eps)
        analytic = (grad * v).sum()
        assert torch.isclose(analytic, numeric, rtol=0.05, atol=1e-4 * max(1.0, float(analytic.abs()))), (
            analytic,
            numeric,
        )


def test_gradients_match_finite_differences(hf_clip, open_clip_files, images, monkeypatch):
    _directional_fd_check(cr.ClipScore(model=str(hf_clip["full"]), raw=True), images, PROMPTS)
    _stub_hub(monkeypatch, {(cr.DEFAULT_AESTHETIC_HEAD, cr.AESTHETIC_HEAD_FILENAME): open_clip_files["head"]})
    aesthetic = cr.LaionAesthetic(clip_model=TINY_OPEN_CLIP, clip_pretrained=str(open_clip_files["clip"]))
    _directional_fd_check(aesthetic, images, None)
