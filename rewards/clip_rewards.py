"""CLIP-family rewards that people fine-tune with: CLIPScore, PickScore, LAION aesthetic (also as
``clip_aesthetic``, its head on any transformers CLIP) and HPSv2.

Each reward loads its public checkpoint by Hugging Face hub id *or* by a local folder/file, through the
same code path (a hub id is only downloaded, or found in the HF cache, and then loaded like a local
path). All of them

* take images ``[B, 3, H, W]`` in [0, 1] and return float32 scores ``[B]`` on the images' device;
* preprocess in torch (antialiased resize of the shortest side, centre crop, the model's mean/std), so
  gradients flow from the score back to the pixels;
* run the frozen model (eval mode, ``requires_grad`` False) in its own dtype, on ``device`` or, when
  ``device`` is None, on the device of the images of each call (moved there lazily).

Score scales (what a typical good image/prompt pair gets with the public checkpoints):

=================  ========================================================  =================
reward             value                                                     typical range
=================  ========================================================  =================
clip_score         ``max(100 * cos(image, text), 0)`` (torchmetrics)         20 .. 35
clip_score raw     ``cos(image, text)``                                      0.2 .. 0.35
pickscore          ``logit_scale.exp() * cos`` (logit_scale.exp() ~ 100)     18 .. 24
laion_aesthetic    MLP on the L2-normalised ViT-L/14 image embedding         4 .. 7 (of 10)
clip_aesthetic     the same MLP on any transformers CLIP's embedding         the head's scale
hpsv2              ``cos(image, text)`` (no logit scale, as in HPSv2)        0.2 .. 0.35
=================  ========================================================  =================

Offline use: download a checkpoint elsewhere (``huggingface-cli download <id>``) and pass the folder or
file; or pass ``local_files_only=True`` to use only the local Hugging Face cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download

from .base import Reward, RewardError, register_reward

if TYPE_CHECKING:
    from transformers import CLIPModel

__all__ = [
    "AestheticHead",
    "ClipAesthetic",
    "ClipScore",
    "HPSv2",
    "ImageInputSpec",
    "LaionAesthetic",
    "PickScore",
    "clip_preprocess",
]

DEFAULT_CLIP_SCORE_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
# PickScore_v1 ships only the fine-tuned weights; its authors load tokenizer and image processor from
# the CLIP-H it was fine-tuned from.
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DEFAULT_AESTHETIC_HEAD = "camenduru/improved-aesthetic-predictor"
AESTHETIC_HEAD_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
# What genalign.worlds.shapes_aesthetic.save_aesthetic_head writes; ClipAesthetic looks for it in folders.
CLIP_AESTHETIC_HEAD_FILENAME = "aesthetic_head.safetensors"
DEFAULT_HPS_CHECKPOINT = "xswu/HPSv2"
HPS_FILENAMES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}

# open_clip's hub file names: safetensors first, as open_clip itself prefers.
_OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# PIL resampling codes stored in Hugging Face image-processor configs.
_PIL_BILINEAR = 2


# ------------------------------------------------------------------ preprocessing


@dataclass(frozen=True)
class ImageInputSpec:
    """How a CLIP image tower wants its pixels.

    Attributes:
        resize: an int resizes the shortest side to that length (aspect kept); ``(h, w)`` resizes to
            exactly that size.
        crop: ``(h, w)`` centre crop after resizing, or None for no crop.
        mean, std: per-channel normalisation applied to [0, 1] pixels.
        interpolation: ``"bicubic"`` or ``"bilinear"``.
    """

    resize: int | tuple[int, int]
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"


def clip_preprocess(images: torch.Tensor, spec: ImageInputSpec) -> torch.Tensor:
    """Differentiable CLIP preprocessing of ``[B, 3, H, W]`` images in [0, 1].

    Matches the torchvision/PIL pipelines of the reference implementations (resize, centre crop,
    normalise) except that bicubic overshoot is not clamped, so every pixel keeps its gradient.

    Returns:
        ``[B, 3, h, w]`` float32 (``h, w`` = crop size, or the resize size without a crop).
    """
    # Resampling kernels are not implemented for every half type on every device; float32 is exact
    # enough and the model input is cast to the model's dtype afterwards.
    x = images.float()
    height, width = x.shape[-2:]
    if isinstance(spec.resize, int):
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = spec.resize, int(spec.resize * long / short)
        size = (new_short, new_long) if height <= width else (new_long, new_short)
    else:
        size = spec.resize
    if size != (height, width):
        x = F.interpolate(x, size=size, mode=spec.interpolation, align_corners=False, antialias=True)
    if spec.crop is not None:
        crop_h, crop_w = spec.crop
        if crop_h > x.shape[-2] or crop_w > x.shape[-1]:
            raise RewardError(
                f"cannot centre-crop {tuple(x.shape[-2:])} pixels to {spec.crop}; the image processor "
                f"config asks for a crop larger than its resize"
            )
        top = round((x.shape[-2] - crop_h) / 2.0)
        left = round((x.shape[-1] - crop_w) / 2.0)
        x = x[..., top : top + crop_h, left : left + crop_w]
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _spec_from_hf_processor(config: dict[str, Any]) -> ImageInputSpec:
    """Read a Hugging Face ``preprocessor_config.json`` (old int sizes or new dict sizes)."""
    size = config.get("size", 224)
    if isinstance(size, dict):
        resize = size["shortest_edge"] if "shortest_edge" in size else (size["height"], size["width"])
    else:
        resize = int(size)
    crop = None
    if config.get("do_center_crop", True):
        crop_size = config.get("crop_size", size)
        if isinstance(crop_size, dict):
            crop = (crop_size["height"], crop_size["width"])
        else:
            crop = (int(crop_size), int(crop_size))
    return ImageInputSpec(
        resize=resize,
        crop=crop,
        mean=tuple(config["image_mean"]),
        std=tuple(config["image_std"]),
        interpolation="bilinear" if config.get("resample") == _PIL_BILINEAR else "bicubic",
    )


def _spec_from_open_clip(preprocess_cfg: dict[str, Any]) -> ImageInputSpec:
    """Read an open_clip model's ``visual.preprocess_cfg``."""
    size = preprocess_cfg["size"]
    hw = (size, size) if isinstance(size, int) else tuple(size)
    mode = preprocess_cfg.get("resize_mode", "shortest")
    if mode == "shortest":
        resize: int | tuple[int, int] = min(hw)
        crop: tuple[int, int] | None = hw
    elif mode == "squash":
        resize, crop = hw, None
    else:
        raise RewardError(
            f"open_clip resize_mode {mode!r} is not supported by the differentiable preprocessing; "
            f"use a model whose preprocessing is 'shortest' (resize + centre crop) or 'squash'"
        )
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    return ImageInputSpec(
        resize=resize,
        crop=crop,
        mean=tuple(preprocess_cfg["mean"]),
        std=tuple(preprocess_cfg["std"]),
        interpolation="bilinear" if interpolation == "bilinear" else "bicubic",
    )


