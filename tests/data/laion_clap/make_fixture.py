"""Recreate the tiny laion-clap fixtures in this folder with laion-clap's OWN model code.

Needs the optional `laion-clap` package, which is not a genalign dependency (it pulls 49 packages
and downgrades numpy). Install it into a throwaway virtual environment that reuses this torch,
for example::

    python -m venv /tmp/laion-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/laion-venv/lib/python3.11/site-packages/zz_main.pth
    /tmp/laion-venv/bin/pip install --no-deps laion-clap==1.1.7
    /tmp/laion-venv/bin/pip install -c <(echo numpy==$(.venv/bin/python -c 'import numpy; print(numpy.__version__)')) \
        torchlibrosa librosa h5py
    OMP_NUM_THREADS=1 /tmp/laion-venv/bin/python tests/data/laion_clap/make_fixture.py

(its other imports, scikit-learn, torchvision, timm and ftfy, come from genalign's environment).
Seeded: with laion-clap 1.1.7 and torch 2.14.1 the files come out byte-identical.

Only `clap_module` is imported (laion_clap/__init__ imports its training code, which downloads
tokenizers at import time). laion's constructors hard-code full sizes (HTSAT-tiny in
`create_htsat_model`, `RobertaModel.from_pretrained('roberta-base')` and a 768-wide text
projection), so the script swaps in laion's own classes built small: `HTSAT_Swin_Transformer`
with a 64x64 spectrogram "image", a 64-wide (fusion fixture: 32-wide) `RobertaModel`, and the
same Linear-ReLU-Linear text projection at that width. Everything else (the `CLAP` module, its
projections, transforms, logit scales, the torchlibrosa front end, Swin blocks, patch merging,
AFF fusion) is laion's code as released.

Writes:
    tiny_htsat.pt          non-fusion model, saved as a training checkpoint would be:
                           {"epoch", "name", "state_dict": {"module.<key>": tensor}}
    tiny_htsat_fusion.pt   fusion model (fusion_type "aff_2d", as CLAP_Module uses), saved as
                           a bare state dict without the DDP prefix
    reference.safetensors  inputs and laion-clap's outputs on them, computed by laion's forward:
                           plain.mel (the log-mel laion's front end made from the recipe's
                           waveforms, i.e. what its bn0 receives), plain.audio_embeds (projected,
                           not normalised), plain.audio_embeds_normalized, plain.input_ids /
                           attention_mask, plain.text_embeds(_normalized); fusion.mel_fusion
                           (float16 values, fed as float32), fusion.longer, fusion.audio_embeds,
                           fusion.short_audio_embeds (clips 1 and 0, a batch with no long clip),
                           fusion.input_ids / attention_mask, fusion.text_embeds
    reference.json         the audio settings, waveform recipe and library versions
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import sys
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import save_file
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 20240607

# laion's audio_cfg keys, at laion's values except where the model must be small: the STFT
# window (its conv kernels are stored in the checkpoint), the mel bins, the clip length (the
# tiny spectrogram holds 256 frames = 2.55 s at hop 480) and the AudioSet head's class count.
AUDIO_CFG = {
    "audio_length": 1024,
    "clip_samples": 96_000,
    "mel_bins": 16,
    "sample_rate": 48_000,
    "window_size": 128,
    "hop_size": 480,
    "fmin": 50,
    "fmax": 14_000,
    "class_num": 5,
    "model_type": "HTSAT",
    "model_name": "tiny",
}
HTSAT_KWARGS = {
    "spec_size": 64,
    "patch_size": 4,
    "patch_stride": (4, 4),
    "embed_dim": 4,
    "depths": [2, 2, 2],
    "num_heads": [1, 2, 2],
    "window_size": 4,
}
ROBERTA_KWARGS = {
    "vocab_size": 300,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,  # head size 64, the RoBERTa convention the converter assumes
    "intermediate_size": 64,
    "max_position_embeddings": 40,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-5,  # roberta-base's value (RobertaConfig() defaults to 1e-12)
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}
# The fusion fixture's text branch is smaller still (its test feeds token ids, no tokenizer). Its
# 32-wide hidden size breaks the 64-per-head convention: the converter needs text_num_heads=1.
FUSION_ROBERTA_KWARGS = {
    **ROBERTA_KWARGS,
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "intermediate_size": 32,
}
JOINT = 16
# Waveform recipe shared with tests/test_laion_clap.py: (kind, parameters) per clip, 2 s at 48 kHz.
WAVEFORMS = [
    ["sines", [[440.0, 0.3], [1200.0, 0.2]]],
    ["chirp", [200.0, 9000.0, 0.4]],
    ["burst", [3000.0, 0.5, 4.0]],
]
TEXT_LENGTHS = [12, 7, 4]


def waveform(kind: str, params: list, n: int, sr: int) -> torch.Tensor:
    """One deterministic test clip in float32 (computed in float64)."""
    t = torch.arange(n, dtype=torch.float64) / sr
    if kind == "sines":
        out = sum(a * torch.sin(2 * math.pi * f * t) for f, a in params)
    elif kind == "chirp":
        f0, f1, a = params
        duration = n / sr
        out = a * torch.sin(2 * math.pi * (f0 * t + (f1 - f0) * t**2 / (2 * duration)))
    elif kind == "burst":
        f, a, rate = params
        out = a * torch.sin(2 * math.pi * f * t) * torch.sin(math.pi * rate * t).abs()
    else:
        raise ValueError(kind)
    return out.float()


def import_clap_module():
    spec = importlib.util.find_spec("laion_clap")
    if spec is None or spec.origin is None:
        sys.exit("laion-clap is not installed in this interpreter; see this script's docstring")
    # hook.py does the same: laion's modules import `clap_module` as a top-level package.
    sys.path.insert(0, str(Path(spec.origin).parent))
    import clap_module.model as clap_model  # noqa: PLC0415
    from clap_module.htsat import HTSAT_Swin_Transformer  # noqa: PLC0415

    return clap_model, HTSAT_Swin_Transformer


def build(enable_fusion: bool, generator: torch.Generator) -> nn.Module:
    roberta_kwargs = FUSION_ROBERTA_KWARGS if enable_fusion else ROBERTA_KWARGS
    clap_model, htsat_cls = import_clap_module()
    from transformers import RobertaConfig, RobertaModel

    def tiny_htsat(audio_cfg, enable_fusion=False, fusion_type="None"):
        return htsat_cls(
            num_classes=audio_cfg.class_num,
            config=audio_cfg,
            enable_fusion=enable_fusion,
            fusion_type=fusion_type,
            **HTSAT_KWARGS,
        )

    def tiny_roberta(*_args, **_kwargs):
        return RobertaModel(RobertaConfig(**roberta_kwargs))

    text_cfg = {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 512,
        "heads": 8,
        "layers": 12,
        "model_type": "roberta",
    }
    embed_dim = HTSAT_KWARGS["embed_dim"] * 2 ** (len(HTSAT_KWARGS["depths"]) - 1)
    with (
        mock.patch.object(clap_model, "create_htsat_model", tiny_htsat),
        mock.patch.object(clap_model.RobertaModel, "from_pretrained", tiny_roberta),
    ):
        model = clap_model.CLAP(
            embed_dim=embed_dim,
            audio_cfg=dict(AUDIO_CFG),
            text_cfg=text_cfg,
            enable_fusion=enable_fusion,
            fusion_type="aff_2d" if enable_fusion else "None",
            joint_embed_shape=JOINT,
            mlp_act="relu",
        )
    # laion builds nn.Linear(768, joint) for roberta-base; the same layers at the tiny width.
    model.text_projection = nn.Sequential(
        nn.Linear(roberta_kwargs["hidden_size"], JOINT), nn.ReLU(), nn.Linear(JOINT, JOINT)
    )
    randomise(model, generator)
    return model.eval()


@torch.no_grad()
def randomise(model: nn.Module, g: torch.Generator) -> None:
    """Give every trained tensor a distinctive value, so that any mapping mistake shows.

    laion's initialisation leaves biases at 0, norms at (1, 0) and BatchNorm statistics at
    (0, 1): a converter that swapped or dropped them would still pass. The STFT and mel weights
    of the front end stay as torchlibrosa built them (they are fixed functions of the settings).
    """
    frozen = ("spectrogram_extractor", "logmel_extractor")
    for name, p in model.named_parameters():
        if any(part in name for part in frozen):
            continue
        if p.ndim == 0:
            continue  # logit scales: set below
        if p.ndim == 1 and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif "embeddings" in name:
            p.copy_(0.02 * torch.randn(p.shape, generator=g))  # RoBERTa-like scale: makes eps matter
        elif "relative_position_bias_table" in name:
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(0.3 * torch.randn(module.running_mean.shape, generator=g))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))
            module.num_batches_tracked.fill_(1234)
    model.logit_scale_a.fill_(2.5)
    model.logit_scale_t.fill_(3.25)


def text_inputs(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 7)
    width = max(TEXT_LENGTHS)
    ids = torch.full((len(TEXT_LENGTHS), width), ROBERTA_KWARGS["pad_token_id"], dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(TEXT_LENGTHS):
        ids[row, 0] = ROBERTA_KWARGS["bos_token_id"]
        ids[row, 1 : n - 1] = torch.randint(5, vocab_size, (n - 2,), generator=g)
        ids[row, n - 1] = ROBERTA_KWARGS["eos_token_id"]
        mask[row, :n] = 1
    return ids, mask


def check_strict_reload(state: dict[str, torch.Tensor], enable_fusion: bool) -> None:
    """The saved dict is exactly laion's layout: a fresh laion CLAP loads it with strict=True."""
    fresh = build(enable_fusion, torch.Generator().manual_seed(0))
    fresh.load_state_dict(state, strict=True)


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(SEED)
    ref: dict[str, torch.Tensor] = {}

    ids, mask = text_inputs(ROBERTA_KWARGS["vocab_size"])
    ref["plain.input_ids"], ref["plain.attention_mask"] = ids, mask

    # ---- non-fusion: laion's forward takes the waveform and runs its own torchlibrosa front end.
    plain = build(False, g)
    sr, n = AUDIO_CFG["sample_rate"], AUDIO_CFG["clip_samples"]
    wave = torch.stack([waveform(kind, params, n, sr) for kind, params in WAVEFORMS])
    captured = {}
    hook = plain.audio_branch.logmel_extractor.register_forward_hook(lambda m, i, o: captured.setdefault("mel", o))
    audio = plain({"waveform": wave}, None, device="cpu")  # = audio_projection(encode_audio(...)["embedding"])
    hook.remove()
    ref["plain.mel"] = captured["mel"].contiguous()  # [B, 1, frames, mel_bins]: what bn0 receives
    ref["plain.audio_embeds"] = audio
    ref["plain.audio_embeds_normalized"] = plain.get_audio_embedding([{"waveform": w} for w in wave])
    ref["plain.text_embeds"] = plain(None, {"input_ids": ids, "attention_mask": mask}, device="cpu")
    ref["plain.text_embeds_normalized"] = plain.get_text_embedding(
        {"input_ids": ids.clone(), "attention_mask": mask.clone()}
    )
    state = plain.state_dict()
    check_strict_reload(state, False)
    torch.save(
        {"epoch": 15, "name": "tiny-htsat-roberta", "state_dict": {f"module.{k}": v for k, v in state.items()}},
        HERE / "tiny_htsat.pt",
    )

    # ---- fusion: laion's fusion forward takes the 4-channel mel ("mel_fusion") and `longer`.
    fused = build(True, g)
    frames = n // AUDIO_CFG["hop_size"] + 1
    # Stored in float16 to keep the fixture small; both models get exactly these values in float32.
    mel_fusion = (-40.0 + 15.0 * torch.randn(3, 4, frames, AUDIO_CFG["mel_bins"], generator=g)).half()
    longer = torch.tensor([[True], [False], [True]])
    ref["fusion.mel_fusion"], ref["fusion.longer"] = mel_fusion, longer
    ref["fusion.audio_embeds"] = fused({"mel_fusion": mel_fusion.float(), "longer": longer}, None, device="cpu")
    # laion's eval path for a batch without long clips (the fusion branch is skipped): clips 1 and 0.
    short = {"mel_fusion": mel_fusion[[1, 0]].float(), "longer": torch.tensor([[False], [False]])}
    ref["fusion.short_audio_embeds"] = fused(short, None, device="cpu")
    ids, mask = text_inputs(FUSION_ROBERTA_KWARGS["vocab_size"])
    ref["fusion.input_ids"], ref["fusion.attention_mask"] = ids, mask
    ref["fusion.text_embeds"] = fused(None, {"input_ids": ids, "attention_mask": mask}, device="cpu")
    state = fused.state_dict()
    check_strict_reload(state, True)
    torch.save(state, HERE / "tiny_htsat_fusion.pt")

    save_file({k: v.contiguous() for k, v in ref.items()}, str(HERE / "reference.safetensors"))
    versions = {
        name: importlib.metadata.version(name)
        for name in ("laion_clap", "torch", "transformers", "torchlibrosa", "librosa")
    }
    meta = {
        "audio_cfg": AUDIO_CFG,
        "htsat": HTSAT_KWARGS,
        "roberta": ROBERTA_KWARGS,
        "fusion_roberta": FUSION_ROBERTA_KWARGS,
        "joint_embed_shape": JOINT,
        "waveforms": WAVEFORMS,
        "text_lengths": TEXT_LENGTHS,
        "logit_scale_a": 2.5,
        "logit_scale_t": 3.25,
        "generated_with": versions,
    }
    (HERE / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    for path in sorted(HERE.iterdir()):
        print(f"{path.name:26s} {path.stat().st_size / 1024:8.1f} KiB")


if __name__ == "__main__":
    main()
