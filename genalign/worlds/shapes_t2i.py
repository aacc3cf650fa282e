"""The shapes world's text-to-image model: a tiny latent diffusion model in Stable Diffusion's layout.

Parts, all the classes a real SD 2.x checkpoint uses:
- ``AutoencoderKL``: 32x32 RGB <-> 8x8x8 latents (three encoder blocks, 4x downsampling; 8 channels rather
  than SD's 4, since a small shape spans about 2x2 latent positions that must carry its shape, colour and
  size). Trained here on rendered single-shape scenes; ``scaling_factor`` is set to 1 / std of its latents,
  as SD's 0.18215 was.
- ``UNet2DConditionModel`` on the 8x8 latents with cross-attention at 8x8 and 4x4: at this size attention
  is cheap (64 tokens), and position words need attention at the resolution where positions differ.
- the shapes CLIP's text tower (``CLIPTextModel``, frozen) and its real CLIP BPE tokenizer, so the model
  is conditioned on the same text encoder the CLIP-score reward uses, as SD 1.x is on OpenAI CLIP's.
- ``DDIMScheduler`` with SD's noise schedule and v-prediction (SD 2.x): with a small, imperfect denoiser,
  v keeps the predicted x0 bounded at high noise where an epsilon-predictor divides its error by sqrt(abar).

Training data are freshly rendered single-shape scenes with random-template captions; 10% of captions are
dropped to "" so classifier-free guidance has an unconditional model. The loss is the v-prediction MSE with
min-SNR-5 weighting (Hang et al., 2023), which converges markedly faster at small step counts.

The finished model is a normal diffusers folder (``StableDiffusionPipeline.save_pretrained``), loaded by
:meth:`genalign.generators.diffusion.DiffusionGenerator.from_pretrained` like any SD checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from . import shapes
from .schedules import warmup_cosine
from .tiny import sd_pipeline, sd_scheduler

IMAGE_SIZE = 32
LATENT_CHANNELS = 8
CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0


def build_shapes_vae(image_size: int = IMAGE_SIZE, width: int = 32) -> AutoencoderKL:
    """A 4x-downsampling AutoencoderKL: [B, 3, S, S] in [-1, 1] <-> [B, 8, S/4, S/4]."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(width, 2 * width, 2 * width),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=image_size,
    )


def build_shapes_unet(latent_size: int, cross_attention_dim: int, width: int = 64) -> UNet2DConditionModel:
    """UNet on [B, 8, latent_size, latent_size] latents with cross-attention at both resolutions."""
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(width, 2 * width),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,  # diffusers' historical name: this is the number of heads
        norm_num_groups=16,
    )


def _render_batch(
    n: int, rng: np.random.Generator, image_size: int, max_shapes: int
) -> tuple[Tensor, list[str], list[shapes.Scene]]:
    scenes = shapes.sample_scenes(n, rng=rng, max_shapes=max_shapes)
    captions = [shapes.caption(scene, rng=rng) for scene in scenes]
    return shapes.render(scenes, size=image_size).images, captions, scenes


def foreground_weights(masks: Tensor, weight: float) -> Tensor:
    """[B, H, W] shape labels -> [B, 1, H, W] per-pixel loss weights: ``weight`` on shapes and the pixels
    next to them, 1 on the background.

    A small shape covers about 3% of the image, so an unweighted reconstruction loss is mostly background:
    the autoencoder then learns backgrounds and blobs long before it keeps a shape's colour and outline.
    """
    near_shape = F.max_pool2d((masks > 0).float()[:, None], 3, stride=1, padding=1)
    return 1 + (weight - 1) * near_shape


# --- autoencoder --------------------------------------------------------------------------------------------


