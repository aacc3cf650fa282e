"""The tones world's text-to-audio model in diffusers' AudioLDM layout: a mel VAE, a UNet on its latents
conditioned on the tiny CLAP's text embedding, and the Griffin-Lim vocoder.

DESIGN.md measured the VAE as the bottleneck that bounds timbre (an under-trained one left instrument at
chance), so it gets 8 latent channels — AudioLDM's own choice — at 4× downsampling: (1, 200, 64) log-mels
become (8, 50, 16) latents, a 2× compression that keeps harmonic structure. Its reconstruction loss is L1 on
log-mels with a higher weight on bins above the noise floor, where timbre lives.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import AudioLDMPipeline, AutoencoderKL, UNet2DConditionModel
from torch import Tensor

from genalign.generators.griffin_lim import GriffinLimVocoder
from genalign.worlds.schedules import warmup_cosine
from genalign.worlds.tiny_audio import audio_unet, audioldm_scheduler, mel_vae

Progress = Callable[[int, float], None] | None
# Log-mel bins above this (natural log of magnitude) are signal; the floor is log(1e-5) ≈ −11.5.
_SIGNAL_LEVEL = -7.0
_SIGNAL_WEIGHT = 4.0


def mel_loss_weights(mels: Tensor) -> Tensor:
    """[B, 1, frames, bins] weights: `_SIGNAL_WEIGHT` on bins with signal, 1 on the floor."""
    return 1.0 + (_SIGNAL_WEIGHT - 1.0) * (mels > _SIGNAL_LEVEL).float()


def train_mel_vae(
    mels: Tensor,
    *,
    steps: int,
    batch_size: int,
    widths: tuple[int, ...] = (16, 32, 64),
    latent_channels: int = 8,
    kl_weight: float = 1e-6,
    lr: float = 1e-3,
    crop_frames: int | None = 32,
    seed: int = 0,
    progress: Progress = None,
) -> tuple[AutoencoderKL, dict]:
    """Train an AutoencoderKL on log-mels.

    A convolutional VAE is translation-equivariant in time, so it trains on random `crop_frames`-frame
    windows (a multiple of the downsampling), a quarter of the cost of whole 2 s clips; held-out
    reconstruction is measured on whole clips.

    Args:
        mels: [N, frames, bins] log-mels (the vocoder's `log_mel` front end); the last 5% are held out.
    Returns:
        (the VAE with `scaling_factor` set to 1/std of its training latents, report with held-out L1 on all
        bins and on signal bins, wall time).
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    data = mels.unsqueeze(1).float()
    held = max(1, len(data) // 20)
    train, test = data[:-held], data[-held:]
    vae = mel_vae(widths, latent_channels)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    for step in range(steps):
        batch = train[torch.randint(len(train), (batch_size,), generator=generator)]
        if crop_frames and crop_frames < batch.shape[2]:
            offset = int(torch.randint(0, batch.shape[2] - crop_frames + 1, (1,), generator=generator))
            batch = batch[:, :, offset : offset + crop_frames]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        rec = (mel_loss_weights(batch) * (recon - batch).abs()).mean()
        loss = rec + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress:
            progress(step, float(rec.detach()))
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(train[i : i + 64]).latent_dist.mean for i in range(0, min(len(train), 512), 64)])
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        recon = torch.cat([vae.decode(vae.encode(test[i : i + 64]).latent_dist.mean).sample
                           for i in range(0, len(test), 64)])
        error = (recon - test).abs()
        signal = test > _SIGNAL_LEVEL
    report = {
        "vae_l1": float(error.mean()),
        "vae_l1_signal_bins": float(error[signal].mean()),
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "latent_shape": list(latents.shape[1:]),
        "scaling_factor": float(vae.config.scaling_factor),
        "wall_s": time.perf_counter() - start,
    }
    return vae, report


@torch.no_grad()
def encode_mels(vae: AutoencoderKL, mels: Tensor, batch_size: int = 64) -> Tensor:
    """[N, frames, bins] log-mels → scaled latent means [N, C, frames/4, bins/4] (what the UNet learns)."""
    parts = [vae.encode(mels[i : i + batch_size].unsqueeze(1).float()).latent_dist.mean
             for i in range(0, len(mels), batch_size)]
    return torch.cat(parts) * vae.config.scaling_factor


def train_tones_unet(
    latents: Tensor,
    text_embeds: Tensor,
    empty_embed: Tensor,
    *,
    steps: int,
    batch_size: int,
    widths: tuple[int, ...] = (32, 64, 64),
    lr: float = 1e-3,
    uncond_probability: float = 0.1,
    seed: int = 0,
    progress: Progress = None,
) -> tuple[UNet2DConditionModel, dict]:
    """Train an AudioLDM-layout UNet with the ε-prediction loss and caption dropout for CFG.

    Args:
        latents: [N, C, h, w] scaled VAE latents; text_embeds: [N, D] the captions' unit CLAP text embeddings;
        empty_embed: [D] the embedding of "" (the unconditional input, as the pipeline encodes it).
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    scheduler = audioldm_scheduler()
    unet = audio_unet(latents.shape[2], latents.shape[3], text_embeds.shape[1], widths=widths,
                      latent_channels=latents.shape[1])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    generator = torch.Generator().manual_seed(seed)
    alphas = scheduler.alphas_cumprod
    unet.train()
    losses = []
    for step in range(steps):
        rows = torch.randint(len(latents), (batch_size,), generator=generator)
        x0, cond = latents[rows], text_embeds[rows].clone()
        drop = torch.rand(batch_size, generator=generator) < uncond_probability
        cond[drop] = empty_embed
        t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prediction = unet(noisy, t, encoder_hidden_states=None, class_labels=cond).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if progress:
            progress(step, float(loss.detach()))
    unet.eval()
    tail = losses[-max(1, steps // 10):]
    return unet, {"unet_loss_last10pct": sum(tail) / len(tail), "unet_params": sum(p.numel() for p in unet.parameters()),
                  "wall_s": time.perf_counter() - start}


def assemble_tones_pipeline(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder, tokenizer,
                            vocoder: GriffinLimVocoder) -> AudioLDMPipeline:
    """The parts as diffusers' AudioLDMPipeline (what `AudioDiffusionGenerator.from_pretrained` loads)."""
    return AudioLDMPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=audioldm_scheduler(), vocoder=vocoder)
