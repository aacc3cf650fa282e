"""Named embedders for the distributional rewards, and exemplar sets read from files.

A distributional reward (``rewards.distribution``) is an embedder plus, for most, a reference or exemplar
set. From Python any callable ``outputs -> [B, D]`` (or frames ``[B, F, D]``) is an embedder; from YAML the
embedder is named here and the set is a path::

    reward:
      name: exemplar_fd
      kwargs:
        embedder: {name: clap_audio, kwargs: {model: genalign/worlds/assets/tones/clap, sampling_rate: 16000,
                                               frames: true}}
        exemplars: genalign/worlds/assets/tones/exemplars/reward     # a folder of WAVs

An exemplar source is a folder of media files of the embedder's modality (WAV for audio, PNG/JPEG for
images), a ``.txt`` file with one text per line (embedded with the embedder's text tower, so a cross-modal
embedder such as CLAP or CLIP compares audio or images with text exemplars), or a tensor file of
precomputed embeddings (``.pt``, ``.npy``, or ``.safetensors`` holding one tensor). `exemplar_embeddings`
embeds a source once per embedder and keeps the result for the life of the process.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import RewardError

__all__ = [
    "EMBEDDERS",
    "ClapAudioEmbedder",
    "ClipImageEmbedder",
    "available_embedders",
    "build_embedder",
    "exemplar_embeddings",
    "register_embedder",
]

EMBEDDERS: dict[str, type] = {}
AUDIO_SUFFIXES = (".wav",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TENSOR_SUFFIXES = (".pt", ".npy", ".safetensors")


def register_embedder(name: str) -> Callable[[type], type]:
    """Class decorator: make an embedder buildable by name (``build_embedder({"name": name, ...})``)."""

    def decorator(cls: type) -> type:
        if name in EMBEDDERS:
            raise ValueError(f"embedder {name!r} is already registered by {EMBEDDERS[name].__name__}")
        EMBEDDERS[name] = cls
        cls.embedder_name = name
        return cls

    return decorator


def available_embedders() -> list[str]:
    return sorted(EMBEDDERS)


def build_embedder(spec: Any) -> Callable[[Any], torch.Tensor]:
    """An embedder from a callable (returned as is), a registered name, or ``{name: ..., kwargs: {...}}``."""
    if callable(spec) and not isinstance(spec, (str, Mapping)):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise RewardError(
            f"embedder must be a callable or {{name: <one of {available_embedders()}>, kwargs: {{...}}}}; "
            f"got {spec!r}"
        )
    unknown_keys = set(spec) - {"name", "kwargs"}
    if unknown_keys:
        raise RewardError(f"embedder spec has unknown keys {sorted(unknown_keys)}; it takes name and kwargs")
    name, kwargs = spec["name"], dict(spec.get("kwargs") or {})
    if name not in EMBEDDERS:
        close = difflib.get_close_matches(str(name), EMBEDDERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RewardError(f"unknown embedder {name!r}{hint}; available: {available_embedders()}")
    cls = EMBEDDERS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    bad = sorted(set(kwargs) - set(accepted))
    if bad:
        raise RewardError(f"embedder {name!r} got unknown arguments {bad}; it accepts {accepted}")
    return cls(**kwargs)


def _windows(waveforms: torch.Tensor, window: int, hop: int) -> torch.Tensor:
    """[B, T] -> [B, F, window] overlapping windows covering the clip (the last one ends at the clip's end)."""
    length = waveforms.shape[-1]
    if length <= window:
        return waveforms.unsqueeze(1)
    starts = list(range(0, length - window + 1, hop))
    if starts[-1] != length - window:
        starts.append(length - window)
    return torch.stack([waveforms[:, s : s + window] for s in starts], dim=1)


@register_embedder("clap_audio")
class ClapAudioEmbedder(torch.nn.Module):
    """CLAP audio embeddings of clips, whole or per frame, in CLAP's joint text-audio space.

    With ``frames=False`` one unit-norm embedding per clip, ``[B, D]``. With ``frames=True`` the embeddings
    of overlapping windows of ``window_s`` seconds every ``hop_s`` seconds, ``[B, F, D]`` (a 2-s clip with the
    defaults gives F = 5): the frame-level embeddings a per-sample ("per-song") FAD fits its Gaussian to.
    CLAP pads each window the way its feature extractor pads short clips. Text exemplars are embedded by
    `embed_texts` into the same space.

    Args:
        model, sampling_rate, device: as for `rewards.audio.ClapScore` (hub id, folder or laion-clap file;
            the waveforms' rate in Hz).
        frames: per-window embeddings instead of one per clip.
        window_s, hop_s: window length and hop in seconds (frames only).
    """

    modality = "audio"

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        sampling_rate: int | None = None,
        frames: bool = False,
        window_s: float = 1.0,
        hop_s: float = 0.25,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        from .audio import DEFAULT_CLAP_CHECKPOINT, ClapScore

        self.clap = ClapScore(model or DEFAULT_CLAP_CHECKPOINT, sampling_rate=sampling_rate, device=device)
        if frames and not (0 < hop_s <= window_s):
            raise RewardError(f"embedder 'clap_audio' needs 0 < hop_s ≤ window_s; got hop_s={hop_s}, window_s={window_s}")
        self.sampling_rate = self.clap.sampling_rate
        self.frames = bool(frames)
        self.window = max(1, round(window_s * self.sampling_rate))
        self.hop = max(1, round(hop_s * self.sampling_rate))

    def key(self) -> tuple:
        """What the embeddings depend on (for caches of exemplar embeddings)."""
        return ("clap_audio", self.clap.checkpoint, self.sampling_rate, self.frames, self.window, self.hop)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        """[B, T] or [B, C, T] waveforms in [-1, 1] -> [B, D], or [B, F, D] with frames."""
        self.clap.validate_outputs(waveforms)
        audio = waveforms.mean(dim=1) if waveforms.ndim == 3 else waveforms
        if not self.frames:
            return self.clap.embed_audio(audio)
        windows = _windows(audio, self.window, self.hop)
        b, f, _ = windows.shape
        return self.clap.embed_audio(windows.reshape(b * f, -1)).view(b, f, -1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """E texts -> [E, D] unit-norm CLAP text embeddings."""
        with torch.no_grad():
            return self.clap.embed_texts(texts)

    def load_examples(self, files: Sequence[Path]) -> torch.Tensor:
        """WAV files -> [E, T] mono waveforms at the embedder's rate, zero-padded to the longest."""
        from genalign.audio_io import load_audio

        clips = [load_audio(f, sample_rate=self.sampling_rate, channels=1)[0] for f in files]
        length = max(c.shape[-1] for c in clips)
        return torch.stack([F.pad(c, (0, length - c.shape[-1])) for c in clips])


@register_embedder("clip_image")
class ClipImageEmbedder(torch.nn.Module):
    """Unit-norm projected image embeddings of a transformers ``CLIPModel``, ``[B, D]``, and its text tower for
    text exemplars.

    Args:
        model: hub id or folder of a ``CLIPModel`` (e.g. the shapes world's ``assets/shapes/clip``).
        processor: folder or hub id with the tokenizer and ``preprocessor_config.json``; default ``model``.
        device: where the CLIP runs; None keeps it on the CPU.
    """

    modality = "image"

    def __init__(self, model: str, processor: str | None = None, device: str | torch.device | None = None) -> None:
        super().__init__()
        from .clip_rewards import _load_transformers_clip

        self.model_id = str(model)
        self.model, self.tokenizer, self.image_spec = _load_transformers_clip(
            "CLIP", self.model_id, str(processor or model), False, None
        )
        if device is not None:
            self.model.to(device)

    def key(self) -> tuple:
        return ("clip_image", self.model_id)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images in [0, 1] -> [B, D]."""
        from .clip_rewards import _transformers_image_embeds, clip_preprocess

        if not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise RewardError(f"embedder 'clip_image' takes images [B, 3, H, W] in [0, 1]; got {got}")
        device = next(self.model.parameters()).device
        pixels = clip_preprocess(images.to(device, torch.float32), self.image_spec)
        return F.normalize(_transformers_image_embeds(self.model, pixels), dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                                max_length=self.model.config.text_config.max_position_embeddings).to(device)
        with torch.no_grad():
            out = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            return F.normalize(self.model.text_projection(out.pooler_output), dim=-1)

    def load_examples(self, files: Sequence[Path]) -> torch.Tensor:
        """Image files -> [E, 3, H, W] in [0, 1], all resized to the first one's size."""
        from PIL import Image

        images = [Image.open(f).convert("RGB") for f in files]
        size = images[0].size
        arrays = [np.asarray(im.resize(size) if im.size != size else im, dtype=np.float32) / 255.0 for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------- exemplar sets

_EXEMPLAR_CACHE: dict[tuple, torch.Tensor] = {}
EXEMPLAR_CACHE_STATS = {"hits": 0, "misses": 0}


def _load_tensor(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise RewardError(f"{path} holds {len(tensors)} tensors {sorted(tensors)}; an embedding file holds one")
        return next(iter(tensors.values()))
    value = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(value, torch.Tensor):
        raise RewardError(f"{path} holds a {type(value).__name__}; an embedding file holds one tensor [E, D]")
    return value


def _media_files(folder: Path, modality: str) -> list[Path]:
    suffixes = AUDIO_SUFFIXES if modality == "audio" else IMAGE_SUFFIXES
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)
    if not files:
        raise RewardError(f"exemplar folder {folder} holds no {modality} files ({', '.join(suffixes)}); point it at "
                          f"a folder of examples, a .txt file of texts, or a tensor file of embeddings")
    return files


def exemplar_embeddings(embedder: Any, source: str | os.PathLike, *, batch_size: int = 32) -> torch.Tensor:
    """The embeddings of an exemplar set: ``[E, D]``, or ``[E, F, D]`` from a frame embedder and media files.

    Args:
        embedder: a built embedder (one of `EMBEDDERS`, or any callable with ``modality`` and
            ``load_examples`` for media folders and ``embed_texts`` for text files).
        source: a folder of media files, a ``.txt`` file (one text per line) or a tensor file (``.pt``,
            ``.npy``, ``.safetensors``) of precomputed embeddings.
    Returns:
        float32 embeddings on the CPU, computed once per (embedder, source) in this process
        (`EXEMPLAR_CACHE_STATS` counts the hits).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise RewardError(f"exemplar source {str(source)!r} does not exist; give a folder of examples, a .txt "
                          f"file of texts, or a tensor file of embeddings")
    stamp = path.stat().st_mtime_ns if path.is_file() else tuple(p.stat().st_mtime_ns for p in sorted(path.iterdir()))
    identity = embedder.key() if hasattr(embedder, "key") else id(embedder)
    cache_key = (identity, str(path.resolve()), stamp)
    if cache_key in _EXEMPLAR_CACHE:
        EXEMPLAR_CACHE_STATS["hits"] += 1
        return _EXEMPLAR_CACHE[cache_key]
    EXEMPLAR_CACHE_STATS["misses"] += 1
    if path.is_file() and path.suffix in TENSOR_SUFFIXES:
        emb = _load_tensor(path)
    elif path.is_file() and path.suffix == ".txt":
        if not hasattr(embedder, "embed_texts"):
            raise RewardError(f"{path} holds texts but embedder {type(embedder).__name__} has no text tower "
                              f"(embed_texts); use a cross-modal embedder such as clap_audio or clip_image")
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        emb = embedder.embed_texts(texts)
    elif path.is_dir():
        modality = getattr(embedder, "modality", None)
        if modality is None or not hasattr(embedder, "load_examples"):
            raise RewardError(f"embedder {type(embedder).__name__} cannot read example files (no modality / "
                              f"load_examples); pass precomputed embeddings as a tensor file instead")
        files = _media_files(path, modality)
        with torch.no_grad():
            emb = torch.cat([embedder(embedder.load_examples(files[i : i + batch_size])).cpu()
                             for i in range(0, len(files), batch_size)])
    else:
        raise RewardError(f"exemplar source {path} is neither a folder nor a .txt or {'/'.join(TENSOR_SUFFIXES)} "
                          f"file")
    emb = emb.detach().float().cpu()
    _EXEMPLAR_CACHE[cache_key] = emb
    return emb