def train_shapes_vae(
    *,
    steps: int,
    batch_size: int = 32,
    image_size: int = IMAGE_SIZE,
    max_shapes: int = 1,
    width: int = 32,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    foreground_weight: float = 10.0,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[AutoencoderKL, dict[str, float]]:
    """Train the autoencoder on freshly rendered scenes: L1 + MSE reconstruction, weighted towards the shapes
    (:func:`foreground_weights`), plus a small KL term.

    A tiny KL weight (SD used 1e-6) keeps the latent close to deterministic, which is what a latent
    diffusion model wants; the latent scale it ends at is then absorbed by ``scaling_factor``.
    Seeded, and the caller's torch RNG is left as it was.

    Returns:
        (vae in eval mode, metrics): held-out ``reconstruction_mse`` (pixels in [0, 1]), ``latent_std`` and
        ``scaling_factor`` (1 / latent_std, written into the config), ``train_seconds``.
    """
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_shapes_vae(image_size, width)
        vae.train()
        optimiser = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(steps))
        for step in range(steps):
            scenes = shapes.sample_scenes(batch_size, rng=rng, max_shapes=max_shapes)
            rendered = shapes.render(scenes, size=image_size)
            pixels = rendered.images * 2 - 1
            weights = foreground_weights(rendered.masks, foreground_weight)
            posterior = vae.encode(pixels).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            error = reconstruction - pixels
            loss = (
                (weights * (error.abs() + error**2)).sum() / (weights.sum() * 3)
                + kl_weight * posterior.kl().mean()
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimiser.step()
            scheduler.step()
            if progress is not None:
                progress(step, loss.item())
    vae.eval()
    metrics = _vae_metrics(vae, seed + 1, image_size, max_shapes)
    vae.register_to_config(scaling_factor=metrics["scaling_factor"])
    metrics["train_seconds"] = time.perf_counter() - start
    return vae, metrics


@torch.no_grad()
def _vae_metrics(vae: AutoencoderKL, seed: int, image_size: int, max_shapes: int, n: int = 256) -> dict[str, float]:
    images, _, _ = _render_batch(n, np.random.default_rng(seed), image_size, max_shapes)
    latents = vae.encode(images * 2 - 1).latent_dist.mean
    reconstruction = (vae.decode(latents).sample.clamp(-1, 1) + 1) / 2
    latent_std = float(latents.std())
    return {
        "reconstruction_mse": float(F.mse_loss(reconstruction, images)),
        "latent_std": latent_std,
        "scaling_factor": 1.0 / latent_std,
    }


# --- denoiser -----------------------------------------------------------------------------------------------


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """The CLIP's text tower as a standalone ``CLIPTextModel`` (a copy: the CLIP itself is not touched)."""
    encoder = CLIPTextModel(clip.config.text_config)
    encoder.load_state_dict(clip.text_model.state_dict())
    return encoder.eval().requires_grad_(False)


@torch.no_grad()
def _encode_text(encoder: CLIPTextModel, tokenizer: CLIPTokenizer, captions: Sequence[str]) -> Tensor:
    """Captions -> [B, L, D] last hidden states, padded to the tokenizer's full length as SD pipelines do."""
    tokens = tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    )
    return encoder(tokens.input_ids)[0]


def min_snr_weights(timesteps: Tensor, alphas_cumprod: Tensor, gamma: float = MIN_SNR_GAMMA) -> Tensor:
    """Min-SNR-gamma loss weights for a v-prediction target: min(SNR, gamma) / (SNR + 1), shape [B]."""
    abar = alphas_cumprod[timesteps]
    snr = abar / (1 - abar)
    return snr.clamp(max=gamma) / (snr + 1)


@dataclass
class DenoiserTraining:
    """What :func:`train_shapes_unet` returns: the trained UNet and its loss curve (one value per step)."""

    unet: UNet2DConditionModel
    losses: list[float]
    train_seconds: float


def train_shapes_unet(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    *,
    steps: int,
    batch_size: int = 32,
    width: int = 64,
    max_shapes: int = 1,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> DenoiserTraining:
    """Train the UNet (VAE and text encoder frozen) with v-prediction and min-SNR weighting.

    Each step renders ``batch_size`` new scenes, encodes them with a posterior sample (times the VAE's
    scaling factor, as diffusers' training scripts do) and drops 10% of captions to "". Seeded, and the
    caller's torch RNG is left as it was.
    """
    image_size = vae.config.sample_size
    latent_size = image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    scheduler = sd_scheduler("v_prediction")
    alphas_cumprod = scheduler.alphas_cumprod
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_shapes_unet(latent_size, text_encoder.config.hidden_size, width)
        unet.train()
        optimiser = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
        lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(steps))
        for step in range(steps):
            images, captions, _ = _render_batch(batch_size, rng, image_size, max_shapes)
            captions = ["" if rng.random() < CAPTION_DROPOUT else text for text in captions]
            with torch.no_grad():
                latents = vae.encode(images * 2 - 1).latent_dist.sample() * vae.config.scaling_factor
                text = _encode_text(text_encoder, tokenizer, captions)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
            noisy = scheduler.add_noise(latents, noise, timesteps)
            target = scheduler.get_velocity(latents, noise, timesteps)
            prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample
            per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
            loss = (per_sample * min_snr_weights(timesteps, alphas_cumprod)).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimiser.step()
            lr_schedule.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step, losses[-1])
    unet.eval()
    return DenoiserTraining(unet=unet, losses=losses, train_seconds=time.perf_counter() - start)


def assemble_pipeline(
    vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer
) -> StableDiffusionPipeline:
    """The parts as a diffusers ``StableDiffusionPipeline`` (DDIM, SD schedule, v-prediction)."""
    return sd_pipeline(vae, text_encoder, tokenizer, unet, sd_scheduler("v_prediction"))


def save_shapes_t2i(pipe: StableDiffusionPipeline, folder: str | Path) -> Path:
    """Write the model as a diffusers folder (model_index.json + one subfolder per component)."""
    pipe.save_pretrained(folder)
    return Path(folder)
