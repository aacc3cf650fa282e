"""Convert laion-clap checkpoints (``.pt`` files) to transformers' ``ClapModel``, and back.

The `laion-clap` package trains and publishes CLAP as ``torch.save`` files
(``630k-audioset-best.pt``, ``630k-audioset-fusion-best.pt``,
``music_audioset_epoch_15_esc_90.14.pt``, ...): an HTS-AT (Swin) audio encoder,
a RoBERTa text encoder, two Linear-ReLU-Linear projections and two logit scales.
genalign does not depend on that package (it pulls 49 packages and downgrades
numpy); this module reads its files with ``torch.load(weights_only=True)`` and
writes a normal transformers folder that :class:`rewards.audio.ClapScore` (or
``ClapModel.from_pretrained``) loads.

API::

    model = convert_laion_clap("630k-audioset-best.pt")                  # -> ClapModel (eval mode)
    model = convert_laion_clap("630k-audioset-best.pt", "clap-hf",       # also writes the folder
                               tokenizer="path/to/roberta-base")
    state = to_laion_clap_state_dict(model)                              # laion-clap keys again

    python -m rewards.laion_clap CHECKPOINT.pt OUT_FOLDER --tokenizer ROBERTA_FOLDER

What is inferred, and from what (explicit arguments are checked against it):

* audio encoder: patch embedding width, depths, heads per stage, window size
  (relative-position tables), MLP ratio, mel bins (``bn0``), fusion (AFF 2-D
  weights present), AudioSet class count (``tscam_conv``), STFT size (the
  torchlibrosa front end), spectrogram "image" size (the shifted-window
  ``attn_mask`` buffers; 256 when none are stored). Names: HTSAT-tiny (96,
  2-2-6-2), HTSAT-base (128, 2-2-12-2), HTSAT-large (256, 2-2-12-2); other
  consistent geometries convert too (e.g. tiny test models).
* text encoder: vocabulary, width, layers, FFN width, positions, token types.
  Heads cannot be read from shapes: RoBERTa's 64 per head is assumed
  (``text_num_heads=`` overrides).
* audio features: laion's ``audio_cfg`` (48 kHz, hop 480, 50-14000 Hz; override
  with ``audio_cfg=``); the checkpoint's own mel filter bank and STFT kernels are
  compared with the ClapFeatureExtractor that is written, so a mismatch fails
  instead of silently feeding the model other features. The clip length is the
  longest whole number of seconds the spectrogram holds (10 s for HTSAT).

laion-clap tensors that ClapModel has no place for are kept, never dropped: the
AudioSet head (``tscam_conv``, ``head``), the training-only ``audio_transform``
/ ``text_transform`` MLPs, the torchlibrosa front end (transformers computes
features in its ClapFeatureExtractor) and a stored ``position_ids`` buffer.
They are attached to the returned model as ``model.laion_clap_extras`` and
written to ``laion_clap_extras.safetensors``; :func:`to_laion_clap_state_dict`
puts them back. Any other key, a missing key or a wrong shape raises
:class:`LaionClapError` naming the keys.

Only what transformers' ClapModel can represent converts: HTS-AT audio
encoders (not PANN), no fusion or ``aff_2d`` fusion (the released fusion
models; not ``iaff``, ``daf`` or 1-D fusion), RoBERTa text (not BERT, BART or
the CLIP-style transformer), ReLU projections (laion's default ``mlp_act``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import RewardError

__all__ = [
    "AUDIO_ENCODERS",
    "EXTRAS_FILE",
    "LAION_AUDIO_CFG",
    "LaionClapArch",
    "LaionClapError",
    "convert_laion_clap",
    "converted_folder",
    "find_tokenizer",
    "infer_laion_clap_arch",
    "load_laion_clap_extras",
    "load_laion_clap_state_dict",
    "to_laion_clap_state_dict",
]

# Bump when the folder layout or mapping changes: cached conversions are then redone.
CONVERTER_VERSION = 1
EXTRAS_FILE = "laion_clap_extras.safetensors"
STAMP_FILE = "laion_clap_conversion.json"

# laion-clap's audio_cfg for every HTSAT model config it ships (model_configs/HTSAT-*.json).
LAION_AUDIO_CFG: dict[str, Any] = {
    "sample_rate": 48_000,
    "window_size": 1024,
    "hop_size": 480,
    "mel_bins": 64,
    "fmin": 50,
    "fmax": 14_000,
}
# Fixed in laion's create_htsat_model for all sizes.
_HTSAT_SPEC_SIZE = 256
# (patch embedding width, depths) of laion's named HTSAT sizes (all use 4-8-16-32 heads).
AUDIO_ENCODERS: dict[str, tuple[int, tuple[int, ...]]] = {
    "HTSAT-tiny": (96, (2, 2, 6, 2)),
    "HTSAT-base": (128, (2, 2, 12, 2)),
    "HTSAT-large": (256, (2, 2, 12, 2)),
}
# laion tokenises with padding="max_length", max_length=77 (text_cfg.context_length).
_LAION_CONTEXT_LENGTH = 77
# roberta-base's config: laion-clap's text branch is RobertaModel.from_pretrained("roberta-base").
_ROBERTA = {"layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu"}
_ROBERTA_HEAD_SIZE = 64

_A = "audio_branch."
_HA = "audio_model.audio_encoder."
_T = "text_branch."
_HT = "text_model."
# Tensors ClapModel keeps for itself (rebuilt by transformers, never read from laion).
_HF_ONLY_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids", "attention.self.relative_position_index")


class LaionClapError(RewardError):
    """A file that cannot be converted to transformers' ClapModel; the message says why and what to do."""


# ------------------------------------------------------------------ helpers


def _some(keys: Iterable[str], n: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f" ... and {len(keys) - n} more" if len(keys) > n else "")