# ------------------------------------------------------------------ loading


def _looks_like_path(source: str) -> bool:
    """True for strings that can only be filesystem paths (hub ids are ``name`` or ``org/name``)."""
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    )


def _load_error(what: str, source: str, arg: str, example: str, cause: BaseException) -> RewardError:
    """The one error every failed checkpoint load raises: what failed, why, and the local-path fix."""
    expanded = os.path.expanduser(source)
    if _looks_like_path(source) and not os.path.exists(expanded):
        return RewardError(
            f"could not load {what} '{source}': no such local path. Pass {arg}='{example}' "
            f"(a local path that exists) or a Hugging Face hub id"
        )
    reason = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else type(cause).__name__
    if os.path.exists(expanded):
        return RewardError(
            f"could not load {what} from local path '{source}' ({type(cause).__name__}: {reason}); "
            f"check that it holds the complete checkpoint"
        )
    return RewardError(
        f"could not load {what} '{source}' ({type(cause).__name__}: {reason}). If there is no network "
        f"and it is not in the local Hugging Face cache, download it elsewhere and pass "
        f"{arg}='{example}' (a local path)"
    )


def _fetch_file(source: str, filenames: Sequence[str], local_files_only: bool) -> str:
    """Path of a checkpoint file: ``source`` itself (a file), ``source/<name>`` (a folder), or the
    first of ``filenames`` that downloads from hub repo ``source`` (or is in the HF cache).

    Raises the underlying error (FileNotFoundError, hub errors); callers wrap it with context.
    """
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in filenames:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"none of {list(filenames)} is in the folder")
    if _looks_like_path(source):
        raise FileNotFoundError("no such local path")
    last_error: Exception = FileNotFoundError(f"none of {list(filenames)} found")
    for name in filenames:
        try:
            return hf_hub_download(repo_id=source, filename=name, local_files_only=local_files_only)
        except Exception as exc:  # hub errors vary by version; report the last one
            last_error = exc
    raise last_error


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accept torch dtypes and their names (``"bfloat16"``, ``"torch.float16"``) as YAML configs write them."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise RewardError(
            f"dtype {dtype!r} is not a torch floating-point dtype; use e.g. 'float32', 'float16' or 'bfloat16'"
        )
    return resolved


