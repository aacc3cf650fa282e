"""ControlNet for `DiffusionGenerator`: building one from the base UNet, loading one, and checking control images.

A ControlNet (Zhang et al., 2023) is a trainable copy of the UNet's encoder that reads a control image (a
segmentation map, edges, depth, …) and adds its features to the frozen UNet's skip connections. In a trajectory
the control image travels in the conditioning under `CONTROL_KEY`, so log-prob re-evaluation and the
differentiable path see the same condition that sampling saw.
"""

from __future__ import annotations

import math

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from genalign.generators.base import ModelLoadError

CONTROL_KEY = "control"  # Conditions.tensors and Trajectory.conditioning: [B, 3, H, W] float in [0, 1]
# diffusers' default conditioning embedding for SD (8× VAE): three stride-2 convolutions, widths 16 … 256.
_SD_EMBEDDING_CHANNELS = (16, 32, 96, 256)
EMBEDDING_INIT_SEED = 0


def controlnet_from_unet(unet: UNet2DConditionModel, vae_scale_factor: int) -> ControlNetModel:
    """A ControlNet initialised from `unet` as diffusers does it (encoder weights copied, zero convolutions at 0,
    so the UNet's output is unchanged until it trains), with a conditioning embedding that downsamples the
    control image by the VAE's factor (SD's 8× gives diffusers' default; the shapes world's 4× one stride less)."""
    halvings = int(round(math.log2(vae_scale_factor)))
    if 2**halvings != vae_scale_factor:
        raise ModelLoadError(f"a ControlNet needs a power-of-two VAE scale factor, got {vae_scale_factor}")
    widths = tuple(_SD_EMBEDDING_CHANNELS[min(i, 3)] for i in range(halvings + 1))
    # The conditioning embedding starts random. Drawn from the global RNG it would depend on whatever ran before
    # (one process vs several, a test order), so a fixed seed makes it a function of the UNet alone; the caller's
    # RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EMBEDDING_INIT_SEED)
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths,
                                         load_weights_from_unet=True)


def load_controlnet(source: str, unet: UNet2DConditionModel, vae_scale_factor: int,
                    torch_dtype: torch.dtype | None = None, **kwargs) -> ControlNetModel:
    """`source` = "unet" (initialise from the base UNet), or a ControlNetModel folder or hub id (e.g.
    'lllyasviel/sd-controlnet-seg'); its geometry must match the UNet's."""
    if source == "unet":
        model = controlnet_from_unet(unet, vae_scale_factor)
        return model.to(dtype=torch_dtype) if torch_dtype is not None else model
    try:
        model = ControlNetModel.from_pretrained(source, torch_dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load a ControlNet from '{source}': {error}\nPass a ControlNetModel folder (config.json and "
            "diffusion_pytorch_model.safetensors), a hub id in the local cache, or 'unet' to initialise one from "
            "the base model's UNet."
        ) from error
    check_controlnet_matches(model, unet)
    return model


def check_controlnet_matches(controlnet: ControlNetModel, unet: UNet2DConditionModel) -> None:
    """Refuse a ControlNet built for another UNet (its residuals would not fit the skip connections)."""
    def geometry(config) -> dict:
        return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in config.items()
                if k in ("block_out_channels", "cross_attention_dim", "in_channels")}

    ours, theirs = geometry(controlnet.config), geometry(unet.config)
    if ours != theirs:
        raise ModelLoadError(f"the ControlNet was built for another UNet: its {ours} differ from the base UNet's "
                             f"{theirs}; load a ControlNet of this base model, or initialise one with 'unet'")


def check_control_image(control: torch.Tensor | None, batch: int, height: int, width: int,
                        has_controlnet: bool) -> None:
    """Clear errors for a missing, superfluous or misshaped control image ([B, 3, H, W] in [0, 1])."""
    if control is None:
        if has_controlnet:
            raise ValueError(f"this model has a ControlNet and needs a control image per sample: pass "
                             f"Conditions(texts=prompts, tensors={{'{CONTROL_KEY}': images [B, 3, H, W] in [0, 1]}})")
        return
    if not has_controlnet:
        raise ValueError(f"the conditions carry a '{CONTROL_KEY}' image but this model has no ControlNet; load one "
                         "with DiffusionGenerator.from_pretrained(..., controlnet='unet' or a ControlNet folder)")
    expected = (batch, 3, height, width)
    if tuple(control.shape) != expected:
        raise ValueError(f"control images have shape {tuple(control.shape)}, expected {expected} (one RGB image "
                         f"per sample at the output size {height}×{width}); resize them or set sampling "
                         "height/width to match")
    if not control.dtype.is_floating_point:
        raise ValueError(f"control images must be float in [0, 1], got {control.dtype}; convert class maps "
                         "to colour images first")