def _prefixes(keys: Iterable[str]) -> str:
    counts = Counter(k.split(".", 1)[0] + ("." if "." in k else "") for k in keys)
    return ", ".join(f"{p}* ({n})" for p, n in counts.most_common(12)) or "none (empty)"


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _numbers(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` at the start of the keys (layer / block indices)."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


def _stage_res(spec_size: int, patch: int, stage: int) -> int:
    return spec_size // patch // 2**stage


# ------------------------------------------------------------------ architecture


@dataclass(frozen=True)
class LaionClapArch:
    """Everything needed to build the ClapModel (and the key layout) for one laion-clap checkpoint."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    spec_size: int
    patch_size: int
    mel_bins: int
    mlp_ratio: float
    num_classes: int
    enable_fusion: bool
    aff_r: int
    qkv_bias: bool
    patch_norm: bool
    projection_dim: int
    text_vocab_size: int
    text_hidden_size: int
    text_layers: int
    text_heads: int
    text_intermediate_size: int
    text_max_positions: int
    text_type_vocab_size: int
    name: str | None = None  # the laion size it matches (HTSAT-tiny, ...), None for other geometries

    @property
    def audio_hidden_size(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def shifted(self, stage: int, block: int) -> bool:
        """Whether a block uses shifted windows (and so has an ``attn_mask``), as both laion and HF decide."""
        return block % 2 == 1 and _stage_res(self.spec_size, self.patch_size, stage) > self.window_size

    def clap_config(self) -> Any:
        from transformers import ClapConfig

        audio = {
            "window_size": self.window_size,
            "num_mel_bins": self.mel_bins,
            "spec_size": self.spec_size,
            "patch_size": self.patch_size,
            "patch_stride": [self.patch_size, self.patch_size],
            "num_classes": self.num_classes,
            "hidden_size": self.audio_hidden_size,
            "depths": list(self.depths),
            "num_attention_heads": list(self.num_heads),
            "enable_fusion": self.enable_fusion,
            "patch_embeds_hidden_size": self.embed_dim,
            "enable_patch_layer_norm": self.patch_norm,
            "qkv_bias": self.qkv_bias,
            "mlp_ratio": self.mlp_ratio,
            "aff_block_r": self.aff_r,
            "layer_norm_eps": 1e-5,  # nn.LayerNorm's default, which HTS-AT uses
        }
        text = {
            "vocab_size": self.text_vocab_size,
            "hidden_size": self.text_hidden_size,
            "num_hidden_layers": self.text_layers,
            "num_attention_heads": self.text_heads,
            "intermediate_size": self.text_intermediate_size,
            "max_position_embeddings": self.text_max_positions,
            "type_vocab_size": self.text_type_vocab_size,
            **_ROBERTA,
        }
        return ClapConfig(
            text_config=text, audio_config=audio, projection_dim=self.projection_dim, projection_hidden_act="relu"
        )

    @classmethod
    def from_clap_config(cls, config: Any) -> LaionClapArch:
        """The architecture of an existing ClapModel (for the laion-clap export).

        Raises:
            LaionClapError: a ClapModel laion-clap's CLAP class could not hold.
        """
        a, t = config.audio_config, config.text_config
        patch = a.patch_size if isinstance(a.patch_size, int) else int(a.patch_size[0])
        stride = [a.patch_stride] * 2 if isinstance(a.patch_stride, int) else [int(x) for x in a.patch_stride]
        checks = (
            ("audio patch_stride", stride, [patch, patch]),
            ("audio patch_embed_input_channels", a.patch_embed_input_channels, 1),
            ("audio fusion_type", "channel_map" if a.fusion_type == "channel_map" else "aff_2d", "aff_2d"),
            ("projection_hidden_act", config.projection_hidden_act, "relu"),
            ("audio hidden_act", a.hidden_act, "gelu"),
            ("text hidden_act", t.hidden_act, "gelu"),
        )
        problems = [f"{name}={value!r} (laion: {want!r})" for name, value, want in checks if value != want]
        if problems:
            raise LaionClapError(f"this ClapModel has no laion-clap equivalent: {', '.join(problems)}")
        return cls(
            embed_dim=int(a.patch_embeds_hidden_size),
            depths=tuple(int(d) for d in a.depths),
            num_heads=tuple(int(h) for h in a.num_attention_heads),
            window_size=int(a.window_size),
            spec_size=int(a.spec_size),
            patch_size=patch,
            mel_bins=int(a.num_mel_bins),
            mlp_ratio=float(a.mlp_ratio),
            num_classes=int(a.num_classes),
            enable_fusion=bool(a.enable_fusion),
            aff_r=int(a.aff_block_r),
            qkv_bias=bool(a.qkv_bias),
            patch_norm=bool(a.enable_patch_layer_norm),
            projection_dim=int(config.projection_dim),
            text_vocab_size=int(t.vocab_size),
            text_hidden_size=int(t.hidden_size),
            text_layers=int(t.num_hidden_layers),
            text_heads=int(t.num_attention_heads),
            text_intermediate_size=int(t.intermediate_size),
            text_max_positions=int(t.max_position_embeddings),
            text_type_vocab_size=int(t.type_vocab_size),
        )


# ------------------------------------------------------------------ key plan
#
# One ordered list describes both directions. Each entry names a laion-clap key and what it is:
#   ("map", laion_key, hf_key)               same tensor
#   ("qkv", laion_key, (hf_q, hf_k, hf_v))   laion's fused qkv = cat([query, key, value], dim=0)
#   ("derived", laion_key, kind)             a buffer both sides compute from the config (checked on import)
#   ("extra", laion_key, None)               no ClapModel counterpart: kept in laion_clap_extras
# in laion-clap's own state_dict order.


def _bn(laion: str, hf: str) -> list[tuple[str, str, Any]]:
    return [
        ("map", laion + s, hf + s)
        for s in (".weight", ".bias", ".running_mean", ".running_var", ".num_batches_tracked")
    ]


def _wb(laion: str, hf: str, bias: bool = True) -> list[tuple[str, str, Any]]:
    return [("map", laion + ".weight", hf + ".weight")] + ([("map", laion + ".bias", hf + ".bias")] if bias else [])


def _plan(arch: LaionClapArch) -> list[tuple[str, str, Any]]:
    plan: list[tuple[str, str, Any]] = [
        ("map", "logit_scale_a", "logit_scale_a"),
        ("map", "logit_scale_t", "logit_scale_t"),
        ("extra", _A + "spectrogram_extractor.stft.conv_real.weight", None),
        ("extra", _A + "spectrogram_extractor.stft.conv_imag.weight", None),
        ("extra", _A + "logmel_extractor.melW", None),
    ]
    plan += _bn(_A + "bn0", _HA + "batch_norm")
    plan += _wb(_A + "patch_embed.proj", _HA + "patch_embed.proj")
    if arch.patch_norm:
        plan += _wb(_A + "patch_embed.norm", _HA + "patch_embed.norm")
    if arch.enable_fusion:
        plan += _wb(_A + "patch_embed.mel_conv2d", _HA + "patch_embed.mel_conv2d")
        for branch, convs, bns in (("local_att", (0, 3), (1, 4)), ("global_att", (1, 4), (2, 5))):
            for conv, bn in zip(convs, bns):
                name = f"patch_embed.fusion_model.{branch}."
                plan += _wb(_A + name + str(conv), _HA + name + str(conv))
                plan += _bn(_A + name + str(bn), _HA + name + str(bn))
    for i, depth in enumerate(arch.depths):
        for j in range(depth):
            lb, hb = f"{_A}layers.{i}.blocks.{j}.", f"{_HA}layers.{i}.blocks.{j}."
            if arch.shifted(i, j):
                plan.append(("derived", lb + "attn_mask", "attn_mask"))
            plan += _wb(lb + "norm1", hb + "layernorm_before")
            plan.append(
                ("map", lb + "attn.relative_position_bias_table", hb + "attention.self.relative_position_bias_table")
            )
            plan.append(("derived", lb + "attn.relative_position_index", hb + "attention.self.relative_position_index"))
            qkv = tuple(hb + f"attention.self.{p}" for p in ("query", "key", "value"))
            plan.append(("qkv", lb + "attn.qkv.weight", tuple(q + ".weight" for q in qkv)))
            if arch.qkv_bias:
                plan.append(("qkv", lb + "attn.qkv.bias", tuple(q + ".bias" for q in qkv)))
            plan += _wb(lb + "attn.proj", hb + "attention.output.dense")
            plan += _wb(lb + "norm2", hb + "layernorm_after")
            plan += _wb(lb + "mlp.fc1", hb + "intermediate.dense")
            plan += _wb(lb + "mlp.fc2", hb + "output.dense")
        if i < len(arch.depths) - 1:
            ld, hd = f"{_A}layers.{i}.downsample.", f"{_HA}layers.{i}.downsample."
            plan += _wb(ld + "reduction", hd + "reduction", bias=False)
            plan += _wb(ld + "norm", hd + "norm")
    plan += _wb(_A + "norm", _HA + "norm")
    plan += [("extra", _A + k, None) for k in ("tscam_conv.weight", "tscam_conv.bias", "head.weight", "head.bias")]
    emb = "embeddings."
    plan += _wb(_T + emb + "word_embeddings", _HT + emb + "word_embeddings", bias=False)
    plan += _wb(_T + emb + "token_type_embeddings", _HT + emb + "token_type_embeddings", bias=False)
    plan += _wb(_T + emb + "LayerNorm", _HT + emb + "LayerNorm")
    plan += _wb(_T + emb + "position_embeddings", _HT + emb + "position_embeddings", bias=False)
    # Saved by the transformers versions laion-clap was trained with (a persistent buffer then).
    plan.append(("extra", _T + emb + "position_ids", None))
    for n in range(arch.text_layers):
        layer = f"encoder.layer.{n}."
        for part in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        ):
            plan += _wb(_T + layer + part, _HT + layer + part)
    plan += _wb(_T + "pooler.dense", _HT + "pooler.dense")
    plan += [("extra", f"text_transform.sequential.{i}.{p}", None) for i in (0, 3) for p in ("weight", "bias")]
    plan += _wb("text_projection.0", "text_projection.linear1") + _wb("text_projection.2", "text_projection.linear2")
    plan += [("extra", f"audio_transform.sequential.{i}.{p}", None) for i in (0, 3) for p in ("weight", "bias")]
    plan += _wb("audio_projection.0", "audio_projection.linear1") + _wb(
        "audio_projection.2", "audio_projection.linear2"
    )
    return plan


def _attn_mask(arch: LaionClapArch, stage: int) -> torch.Tensor:
    """laion's (and Swin's) shifted-window mask: 0 within a region, -100 across regions; [nW, w*w, w*w]."""
    res = _stage_res(arch.spec_size, arch.patch_size, stage)
    w, s = arch.window_size, arch.window_size // 2
    idx = torch.arange(res)
    region = (idx >= res - w).long() + (idx >= res - s).long()  # 0, 1, 2 along one axis
    labels = region[:, None] * 3 + region[None, :]  # [res, res]
    windows = labels.view(res // w, w, res // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
    differs = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(differs.shape, dtype=torch.float32).masked_fill(differs, -100.0)


# ------------------------------------------------------------------ loading


def load_laion_clap_state_dict(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict inside a laion-clap ``.pt`` file, ``module.`` prefix removed.

    Loads with ``torch.load(map_location="cpu", weights_only=True)``: no arbitrary
    objects are unpickled. Accepts laion's training checkpoints
    (``{"epoch", "name", "state_dict", "optimizer", ...}``) and bare state dicts.

    Raises:
        LaionClapError: missing file, a file that needs full unpickling, or no state dict inside.
    """
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise LaionClapError(f"laion-clap checkpoint {str(path)!r} does not exist (or is not a file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for objects, RuntimeError/zipfile errors for corrupt files
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch's message has terminal colour codes
        detail = text.splitlines()[0][:200] if text else "no details"
        raise LaionClapError(
            f"cannot read {str(path)!r} with torch.load(weights_only=True) ({type(exc).__name__}: {detail}). "
            f"genalign never unpickles arbitrary objects from third-party files; if the file is a trusted "
            f"checkpoint holding extra Python objects, re-save only its tensors on a machine you trust: "
            f"torch.save(torch.load(p, weights_only=False)['state_dict'], 'clean.pt')"
        ) from exc
    wrapped = isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)
    state = obj["state_dict"] if wrapped else obj
    if not isinstance(state, Mapping) or not state:
        top = f"keys {_some(map(str, obj))}" if isinstance(obj, Mapping) else type(obj).__name__
        raise LaionClapError(
            f"{str(path)!r} holds no state dict (found {top}); expected laion-clap's "
            f"{{'state_dict': {{...}}}} or a bare state dict of tensors"
        )
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        where = "its 'state_dict' has" if wrapped else "it has no 'state_dict' entry, and its top level has"
        raise LaionClapError(
            f"{str(path)!r}: {where} non-tensor entries ({_some(not_tensors)}); expected laion-clap's "
            f"{{'state_dict': {{name: tensor}}, 'epoch': ...}} or a bare {{name: tensor}} state dict"
        )
    keys = list(state)
    if all(k.startswith("module.") for k in keys):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _not_laion_hint(keys: list[str]) -> str:
    if any(k.startswith(("audio_model.", "text_model.")) for k in keys):
        return (
            " This looks like a transformers ClapModel state dict: save it as a folder "
            "(ClapModel.save_pretrained) and pass the folder instead."
        )
    if any(k.startswith(("visual.", "token_embedding.", "transformer.resblocks")) for k in keys):
        return " This looks like an open_clip/OpenAI CLIP (image-text) checkpoint, not laion-clap's audio CLAP."
    if any(k.startswith("model.") for k in keys):
        return " Keys start with 'model.': the CLAP state dict may be nested one level deeper."
    return ""


def infer_laion_clap_arch(
    state: Mapping[str, torch.Tensor],
    *,
    amodel: str | None = None,
    enable_fusion: bool | None = None,
    text_num_heads: int | None = None,
    spec_size: int | None = None,
) -> LaionClapArch:
    """Read the architecture from tensor shapes; explicit arguments are checked against them.

    Raises:
        LaionClapError: not a laion-clap CLAP state dict, an encoder ClapModel cannot
            represent, or an explicit argument that contradicts the shapes.
    """
    keys = list(state)
    expected = (
        _A + "patch_embed.proj.weight",
        _T + "embeddings.word_embeddings.weight",
        "audio_projection.0.weight",
        "text_projection.0.weight",
    )
    missing = [k for k in expected if k not in state]
    has_branches = any(k.startswith(_A) for k in keys) and any(k.startswith(_T) for k in keys)
    if not has_branches:
        raise LaionClapError(
            f"not a laion-clap CLAP checkpoint: expected keys such as {', '.join(expected)} are missing; "
            f"the keys found start with {_prefixes(keys)}.{_not_laion_hint(keys)}"
        )
    if amodel is not None and amodel not in AUDIO_ENCODERS:
        raise LaionClapError(
            f"unknown audio encoder amodel={amodel!r}; transformers' ClapModel has only the HTS-AT encoder, "
            f"in laion's sizes {', '.join(AUDIO_ENCODERS)} (or pass amodel=None to read the size from the shapes)"
        )
    if _A + "patch_embed.proj.weight" not in state:
        pann = any(k.startswith((_A + "conv_block", _A + "fc_audioset")) for k in keys)
        kind = "a PANN (CNN) audio encoder" if pann else "no HTS-AT patch embedding"
        raise LaionClapError(
            f"the laion-clap checkpoint has {kind} (audio_branch keys: {_some(k for k in keys if k.startswith(_A))}); "
            f"transformers' ClapModel only has the HTS-AT audio encoder (laion's HTSAT-tiny/base/large)"
        )
    if _T + "embeddings.word_embeddings.weight" not in state:
        if "token_embedding.weight" in state or any(k.startswith(_T + "resblocks") for k in keys):
            kind = "the CLIP-style 'transformer' text branch"
        elif _T + "shared.weight" in state:
            kind = "a BART text branch"
        else:
            kind = "an unknown text branch"
        raise LaionClapError(
            f"the laion-clap checkpoint has {kind} (text_branch keys: {_some(k for k in keys if k.startswith(_T))}); "
            f"transformers' ClapModel's text encoder is RoBERTa (laion's tmodel='roberta')"
        )
    if missing:
        raise LaionClapError(
            f"the laion-clap checkpoint lacks {', '.join(missing)}; found keys starting with {_prefixes(keys)}"
        )

    # ---- audio
    proj = state[_A + "patch_embed.proj.weight"]  # [embed, in_chans, p, p]
    embed, in_chans, ph, pw = _shape(proj)
    if in_chans != 1:
        raise LaionClapError(
            f"audio_branch.patch_embed.proj takes {in_chans} channels: laion's 'channel_map' fusion, which "
            f"transformers' ClapModel cannot run; only 'aff_2d' fusion (the released fusion models) converts"
        )
    if ph != pw:
        raise LaionClapError(f"non-square patch embedding {ph}x{pw}: not an HTS-AT layout ClapModel supports")
    if _A + "absolute_pos_embed" in state:
        raise LaionClapError("the audio encoder uses an absolute position embedding (ape=True), which ClapModel lacks")
    if any(k.startswith((_A + "mel_conv1d", _A + "fusion_model")) for k in keys):
        raise LaionClapError(
            "the checkpoint uses 1-D feature fusion (fusion_type '*_1d'); ClapModel implements only 'aff_2d'"
        )
    fusion_keys = [k for k in keys if k.startswith(_A + "patch_embed.") and ("mel_conv2d" in k or "fusion_model" in k)]
    has_fusion = bool(fusion_keys)
    if has_fusion:
        if any("local_att2" in k or "global_att2" in k for k in fusion_keys):
            raise LaionClapError(
                "the checkpoint uses 'iaff_2d' fusion (local_att2/global_att2); ClapModel implements only 'aff_2d'"
            )
        if not any("fusion_model" in k for k in fusion_keys):
            raise LaionClapError(
                "the checkpoint uses 'daf_2d' fusion (no fusion weights); ClapModel implements only 'aff_2d'"
            )
    if enable_fusion is not None and bool(enable_fusion) != has_fusion:
        raise LaionClapError(
            f"enable_fusion={enable_fusion} but the checkpoint {'has' if has_fusion else 'has no'} fusion weights "
            f"(audio_branch.patch_embed.mel_conv2d / fusion_model); converting would "
            f"{'drop' if has_fusion else 'invent'} them — leave enable_fusion=None to follow the file"
        )
    stages = _numbers(keys, r"audio_branch\.layers\.(\d+)\.")
    if stages != list(range(len(stages))) or not stages:
        raise LaionClapError(f"audio_branch.layers.* are not numbered 0..n-1 (found {stages})")
    depths, heads, windows = [], [], []
    for i in stages:
        blocks = _numbers(keys, rf"audio_branch\.layers\.{i}\.blocks\.(\d+)\.")
        if blocks != list(range(len(blocks))) or not blocks:
            raise LaionClapError(f"audio_branch.layers.{i}.blocks.* are not numbered 0..n-1 (found {blocks})")
        depths.append(len(blocks))
        table_key = f"{_A}layers.{i}.blocks.0.attn.relative_position_bias_table"
        if table_key not in state:
            raise LaionClapError(f"the laion-clap checkpoint lacks {table_key}")
        rows, n_heads = _shape(state[table_key])
        side = math.isqrt(rows)
        if side * side != rows or side % 2 == 0:
            raise LaionClapError(f"{table_key} has {rows} rows, not (2*window-1)^2 for any window")
        heads.append(n_heads)
        windows.append((side + 1) // 2)
    depths_t, heads_t = tuple(depths), tuple(heads)
    window = windows[0]
    fc1 = state.get(f"{_A}layers.0.blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise LaionClapError(f"the laion-clap checkpoint lacks {_A}layers.0.blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / embed
    if _A + "bn0.weight" not in state:
        raise LaionClapError(f"the laion-clap checkpoint lacks {_A}bn0.weight (the mel-bin BatchNorm)")
    mel_bins = int(state[_A + "bn0.weight"].shape[0])
    name = next((n for n, (e, d) in AUDIO_ENCODERS.items() if e == embed and d == depths_t), None)
    if amodel is not None and amodel != name:
        e, d = AUDIO_ENCODERS[amodel]
        raise LaionClapError(
            f"amodel={amodel!r} has patch width {e} and depths {list(d)}, but the checkpoint's audio encoder "
            f"has width {embed} and depths {list(depths_t)}"
            + (f" ({name})" if name else "")
            + " — pass the matching amodel or amodel=None"
        )
    # The spectrogram "image" size: from the shifted-window masks, which encode the first stages' sizes.
    inferred_spec = None
    for i, depth in enumerate(depths):
        key = f"{_A}layers.{i}.blocks.1.attn_mask"
        if depth > 1 and key in state:
            n_windows = int(state[key].shape[0])
            per_side = math.isqrt(n_windows)
            inferred_spec = per_side * window * 2**i * ph
            break
    if spec_size is not None and inferred_spec is not None and int(spec_size) != inferred_spec:
        raise LaionClapError(f"spec_size={spec_size} but the checkpoint's shifted-window masks imply {inferred_spec}")
    spec = int(spec_size) if spec_size is not None else (inferred_spec or _HTSAT_SPEC_SIZE)
    if spec % mel_bins:
        raise LaionClapError(f"spectrogram size {spec} is not a multiple of the {mel_bins} mel bins (HTS-AT needs it)")
    for i, w in enumerate(windows):
        if w != window:
            raise LaionClapError(
                f"audio stage {i} uses a {w}x{w} window where stage 0 uses {window}x{window}: laion clips the "
                f"window to small stages, but transformers' ClapModel sizes every relative-position table "
                f"by one window_size, so this geometry cannot be represented"
            )
        res = _stage_res(spec, ph, i)
        if res < window:
            raise LaionClapError(
                f"audio stage {i} is {res}x{res} patches, smaller than the {window}x{window} window: laion "
                f"would shrink the window, transformers' ClapModel cannot (spectrogram size {spec})"
            )
    aff_r = 4
    if has_fusion:
        inter = state.get(_A + "patch_embed.fusion_model.local_att.0.weight")
        if inter is None:
            raise LaionClapError(f"the fusion checkpoint lacks {_A}patch_embed.fusion_model.local_att.0.weight")
        aff_r = max(1, embed // int(inter.shape[0]))
    num_classes = int(state[_A + "tscam_conv.weight"].shape[0]) if _A + "tscam_conv.weight" in state else 527

    # ---- text
    word = state[_T + "embeddings.word_embeddings.weight"]
    vocab, hidden = _shape(word)
    token_types = state.get(_T + "embeddings.token_type_embeddings.weight")
    positions = state.get(_T + "embeddings.position_embeddings.weight")
    if positions is None or token_types is None:
        raise LaionClapError(
            f"the text branch lacks {_T}embeddings.position_embeddings/token_type_embeddings (not a RoBERTa layout)"
        )
    if token_types.shape[0] != 1:
        raise LaionClapError(
            f"the text branch has {token_types.shape[0]} token types: laion's BERT text branch (tmodel='bert'); "
            f"transformers' ClapModel's text encoder is RoBERTa (one token type, padding-offset positions)"
        )
    layers = _numbers(keys, r"text_branch\.encoder\.layer\.(\d+)\.")
    if layers != list(range(len(layers))):
        raise LaionClapError(f"text_branch.encoder.layer.* are not numbered 0..n-1 (found {layers})")
    inter_key = _T + "encoder.layer.0.intermediate.dense.weight"
    if not layers or inter_key not in state:
        raise LaionClapError(f"the text branch has no encoder layers ({inter_key} missing)")
    if text_num_heads is None:
        if hidden % _ROBERTA_HEAD_SIZE:
            raise LaionClapError(
                f"the text encoder is {hidden} wide: the number of attention heads cannot be read from the "
                f"weights and {hidden} is not a multiple of RoBERTa's head size {_ROBERTA_HEAD_SIZE}; pass "
                f"text_num_heads=N (roberta-base: 12)"
            )
        text_num_heads = hidden // _ROBERTA_HEAD_SIZE
    if text_num_heads <= 0 or hidden % text_num_heads:
        raise LaionClapError(f"text_num_heads={text_num_heads} does not divide the text width {hidden}")
    projection = int(state["audio_projection.0.weight"].shape[0])

    return LaionClapArch(
        embed_dim=embed,
        depths=depths_t,
        num_heads=heads_t,
        window_size=window,
        spec_size=spec,
        patch_size=ph,
        mel_bins=mel_bins,
        mlp_ratio=mlp_ratio,
        num_classes=num_classes,
        enable_fusion=has_fusion,
        aff_r=aff_r,
        qkv_bias=f"{_A}layers.0.blocks.0.attn.qkv.bias" in state,
        patch_norm=_A + "patch_embed.norm.weight" in state,
        projection_dim=projection,
        text_vocab_size=vocab,
        text_hidden_size=hidden,
        text_layers=len(layers),
        text_heads=int(text_num_heads),
        text_intermediate_size=int(state[inter_key].shape[0]),
        text_max_positions=int(positions.shape[0]),
        text_type_vocab_size=int(token_types.shape[0]),
        name=name,
    )


# ------------------------------------------------------------------ features


def _audio_settings(
    arch: LaionClapArch, state: Mapping[str, torch.Tensor], audio_cfg: Mapping[str, Any] | None
) -> dict[str, Any]:
    """laion's audio_cfg for this checkpoint: defaults, overrides, and what the front-end weights say."""
    cfg = dict(LAION_AUDIO_CFG)
    used = set(LAION_AUDIO_CFG) | {"clip_samples", "spec_size"}
    ignored = {"audio_length", "class_num", "model_type", "model_name"}  # laion keys the shapes already tell
    unknown = set(audio_cfg or {}) - used - ignored
    if unknown:
        raise LaionClapError(f"audio_cfg has unknown keys {sorted(unknown)}; it takes {sorted(used)}")
    cfg.update({k: v for k, v in (audio_cfg or {}).items() if k in LAION_AUDIO_CFG or k == "clip_samples"})
    if int(cfg["mel_bins"]) != arch.mel_bins:
        if audio_cfg and "mel_bins" in audio_cfg:
            raise LaionClapError(
                f"audio_cfg mel_bins={cfg['mel_bins']} but the checkpoint's bn0 has {arch.mel_bins} bins"
            )
        cfg["mel_bins"] = arch.mel_bins
    real = state.get(_A + "spectrogram_extractor.stft.conv_real.weight")
    if real is not None:
        n_fft = int(real.shape[-1])
        if audio_cfg and "window_size" in audio_cfg and int(audio_cfg["window_size"]) != n_fft:
            raise LaionClapError(
                f"audio_cfg window_size={audio_cfg['window_size']} but the checkpoint's STFT kernels are {n_fft} long"
            )
        cfg["window_size"] = n_fft
    sr, hop = int(cfg["sample_rate"]), int(cfg["hop_size"])
    max_frames = arch.spec_size * (arch.spec_size // arch.mel_bins)  # what reshape_mel2img accepts
    if "clip_samples" not in cfg:
        seconds = (max_frames - 1) * hop // sr  # the longest whole-second clip whose frames fit (10 s for HTSAT)
        if seconds < 1:
            raise LaionClapError(
                f"the spectrogram holds {max_frames} frames, less than one second at hop {hop} and {sr} Hz; "
                f"pass audio_cfg={{'clip_samples': ...}}"
            )
        cfg["clip_samples"] = seconds * sr
    clip = int(cfg["clip_samples"])
    if clip % sr:
        raise LaionClapError(
            f"clip_samples={clip} is not a whole number of seconds at {sr} Hz "
            f"(ClapFeatureExtractor counts whole seconds)"
        )
    if clip // hop + 1 > max_frames:
        raise LaionClapError(
            f"clips of {clip} samples give {clip // hop + 1} frames at hop {hop}, more than the {max_frames} the "
            f"audio encoder accepts (spectrogram size {arch.spec_size}, {arch.mel_bins} mel bins)"
        )
    return cfg


def _feature_extractor(arch: LaionClapArch, cfg: Mapping[str, Any]) -> Any:
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor(
        feature_size=int(cfg["mel_bins"]),
        sampling_rate=int(cfg["sample_rate"]),
        hop_length=int(cfg["hop_size"]),
        max_length_s=int(cfg["clip_samples"]) // int(cfg["sample_rate"]),
        fft_window_size=int(cfg["window_size"]),
        frequency_min=float(cfg["fmin"]),
        frequency_max=float(cfg["fmax"]),
        top_db=None,
        padding="repeatpad",  # laion's data_filling at inference (CLAP_Module.get_audio_embedding_*)
        truncation="fusion" if arch.enable_fusion else "rand_trunc",
    )


def _check_front_end(state: Mapping[str, torch.Tensor], extractor: Any, cfg: Mapping[str, Any]) -> None:
    """The checkpoint's torchlibrosa STFT kernels and mel filters must be the extractor's."""
    settings = (
        f"sample_rate={cfg['sample_rate']}, window_size={cfg['window_size']}, mel_bins={cfg['mel_bins']}, "
        f"fmin={cfg['fmin']}, fmax={cfg['fmax']}"
    )
    mel = state.get(_A + "logmel_extractor.melW")
    if mel is not None:
        ours = np.asarray(extractor.mel_filters_slaney, dtype=np.float64)
        theirs = mel.double().numpy()
        if theirs.shape != ours.shape or np.abs(theirs - ours).max() > 1e-4 * max(np.abs(ours).max(), 1e-12):
            raise LaionClapError(
                f"the checkpoint's mel filter bank (audio_branch.logmel_extractor.melW, shape {theirs.shape}) is "
                f"not the Slaney filter bank for {settings}: the model was trained on other features — pass "
                f"audio_cfg= with its laion model config's audio_cfg values"
            )
    n_fft = int(cfg["window_size"])
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
    n = torch.arange(n_fft, dtype=torch.float64)[None, :]
    angle = 2 * math.pi * k * n / n_fft
    for name, expected in (("conv_real", window * torch.cos(angle)), ("conv_imag", -window * torch.sin(angle))):
        kernel = state.get(_A + f"spectrogram_extractor.stft.{name}.weight")
        if kernel is None:
            continue
        if _shape(kernel) != (n_fft // 2 + 1, 1, n_fft) or (kernel[:, 0].double() - expected).abs().max() > 1e-4:
            raise LaionClapError(
                f"the checkpoint's STFT kernels (audio_branch.spectrogram_extractor.stft.{name}) are not a "
                f"{n_fft}-point Hann-window DFT: ClapFeatureExtractor would compute other features"
            )


# ------------------------------------------------------------------ tokenizer


def _tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )


def _load_tokenizer(tokenizer: Any, arch: LaionClapArch) -> Any:
    """A RoBERTa tokenizer (object or folder) checked against the text encoder, with laion's 77-token limit."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase, RobertaTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        tok = copy.deepcopy(tokenizer)  # model_max_length is set below: leave the caller's object alone
    else:
        folder = Path(tokenizer).expanduser()
        if not folder.is_dir() or not _tokenizer_files(folder):
            raise LaionClapError(
                f"tokenizer={str(tokenizer)!r} is not a folder with RoBERTa tokenizer files (tokenizer.json, or "
                f"vocab.json + merges.txt); copy them from roberta-base or from a transformers CLAP checkpoint "
                f"such as laion/clap-htsat-unfused"
            )
        try:
            tok = (
                AutoTokenizer if (folder / "tokenizer_config.json").is_file() else RobertaTokenizerFast
            ).from_pretrained(str(folder))
        except Exception as exc:
            raise LaionClapError(
                f"could not load the tokenizer in {str(folder)!r}: {type(exc).__name__}: {exc}"
            ) from exc
    if len(tok) > arch.text_vocab_size:
        raise LaionClapError(
            f"the tokenizer has {len(tok)} tokens but the checkpoint's text encoder only {arch.text_vocab_size}: "
            f"it is not this model's tokenizer (laion-clap uses roberta-base's, 50265 tokens)"
        )
    if tok.pad_token_id != _ROBERTA["pad_token_id"]:
        raise LaionClapError(
            f"the tokenizer pads with id {tok.pad_token_id}; RoBERTa (and so laion-clap's text encoder) pads with "
            f"{_ROBERTA['pad_token_id']}, which its position ids depend on"
        )
    tok.model_max_length = min(_LAION_CONTEXT_LENGTH, arch.text_max_positions - 2)
    return tok


def find_tokenizer(checkpoint: str | os.PathLike) -> Any | None:
    """The tokenizer for a laion-clap checkpoint when none is given, or None.

    Looked for, in order: a ``tokenizer/`` folder beside the checkpoint, tokenizer
    files (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``) beside it, and
    ``roberta-base`` in the local Hugging Face cache (``local_files_only``; laion-clap
    itself downloads it there).
    """
    parent = Path(checkpoint).expanduser().resolve().parent
    for folder in (parent / "tokenizer", parent):
        if _tokenizer_files(folder):
            return folder
    return _cached_roberta_tokenizer()


def _cached_roberta_tokenizer() -> Any | None:
    """roberta-base's tokenizer if the Hugging Face cache has it (never downloads), else None."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained("roberta-base", local_files_only=True)
    except Exception:  # not cached (OSError, or the hub client's own errors): the caller explains
        return None


# ------------------------------------------------------------------ conversion


def convert_laion_clap(
    checkpoint: str | os.PathLike,
    out_folder: str | os.PathLike | None = None,
    *,
    amodel: str | None = None,
    enable_fusion: bool | None = None,
    tokenizer: Any = None,
    text_num_heads: int | None = None,
    audio_cfg: Mapping[str, Any] | None = None,
) -> Any:
    """Load a laion-clap ``.pt`` checkpoint into transformers' ``ClapModel``.

    Args:
        checkpoint: the ``.pt`` file (training checkpoint or bare state dict; a
            ``module.`` prefix from DDP is removed).
        out_folder: when given, also write a transformers folder there:
            ``config.json`` + ``model.safetensors`` (the model),
            ``preprocessor_config.json`` (a ClapFeatureExtractor with laion's
            settings: ``fusion`` truncation for fusion models, ``rand_trunc``
            otherwise; ``repeatpad`` padding), the tokenizer files when
            ``tokenizer`` is given, ``laion_clap_extras.safetensors`` (tensors
            ClapModel has no place for) and ``laion_clap_conversion.json``.
            Loading it with ``ClapProcessor.from_pretrained`` needs the tokenizer.
        amodel: ``"HTSAT-tiny"``, ``"HTSAT-base"`` or ``"HTSAT-large"`` to insist
            on a size (None: read it from the shapes).
        enable_fusion: insist on a fusion / non-fusion model (None: follow the file).
        tokenizer: a folder with RoBERTa tokenizer files (``roberta-base``'s, or the
            ones in a transformers CLAP checkpoint such as ``laion/clap-htsat-unfused``)
            or a loaded tokenizer. It cannot be downloaded here and is not inside
            laion-clap's ``.pt`` files.
        text_num_heads: text attention heads (default: width / 64, as RoBERTa).
        audio_cfg: laion model-config ``audio_cfg`` values that differ from
            laion's HTSAT defaults (``sample_rate`` 48000, ``hop_size`` 480,
            ``fmin`` 50, ``fmax`` 14000, ...); ``clip_samples`` sets the clip length.

    Returns:
        The ClapModel in eval mode (float32), with ``model.laion_clap_extras``
        (dict of the unplaced laion tensors) and ``model.laion_clap_arch``.

    Raises:
        LaionClapError: not a laion-clap checkpoint, an encoder ClapModel cannot
            represent, missing / unexpected keys or wrong shapes (all named), a
            front end that does not match the feature settings, or a bad tokenizer.
    """
    from transformers import ClapModel, ClapProcessor

    source = Path(checkpoint).expanduser()
    state = load_laion_clap_state_dict(source)
    arch = infer_laion_clap_arch(
        state,
        amodel=amodel,
        enable_fusion=enable_fusion,
        text_num_heads=text_num_heads,
        spec_size=(audio_cfg or {}).get("spec_size"),
    )
    cfg = _audio_settings(arch, state, audio_cfg)
    extractor = _feature_extractor(arch, cfg)
    _check_front_end(state, extractor, cfg)
    tok = _load_tokenizer(tokenizer, arch) if tokenizer is not None else None

    try:
        config = arch.clap_config()
        model = ClapModel(config).eval()
    except ValueError as exc:  # e.g. a width the head count does not divide
        raise LaionClapError(f"transformers cannot build a ClapModel for {_describe(arch)}: {exc}") from exc
    reference = model.state_dict()
    plan = _plan(arch)
    _check_plan_covers(plan, reference)

    hf_state: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    wrong: list[str] = []
    for kind, key, target in plan:
        if key not in state:
            if kind in ("map", "qkv"):
                missing.append(key)
            continue
        used.add(key)
        value = state[key]
        if kind == "map":
            if _shape(value) != _shape(reference[target]):
                wrong.append(f"{key} {_shape(value)} (expected {_shape(reference[target])})")
                continue
            hf_state[target] = value
        elif kind == "qkv":
            want = (sum(reference[t].shape[0] for t in target), *reference[target[0]].shape[1:])
            if _shape(value) != tuple(int(s) for s in want):
                wrong.append(f"{key} {_shape(value)} (expected {tuple(int(s) for s in want)})")
                continue
            for part, name in zip(value.chunk(3, dim=0), target):
                hf_state[name] = part
        elif kind == "derived":
            expected = _attn_mask(arch, int(key.split(".")[2])) if target == "attn_mask" else reference[target]
            if _shape(value) != _shape(expected) or not torch.equal(value.to(expected.dtype), expected):
                wrong.append(
                    f"{key} {_shape(value)} (does not match the buffer for the inferred geometry "
                    f"{_shape(expected)}: spectrogram size {arch.spec_size}, window {arch.window_size})"
                )
        else:  # extra
            if key.endswith("position_ids"):
                want_ids = torch.arange(arch.text_max_positions).expand(1, -1)
                if _shape(value) != _shape(want_ids) or not torch.equal(value.long(), want_ids):
                    wrong.append(f"{key} (not arange({arch.text_max_positions}))")
            extras[key] = value
    unused = sorted(set(state) - used)
    if missing or wrong or unused:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_some(missing)})")
        if unused:
            parts.append(f"{len(unused)} keys with no place in the inferred layout ({_some(unused)}) — not dropped")
        if wrong:
            parts.append(f"{len(wrong)} tensors with the wrong shape or value ({_some(wrong, 6)})")
        raise LaionClapError(
            f"{str(source)!r} does not match the laion-clap layout inferred from its shapes "
            f"({_describe(arch)}): " + "; ".join(parts)
        )
    for key, value in reference.items():
        if key.endswith(_HF_ONLY_SUFFIXES):
            hf_state[key] = value
    model.load_state_dict(hf_state, strict=True)
    model.eval()
    model.laion_clap_extras = extras
    model.laion_clap_arch = arch

    if out_folder is not None:
        out = Path(out_folder).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        if tok is not None:
            ClapProcessor(feature_extractor=extractor, tokenizer=tok).save_pretrained(str(out))
        else:
            extractor.save_pretrained(str(out))
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in extras.items()}, str(out / EXTRAS_FILE), metadata={"format": "laion-clap"}
        )
        stat = source.stat()
        stamp = {
            "converter_version": CONVERTER_VERSION,
            "source": str(source.resolve()),
            "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
            "arch": asdict(arch),
            "audio_cfg": cfg,
            "tokenizer": tok is not None,
            "extras": sorted(extras),
        }
        (out / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
    return model


def _check_plan_covers(plan: list[tuple[str, str, Any]], reference: Mapping[str, torch.Tensor]) -> None:
    """The plan must name every ClapModel tensor (guards against renames in future transformers)."""
    targets: set[str] = set()
    for kind, _key, target in plan:
        if kind == "map":
            targets.add(target)
        elif kind == "qkv":
            targets.update(target)
    hf_only = {k for k in reference if k.endswith(_HF_ONLY_SUFFIXES)}
    uncovered = set(reference) - targets - hf_only
    stale = targets - set(reference)
    if uncovered or stale:
        import transformers

        raise LaionClapError(
            f"transformers {transformers.__version__}'s ClapModel layout differs from this converter's: "
            f"unmapped ClapModel tensors {_some(uncovered)}; mapped names it lacks {_some(stale)}"
        )


def _describe(arch: LaionClapArch) -> str:
    name = arch.name or "custom HTS-AT"
    fusion = "fusion" if arch.enable_fusion else "non-fusion"
    return (
        f"{name} {fusion}: width {arch.embed_dim}, depths {list(arch.depths)}, heads {list(arch.num_heads)}, "
        f"window {arch.window_size}, spectrogram {arch.spec_size}, {arch.mel_bins} mels; RoBERTa "
        f"{arch.text_layers}x{arch.text_hidden_size} ({arch.text_heads} heads, vocab {arch.text_vocab_size}); "
        f"projection {arch.projection_dim}"
    )


# ------------------------------------------------------------------ export


def load_laion_clap_extras(folder_or_file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The unplaced laion-clap tensors saved by :func:`convert_laion_clap` (folder or the file itself)."""
    from safetensors.torch import load_file

    path = Path(folder_or_file).expanduser()
    if path.is_dir():
        path = path / EXTRAS_FILE
    if not path.is_file():
        raise LaionClapError(f"no {EXTRAS_FILE} at {str(path)!r}; it is written by convert_laion_clap(..., out_folder)")
    return load_file(str(path))


def to_laion_clap_state_dict(
    model: Any, extras: Mapping[str, torch.Tensor] | str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """A ClapModel's weights in laion-clap's ``CLAP`` state-dict layout (the inverse of the conversion).

    Args:
        model: a transformers ClapModel (HTS-AT audio, RoBERTa text).
        extras: the laion-clap tensors ClapModel has no place for — a dict, or a
            converted folder / its ``laion_clap_extras.safetensors``. None uses
            ``model.laion_clap_extras`` when the model came from
            :func:`convert_laion_clap`, else leaves them out (the AudioSet head,
            the training-only transform MLPs and the front end are then absent:
            load with ``strict=False``).

    Returns:
        ``{laion_key: tensor}`` in laion's order, cloned (no memory shared with the model);
        the shifted-window ``attn_mask`` and ``relative_position_index`` buffers are rebuilt.
    """
    arch = LaionClapArch.from_clap_config(model.config)
    if extras is None:
        extras = getattr(model, "laion_clap_extras", None) or {}
    elif not isinstance(extras, Mapping):
        extras = load_laion_clap_extras(extras)
    state = model.state_dict()
    plan = _plan(arch)
    allowed = {key for kind, key, _ in plan if kind == "extra"}
    stray = sorted(set(extras) - allowed)
    if stray:
        raise LaionClapError(f"extras hold keys that are not laion-clap tensors of this architecture: {_some(stray)}")
    out: dict[str, torch.Tensor] = {}
    for kind, key, target in plan:
        if kind == "map":
            out[key] = state[target].detach().clone()
        elif kind == "qkv":
            out[key] = torch.cat([state[t].detach() for t in target], dim=0)
        elif kind == "derived":
            out[key] = (
                _attn_mask(arch, int(key.split(".")[2])) if target == "attn_mask" else state[target].detach().clone()
            )
        elif key in extras:
            out[key] = extras[key].detach().clone()
    return out


# ------------------------------------------------------------------ cache for ClapScore


def _stamp(source: Path) -> dict[str, Any]:
    stat = source.stat()
    return {
        "converter_version": CONVERTER_VERSION,
        "source": str(source),
        "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
    }


def _is_current(folder: Path, stamp: Mapping[str, Any]) -> bool:
    try:
        saved = json.loads((folder / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        all(saved.get(k) == v for k, v in stamp.items())
        and bool(saved.get("tokenizer"))
        and (folder / "config.json").is_file()
    )


def converted_folder(checkpoint: str | os.PathLike, *, tokenizer: Any = None) -> Path:
    """A transformers folder for a laion-clap ``.pt`` file, converted once and cached.

    The cache is ``<name>.transformers/`` beside ``<name>.pt``; where that
    directory is not writable, ``$TMPDIR/genalign-laion-clap/<name>-<hash>/``.
    It is redone when the checkpoint's size or modification time changes. The
    folder is built in a temporary sibling and renamed into place, so concurrent
    processes never see half a conversion.

    Args:
        checkpoint: the ``.pt`` file.
        tokenizer: RoBERTa tokenizer folder or object; None looks where
            :func:`find_tokenizer` looks.

    Raises:
        LaionClapError: as :func:`convert_laion_clap`, or no tokenizer found.
    """
    source = Path(checkpoint).expanduser().resolve()
    if not source.is_file():
        raise LaionClapError(f"laion-clap checkpoint {str(checkpoint)!r} does not exist (or is not a file)")
    stamp = _stamp(source)
    key = hashlib.sha1(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]
    candidates = [
        source.parent / f"{source.stem}.transformers",
        Path(tempfile.gettempdir()) / "genalign-laion-clap" / f"{source.stem}-{key}",
    ]
    for folder in candidates:
        if _is_current(folder, stamp):
            return folder
    if tokenizer is None:
        tokenizer = find_tokenizer(source)
    if tokenizer is None:
        raise LaionClapError(
            f"laion-clap checkpoint {str(source)!r} has no tokenizer inside, and none was found: put RoBERTa "
            f"tokenizer files (roberta-base's tokenizer.json, or vocab.json + merges.txt; a transformers CLAP "
            f"checkpoint such as laion/clap-htsat-unfused has the same ones) in {str(source.parent / 'tokenizer')!r} "
            f"or beside the checkpoint, or convert it yourself: python -m rewards.laion_clap {source.name} "
            f"OUT_FOLDER --tokenizer ROBERTA_FOLDER, and pass OUT_FOLDER"
        )
    errors = []
    for folder in candidates:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        except OSError as exc:
            errors.append(f"{folder.parent}: {exc}")
            continue
        try:
            convert_laion_clap(source, work, tokenizer=tokenizer)  # LaionClapError: a real problem, raised
            if _is_current(folder, stamp):
                return folder  # another process finished the same conversion meanwhile
            if folder.exists():
                shutil.rmtree(folder)  # a stale conversion of an older file
            os.rename(work, folder)
            return folder
        except OSError as exc:  # read-only place, full disk, or a rename race
            if _is_current(folder, stamp):
                return folder
            errors.append(f"{folder}: {exc}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    raise LaionClapError(f"no writable place to cache the conversion of {str(source)!r}: {'; '.join(errors)}")


# ------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rewards.laion_clap",
        description="Convert a laion-clap .pt checkpoint into a transformers ClapModel folder.",
    )
    parser.add_argument("checkpoint", help="laion-clap .pt file (e.g. 630k-audioset-best.pt)")
    parser.add_argument("out_folder", help="folder to write (config.json, model.safetensors, processor files)")
    parser.add_argument(
        "--tokenizer", help="folder with RoBERTa tokenizer files (roberta-base, or a transformers CLAP checkpoint's)"
    )
    parser.add_argument("--amodel", choices=sorted(AUDIO_ENCODERS), help="insist on this audio encoder size")
    fusion = parser.add_mutually_exclusive_group()
    fusion.add_argument(
        "--fusion", dest="enable_fusion", action="store_true", default=None, help="insist on a fusion model"
    )
    fusion.add_argument("--no-fusion", dest="enable_fusion", action="store_false", help="insist on a non-fusion model")
    parser.add_argument("--text-num-heads", type=int, help="text attention heads (default: width / 64)")
    parser.add_argument(
        "--audio-cfg", type=json.loads, help="JSON of laion audio_cfg overrides, e.g. '{\"fmax\": 8000}'"
    )
    args = parser.parse_args(argv)
    try:
        model = convert_laion_clap(
            args.checkpoint,
            args.out_folder,
            amodel=args.amodel,
            enable_fusion=args.enable_fusion,
            tokenizer=args.tokenizer,
            text_num_heads=args.text_num_heads,
            audio_cfg=args.audio_cfg,
        )
    except LaionClapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"converted {args.checkpoint} -> {args.out_folder}: {_describe(model.laion_clap_arch)}")
    print(f"kept {len(model.laion_clap_extras)} laion-only tensors in {EXTRAS_FILE}: {_some(model.laion_clap_extras)}")
    if args.tokenizer is None:
        print(
            "no --tokenizer: the folder has no tokenizer files; copy roberta-base's (tokenizer.json or "
            "vocab.json + merges.txt) into it before ClapProcessor.from_pretrained",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