def _freeze(module: torch.nn.Module, dtype: torch.dtype | str | None) -> torch.nn.Module:
    """Eval mode, no parameter gradients, optional dtype cast; gradients still reach the inputs."""
    dtype = _as_dtype(dtype)
    if dtype is not None:
        module.to(dtype)
    return module.eval().requires_grad_(False)


def _load_transformers_clip_model(
    what: str, model: str, local_files_only: bool, dtype: torch.dtype | str | None
) -> CLIPModel:
    """Load a frozen transformers ``CLIPModel`` from a hub id or a local ``save_pretrained`` folder."""
    from transformers import CLIPModel

    try:
        clip = CLIPModel.from_pretrained(os.path.expanduser(model), local_files_only=local_files_only)
    except Exception as exc:  # any load failure gets the same actionable message
        raise _load_error(f"{what} model", model, "model", "/path/to/folder", exc) from exc
    return _freeze(clip, dtype)


def _load_hf_image_spec(what: str, processor: str, local_files_only: bool) -> ImageInputSpec:
    """The image preprocessing in ``preprocessor_config.json`` of a hub id or local folder."""
    try:
        config_file = _fetch_file(processor, ["preprocessor_config.json"], local_files_only)
        with open(config_file, encoding="utf-8") as f:
            return _spec_from_hf_processor(json.load(f))
    except Exception as exc:
        raise _load_error(f"{what} processor", processor, "processor", "/path/to/folder", exc) from exc


def _load_transformers_clip(
    what: str,
    model: str,
    processor: str,
    local_files_only: bool,
    dtype: torch.dtype | str | None,
) -> tuple[CLIPModel, Any, ImageInputSpec]:
    """Load a transformers ``CLIPModel`` plus the tokenizer and image preprocessing of ``processor``.

    Both arguments are hub ids or local folders (``save_pretrained`` layout); ``processor`` must hold
    the tokenizer files and ``preprocessor_config.json``.

    Returns:
        ``(frozen model, tokenizer, image spec)``.
    """
    from transformers import AutoTokenizer

    clip = _load_transformers_clip_model(what, model, local_files_only, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            os.path.expanduser(processor), local_files_only=local_files_only
        )
    except Exception as exc:
        raise _load_error(f"{what} processor", processor, "processor", "/path/to/folder", exc) from exc
    return clip, tokenizer, _load_hf_image_spec(what, processor, local_files_only)


