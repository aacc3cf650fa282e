"""Tiny random-initialised text-to-image models with the real Stable Diffusion layouts.

They exist so that every code path that loads a real checkpoint (a diffusers folder or a hub id) can be
exercised offline: the components are the same diffusers/transformers classes as SD 1.x/2.x and SDXL,
only a thousand times smaller. Weights are random, so images are noise-like until fine-tuned.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

Layout = Literal["sd", "sdxl"]


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins that CLIP's byte-level BPE uses for raw bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codepoints.append(256 + extra)
            extra += 1
    return [chr(c) for c in codepoints]


def character_clip_tokenizer(model_max_length: int = 16) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary is single byte-characters (no merges), built with no download.

    Real CLIP tokenizers load through the same class; this one just spells every word letter by letter.
    """
    alphabet = _byte_level_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = os.path.join(tmp, "vocab.json")
        merges_file = os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=model_max_length)


def _text_config(tokenizer: CLIPTokenizer, hidden: int, seed_offset: int = 0) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sd_scheduler(prediction_type: Literal["epsilon", "v_prediction"] = "epsilon") -> DDIMScheduler:
    """DDIM with Stable Diffusion's noise schedule and step spacing."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def sd_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
) -> StableDiffusionPipeline:
    """SD 1.x/2.x parts as a diffusers pipeline, without a safety checker (none can be loaded offline)."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_text_to_image(
    layout: Layout = "sd",
    *,
    image_size: int = 32,
    seed: int = 0,
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction",
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Build a random-initialised diffusers pipeline with SD 1.x/2.x (`sd`) or SDXL (`sdxl`) layout.

    The VAE downsamples by 2, so `image_size` 32 gives latents of shape [4, 16, 16]. v-prediction (as in
    SD 2.x) is the default because it keeps a random denoiser's x̂_0 at unit scale at every noise level
    (x̂_0 = √ᾱ·x_t − √(1−ᾱ)·v); a random ε-predictor's x̂_0 blows up by 1/√ᾱ at high noise.
    """
    torch.manual_seed(seed)
    hidden = 32
    latent_size = image_size // 2
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
    )
    _calibrate_decoder(vae, latent_size)
    scheduler = sd_scheduler(prediction_type)
    tokenizer = character_clip_tokenizer()
    unet_kwargs = dict(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    if layout == "sd":
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden))
        unet = UNet2DConditionModel(cross_attention_dim=hidden, **unet_kwargs)
        _calibrate_unet(unet, latent_size, hidden)
        return sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    if layout == "sdxl":
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, hidden))
        addition_time_embed_dim = 8
        unet = UNet2DConditionModel(
            cross_attention_dim=2 * hidden,
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=hidden + 6 * addition_time_embed_dim,
            transformer_layers_per_block=(1, 1),
            **unet_kwargs,
        )
        _calibrate_unet(unet, latent_size, 2 * hidden, pooled_dim=hidden)
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=character_clip_tokenizer(),
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    raise ValueError(f"unknown layout {layout!r}; use 'sd' or 'sdxl'")


@torch.no_grad()
def _calibrate_unet(unet: UNet2DConditionModel, latent_size: int, cross_dim: int, pooled_dim: int = 0) -> None:
    """Scale the random UNet's output layer so its noise prediction has unit variance, as a trained one does.

    An uncalibrated random UNet predicts noise ~10× too large, so sampled latents explode and decoded
    images saturate — nothing a reward fine-tuning test could move.
    """
    x = torch.randn(4, unet.config.in_channels, latent_size, latent_size)
    text = torch.randn(4, 8, cross_dim)
    added = None
    if pooled_dim:
        added = {"text_embeds": torch.randn(4, pooled_dim), "time_ids": torch.ones(4, 6)}
    out = unet(x, torch.full((4,), 500), encoder_hidden_states=text, added_cond_kwargs=added).sample
    unet.conv_out.weight.div_(out.std())
    unet.conv_out.bias.zero_()


@torch.no_grad()
def _calibrate_decoder(vae: AutoencoderKL, latent_size: int) -> None:
    """Scale the random decoder so unit-variance latents decode to images with low contrast (std ≈ 0.2
    in [-1, 1], leaving JPEG-size headroom both ways), and set the latent scaling factor to 1 (our latents are unit-variance by construction)."""
    vae.register_to_config(scaling_factor=1.0)
    image = vae.decode(torch.randn(4, vae.config.latent_channels, latent_size, latent_size)).sample
    vae.decoder.conv_out.weight.mul_(0.2 / image.std())
    vae.decoder.conv_out.bias.zero_()


def smooth_latents(batch: int, channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Unit-variance latent fields with only low spatial frequencies (bilinear-upsampled 4×4 noise)."""
    coarse = torch.randn(batch, channels, 4, 4, generator=generator)
    fields = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return fields / fields.std(dim=(1, 2, 3), keepdim=True)


def pretrain_on_smooth_latents(
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, steps: int, *, seed: int = 0, batch: int = 16
) -> list[float]:
    """Denoising-train the UNet for a few steps on smooth latent fields (the text encoders stay frozen).

    A random UNet samples white-noise latents whose decoded JPEG size is already near its ceiling; after
    this short pre-training the model makes smooth images, like a real model, so rewards that prefer
    texture (JPEG incompressibility) or smoothness both have room to move. Returns the loss curve.
    """
    unet, scheduler = pipe.unet, pipe.scheduler
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    size = unet.config.sample_size
    sdxl = hasattr(pipe, "text_encoder_2")
    with torch.no_grad():
        prompts = ["a red circle", "a blue square", "two green stars", "a yellow sun", ""]
        if sdxl:
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        else:
            embeds = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)[0]
    losses = []
    unet.train()
    for _ in range(steps):
        x0 = smooth_latents(batch, unet.config.in_channels, size, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        pick = torch.randint(0, len(prompts), (batch,), generator=gen)
        added = None
        if sdxl:
            added = {"text_embeds": pooled[pick], "time_ids": torch.tensor([[32, 32, 0, 0, 32, 32]] * batch).float()}
        x_t = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
        pred = unet(x_t, t, encoder_hidden_states=embeds[pick], added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    unet.eval()
    return losses


def save_tiny_text_to_image(
    path: str | os.PathLike, layout: Layout = "sd", *, pretrain_steps: int = 0, **kwargs
) -> Path:
    """Write a tiny model as a normal diffusers folder (model_index.json + one subfolder per component).

    `pretrain_steps` > 0 first runs `pretrain_on_smooth_latents` (≈ 8 s per 100 steps on 2 CPU cores).
    """
    pipe = build_tiny_text_to_image(layout, **kwargs)
    if pretrain_steps:
        pretrain_on_smooth_latents(pipe, pretrain_steps, seed=kwargs.get("seed", 0))
    pipe.save_pretrained(path)
    return Path(path)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny text-to-image model as a diffusers folder.")
    parser.add_argument("path")
    parser.add_argument("--layout", choices=["sd", "sdxl"], default="sd")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    save_tiny_text_to_image(args.path, args.layout, pretrain_steps=args.pretrain_steps, seed=args.seed)
    print(f"wrote {args.path}")