def _load_open_clip(
    what: str,
    model_name: str,
    weights: str,
    arg: str,
    filenames: Sequence[str],
    local_files_only: bool,
    dtype: torch.dtype | str | None,
    quick_gelu: bool | None = None,
    file_weights_like: str | None = None,
) -> tuple[torch.nn.Module, Any, ImageInputSpec]:
    """Build open_clip architecture ``model_name`` and load ``weights`` into it (strictly).

    ``weights`` is an open_clip pretrained tag of ``model_name`` (e.g. ``"openai"``), a local file, a
    local folder holding one of ``filenames``, or a hub repo holding one of ``filenames``. A tag is
    resolved to its hub file and then loaded like a local file, with the tag's QuickGELU and
    preprocessing settings.

    ``quick_gelu`` sets the activation: True forces QuickGELU (what OpenAI's CLIPs were trained
    with); False keeps GELU and is refused for a ``-quickgelu`` architecture, which cannot build it.
    With None it is the tag's setting, or, for weights given as a file, folder or repo, the setting
    of ``model_name``'s tag ``file_weights_like`` (None there: the architecture's own activation).

    Returns:
        ``(frozen model, tokenizer, image spec)``.
    """
    try:
        import open_clip
    except ImportError as exc:
        raise RewardError(f"{what} needs open_clip: pip install open_clip_torch") from exc
    if model_name not in open_clip.list_models():
        raise RewardError(
            f"unknown open_clip architecture {model_name!r} for {what}; use one of open_clip.list_models() "
            f"or register a config with open_clip.add_model_config('/path/to/{model_name}.json')"
        )
    tag_cfg = open_clip.get_pretrained_cfg(model_name, weights)
    if quick_gelu is None:
        like = tag_cfg or (open_clip.get_pretrained_cfg(model_name, file_weights_like) if file_weights_like else {})
        quick_gelu = bool(like.get("quick_gelu", False))
    elif not quick_gelu and open_clip.get_model_config(model_name).get("quick_gelu", False):
        raise RewardError(
            f"quick_gelu=False asks for GELU but open_clip architecture {model_name!r} is built with QuickGELU; "
            f"pass the architecture name without '-quickgelu' for GELU-trained weights"
        )
    source, names, label = weights, filenames, what
    if tag_cfg:
        if not tag_cfg.get("hf_hub"):
            raise RewardError(
                f"open_clip tag '{weights}' of {model_name} has no Hugging Face hub location; download "
                f"its weights and pass {arg}='/path/to/checkpoint' (a local path)"
            )
        # open_clip writes hub locations as 'org/repo/filename', or 'org/repo/' for its default names.
        source, filename = os.path.split(tag_cfg["hf_hub"])
        names = [filename] if filename else list(_OPEN_CLIP_WEIGHT_FILES)
        label = f"{what} (open_clip tag '{weights}' of {model_name})"
    try:
        checkpoint = _fetch_file(source, names, local_files_only)
    except Exception as exc:
        raise _load_error(label, source, arg, "/path/to/checkpoint", exc) from exc
    try:
        model = open_clip.create_model(
            model_name,
            pretrained=checkpoint,
            force_quick_gelu=quick_gelu,
            force_preprocess_cfg=tag_cfg or None,
            weights_only=True,
        )
    except Exception as exc:  # wrong architecture, truncated file, pickled objects
        raise RewardError(
            f"could not load {what} from {checkpoint} into open_clip architecture {model_name!r}: {exc}"
        ) from exc
    spec = _spec_from_open_clip(model.visual.preprocess_cfg)
    return _freeze(model, dtype), open_clip.get_tokenizer(model_name), spec


# ------------------------------------------------------------------ rewards


class _FrozenModelReward(Reward):
    """Shared device handling for rewards wrapping frozen models held as submodules.

    With ``device=None`` the models follow the images of each call (moved on first use and whenever
    the images' device changes); otherwise they stay on ``device`` and inputs are moved there.
    """

    modality = "image"
    kind = "instance"
    differentiable = True

    def __init__(self, device: str | torch.device | None) -> None:
        super().__init__()
        self._device = torch.device(device) if device is not None else None

    def _finish_init(self) -> None:
        """Call after the models are attached: place them on a pinned device right away."""
        if self._device is not None:
            self.to(self._device)

    def _model_device(self) -> torch.device:
        return next(self.parameters()).device

    def _model_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _place(self, images: torch.Tensor) -> torch.Tensor:
        """Move the models (lazily) or the images so both live on the same device."""
        target = self._device if self._device is not None else images.device
        if self._model_device() != target:
            self.to(target)
        return images.to(target)

    def train(self, mode: bool = True) -> _FrozenModelReward:
        # Algorithms may call .train() on everything they hold; reward models must keep dropout off.
        super().train(mode)
        for module in self.children():
            module.eval()
        return self

    def _require_prompts(self, conditions: Sequence[Any] | None) -> list[str]:
        if conditions is None:
            raise RewardError(
                f"reward '{self.name}' scores images against prompts, so prompts are required: call "
                f"reward(images, prompts) with one prompt per image"
            )
        bad = [type(c).__name__ for c in conditions if not isinstance(c, str)]
        if bad:
            raise RewardError(
                f"reward '{self.name}' needs prompts as strings; got {bad[0]} conditions"
            )
        return list(conditions)


def _transformers_image_embeds(model: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    """Preprocessed ``[B, 3, h, w]`` pixels -> ``[B, projection_dim]`` projected (unnormalised) embeddings.

    What ``get_image_features`` returns, written out because its return type differs between
    transformers 4 (tensor) and 5 (model output).
    """
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


class _TransformersClipReward(_FrozenModelReward):
    """Image-text cosine similarity with a transformers ``CLIPModel``."""

    _what = "CLIP"

    def __init__(
        self,
        model: str,
        processor: str | None,
        device: str | torch.device | None,
        dtype: torch.dtype | str | None,
        local_files_only: bool,
    ) -> None:
        super().__init__(device)
        self.model_id = model
        self.processor_id = processor or model
        self.model, self.tokenizer, self.image_spec = _load_transformers_clip(
            self._what, model, self.processor_id, local_files_only, dtype
        )
        self._finish_init()

    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``[B, 3, H, W]`` images in [0, 1] + B prompts -> ``[B]`` cosine similarity (model dtype).

        Differentiable w.r.t. ``images``; the text side is computed without gradients.
        """
        x = self._place(images)
        pixels = clip_preprocess(x, self.image_spec).to(self._model_dtype())
        image_embeds = _transformers_image_embeds(self.model, pixels)
        tokens = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(x.device)
        with torch.no_grad():
            # The projected pooled output, as _transformers_image_embeds computes for the images.
            text_out = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            text_embeds = self.model.text_projection(text_out.pooler_output)
        return F.cosine_similarity(image_embeds, text_embeds, dim=-1)


@register_reward("clip_score")
class ClipScore(_TransformersClipReward):
    """CLIPScore (Hessel et al., 2021) as torchmetrics computes it: ``max(100 * cos(image, text), 0)``.

    With ``raw=True`` the score is the plain cosine in [-1, 1] (no scaling or clipping, so its
    gradient never vanishes). Needs one prompt per image.

    Args:
        model: hub id or local folder of a transformers ``CLIPModel``.
        processor: hub id or folder with the tokenizer and ``preprocessor_config.json``; default
            ``model``.
        raw: return the cosine instead of the clipped ``100 * cos``.
        device: where the model runs; None follows the images.
        dtype: cast the model to this dtype (``torch.float16`` or ``"float16"``); None keeps the
            stored dtype.
        local_files_only: never touch the network; use only local paths and the HF cache.
    """

    def __init__(
        self,
        model: str = DEFAULT_CLIP_SCORE_MODEL,
        processor: str | None = None,
        raw: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        local_files_only: bool = False,
    ) -> None:
        super().__init__(model, processor, device, dtype, local_files_only)
        self.raw = bool(raw)

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        """``[B, 3, H, W]`` + B prompts -> ``[B]`` float32 CLIPScore on ``outputs.device``."""
        cos = self.cosine(outputs, self._require_prompts(conditions)).float()
        scores = cos if self.raw else (100.0 * cos).clamp(min=0.0)
        return scores.to(outputs.device)

    def extra_repr(self) -> str:
        return f"model={self.model_id!r}, raw={self.raw}, " + super().extra_repr()


@register_reward("pickscore")
class PickScore(_TransformersClipReward):
    """PickScore (Kirstain et al., 2023): ``logit_scale.exp() * cos(image, text)``.

    ``logit_scale.exp()`` is about 100 for the public checkpoint, so scores sit near 18-24. Needs one
    prompt per image.

    Args:
        model: hub id or local folder of the PickScore ``CLIPModel``.
        processor: hub id or folder with the tokenizer and ``preprocessor_config.json`` (PickScore
            uses those of the CLIP-H it was fine-tuned from).
        device, dtype, local_files_only: as for :class:`ClipScore`.
    """

    _what = "PickScore"

    def __init__(
        self,
        model: str = DEFAULT_PICKSCORE_MODEL,
        processor: str = DEFAULT_PICKSCORE_PROCESSOR,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        local_files_only: bool = False,
    ) -> None:
        super().__init__(model, processor, device, dtype, local_files_only)

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        """``[B, 3, H, W]`` + B prompts -> ``[B]`` float32 PickScore on ``outputs.device``."""
        cos = self.cosine(outputs, self._require_prompts(conditions))
        return (self.model.logit_scale.exp() * cos).float().to(outputs.device)

    def extra_repr(self) -> str:
        return f"model={self.model_id!r}, processor={self.processor_id!r}, " + super().extra_repr()


def _aesthetic_mlp(in_features: int) -> torch.nn.Sequential:
    """The improved-aesthetic-predictor head; indices match the keys of its released state dict
    (``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``). No nonlinearities: the
    released model was trained without them."""
    return torch.nn.Sequential(
        torch.nn.Linear(in_features, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )


class AestheticHead(torch.nn.Module):
    """The improved-aesthetic-predictor MLP, wrapped so the state-dict keys read ``layers.*`` as in the
    released file. Used by :class:`LaionAesthetic` and :class:`ClipAesthetic`."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.layers = _aesthetic_mlp(in_features)

    @classmethod
    def from_state_dict(
        cls, state: object, embed_dim: int, source: str, embedder: str, fix: str
    ) -> AestheticHead:
        """A head from a loaded state dict, checked against the ``embed_dim``-d embeddings of ``embedder``.

        Raises RewardError naming ``source`` when the dict is not this layout or expects another width
        (``fix`` says what to do about the width).
        """
        if not isinstance(state, dict) or "layers.0.weight" not in state:
            raise RewardError(
                f"{source} is not an aesthetic head: expected a state dict with keys layers.0.weight ... "
                f"layers.7.bias (the improved-aesthetic-predictor layout)"
            )
        head_dim = state["layers.0.weight"].shape[-1]
        if head_dim != embed_dim:
            raise RewardError(
                f"aesthetic head {source} expects {head_dim}-d image embeddings but {embedder} produces "
                f"{embed_dim}-d ones; {fix}"
            )
        head = cls(embed_dim)
        try:
            head.load_state_dict(state)
        except RuntimeError as exc:
            raise RewardError(f"aesthetic head {source} does not match the MLP layout: {exc}") from exc
        return head

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` L2-normalised image embeddings -> ``[B]`` aesthetic scores."""
        return self.layers(embeddings).squeeze(-1)


@register_reward("laion_aesthetic")
class LaionAesthetic(_FrozenModelReward):
    """LAION improved aesthetic predictor (Schuhmann, 2022): an MLP on the L2-normalised CLIP
    ViT-L/14 image embedding, trained on SAC + LAION-logos + AVA ratings (roughly 1-10). Text-free.

    Args:
        clip_model: open_clip architecture name; the head expects ViT-L-14 embeddings (768-d).
        clip_pretrained: open_clip pretrained tag, local checkpoint file/folder, or hub repo with an
            open_clip checkpoint (e.g. ``open_clip_model.safetensors`` of
            ``timm/vit_large_patch14_clip_224.openai``, the file the ``"openai"`` tag resolves to).
        head: hub repo holding ``head_filename``, or a local path to the ``.pth`` (or its folder).
        head_filename: file name of the head inside ``head`` when it is a repo or folder.
        device, dtype, local_files_only: as for :class:`ClipScore`.
        quick_gelu: the CLIP's activation. OpenAI's CLIPs were trained with QuickGELU, but open_clip's
            plain ``"ViT-L-14"`` builds GELU, which shifts every embedding. None (default): the tag's
            setting, and for weights given as a file, folder or repo the setting of the architecture's
            ``"openai"`` tag (QuickGELU for ViT-L-14), since the released head scores OpenAI's
            embeddings. Pass False for GELU-trained weights (e.g. LAION's ViT-L-14) with a head of
            your own; True forces QuickGELU.
    """

    def __init__(
        self,
        clip_model: str = "ViT-L-14",
        clip_pretrained: str = "openai",
        head: str = DEFAULT_AESTHETIC_HEAD,
        head_filename: str = AESTHETIC_HEAD_FILENAME,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        local_files_only: bool = False,
        quick_gelu: bool | None = None,
    ) -> None:
        super().__init__(device)
        self.clip_model, self.clip_pretrained, self.head_source = clip_model, clip_pretrained, head
        self.model, _, self.image_spec = _load_open_clip(
            "LAION aesthetic CLIP",
            clip_model,
            clip_pretrained,
            "clip_pretrained",
            _OPEN_CLIP_WEIGHT_FILES,
            local_files_only,
            dtype,
            quick_gelu=quick_gelu,
            file_weights_like="openai",
        )
        try:
            head_file = _fetch_file(head, [head_filename], local_files_only)
            state = torch.load(head_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise _load_error(
                "LAION aesthetic head", head, "head", f"/path/to/{head_filename}", exc
            ) from exc
        self.head = AestheticHead.from_state_dict(
            state, self.model.visual.output_dim, head_file, f"open_clip {clip_model!r}",
            "the released head goes with clip_model='ViT-L-14'",
        )
        _freeze(self.head, self._model_dtype())
        self._finish_init()

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B]`` float32 aesthetic score on ``outputs.device`` (prompts ignored)."""
        x = self._place(outputs)
        pixels = clip_preprocess(x, self.image_spec).to(self._model_dtype())
        embeddings = self.model.encode_image(pixels, normalize=True)
        return self.head(embeddings).float().to(outputs.device)

    def extra_repr(self) -> str:
        return (
            f"clip_model={self.clip_model!r}, clip_pretrained={self.clip_pretrained!r}, "
            f"head={self.head_source!r}, " + super().extra_repr()
        )


def _load_head_state(path: str) -> dict[str, torch.Tensor]:
    """An aesthetic head's state dict from safetensors, or from a torch file such as the released ``.pth``
    (tensors only: ``weights_only`` refuses pickled objects)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


@register_reward("clip_aesthetic")
class ClipAesthetic(_FrozenModelReward):
    """Text-free aesthetic score: an improved-aesthetic-predictor MLP (:class:`AestheticHead`) on the
    L2-normalised projected image embedding of a transformers ``CLIPModel``.

    :class:`LaionAesthetic`'s recipe with the CLIP loaded through transformers, so it takes any CLIP
    checkpoint folder, such as the shapes world's tiny CLIP with a head from
    ``genalign.worlds.shapes_aesthetic.train_aesthetic_head`` (scores on its rule's 1-10 scale).

    Args:
        model: hub id or local folder of a transformers ``CLIPModel``.
        head: the head's weights: a ``.safetensors`` file (``layers.0.weight`` ... ``layers.7.bias``, as
            ``save_aesthetic_head`` writes), a torch state-dict file with the same keys (e.g. the released
            LAION ``.pth``, whose 768-d input matches ``openai/clip-vit-large-patch14``), a folder holding
            ``aesthetic_head.safetensors``, or a hub repo holding that file.
        processor: hub id or folder with ``preprocessor_config.json``; default ``model``. No tokenizer
            is needed.
        device, dtype, local_files_only: as for :class:`ClipScore`.
    """

    def __init__(
        self,
        model: str,
        head: str,
        processor: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        local_files_only: bool = False,
    ) -> None:
        super().__init__(device)
        self.model_id, self.head_source = model, head
        self.processor_id = processor or model
        self.model = _load_transformers_clip_model("CLIP aesthetic", model, local_files_only, dtype)
        self.image_spec = _load_hf_image_spec("CLIP aesthetic", self.processor_id, local_files_only)
        try:
            head_file = _fetch_file(head, [CLIP_AESTHETIC_HEAD_FILENAME], local_files_only)
            state = _load_head_state(head_file)
        except Exception as exc:
            raise _load_error(
                "CLIP aesthetic head", head, "head", f"/path/to/{CLIP_AESTHETIC_HEAD_FILENAME}", exc
            ) from exc
        self.head = AestheticHead.from_state_dict(
            state, self.model.config.projection_dim, head_file, f"CLIP model {model!r}",
            "pass the CLIP the head was trained on, or train a head on this CLIP's embeddings "
            "(genalign.worlds.shapes_aesthetic.train_aesthetic_head)",
        )
        _freeze(self.head, self._model_dtype())
        self._finish_init()

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B]`` float32 aesthetic score on ``outputs.device`` (prompts ignored)."""
        x = self._place(outputs)
        pixels = clip_preprocess(x, self.image_spec).to(self._model_dtype())
        embeddings = F.normalize(_transformers_image_embeds(self.model, pixels), dim=-1)
        return self.head(embeddings).float().to(outputs.device)

    def extra_repr(self) -> str:
        return (
            f"model={self.model_id!r}, processor={self.processor_id!r}, head={self.head_source!r}, "
            + super().extra_repr()
        )


@register_reward("hpsv2")
class HPSv2(_FrozenModelReward):
    """Human Preference Score v2 / v2.1 (Wu et al., 2023): ``cos(image, text)`` with the HPS-tuned
    open_clip ViT-H-14, exactly the ``image_features @ text_features.T`` diagonal of the reference
    code (no logit scale), so good images score about 0.25-0.35. Needs one prompt per image.

    Args:
        checkpoint: hub repo holding the HPS files, or a local path to the checkpoint file (a dict
            with the model state dict under ``"state_dict"``) or its folder.
        version: ``"v2.0"`` (``HPS_v2_compressed.pt``) or ``"v2.1"`` (``HPS_v2.1_compressed.pt``);
            picks the file inside a repo or folder.
        clip_model: open_clip architecture the checkpoint was trained from.
        device, dtype, local_files_only: as for :class:`ClipScore`.

    Unlike the reference evaluation, which resizes the longest side and pads non-square images,
    images are resized on the shortest side and centre-cropped; square images are treated the same.
    """

    def __init__(
        self,
        checkpoint: str = DEFAULT_HPS_CHECKPOINT,
        version: str = "v2.1",
        clip_model: str = "ViT-H-14",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        local_files_only: bool = False,
    ) -> None:
        super().__init__(device)
        if version not in HPS_FILENAMES:
            raise RewardError(f"unknown HPS version {version!r}; use one of {sorted(HPS_FILENAMES)}")
        self.checkpoint, self.version, self.clip_model = checkpoint, version, clip_model
        self.model, self.tokenizer, self.image_spec = _load_open_clip(
            f"HPS {version} checkpoint",
            clip_model,
            checkpoint,
            "checkpoint",
            [HPS_FILENAMES[version]],
            local_files_only,
            dtype,
        )
        self._finish_init()

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        """``[B, 3, H, W]`` + B prompts -> ``[B]`` float32 HPS on ``outputs.device``."""
        prompts = self._require_prompts(conditions)
        x = self._place(outputs)
        pixels = clip_preprocess(x, self.image_spec).to(self._model_dtype())
        image_embeds = self.model.encode_image(pixels, normalize=True)
        with torch.no_grad():
            text_embeds = self.model.encode_text(self.tokenizer(prompts).to(x.device), normalize=True)
        return (image_embeds * text_embeds).sum(dim=-1).float().to(outputs.device)

    def extra_repr(self) -> str:
        return (
            f"checkpoint={self.checkpoint!r}, version={self.version!r}, clip_model={self.clip_model!r}, "
            + super().extra_repr()
        )
