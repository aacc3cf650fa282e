"""The models, prompts and folders the benchmarks run on: the committed worlds of `genalign/worlds/assets` and the
tiny SD-layout model of `genalign.worlds.tiny`."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "genalign" / "worlds" / "assets"
SHAPES_MODEL = ASSETS / "shapes" / "t2i"
TONES_MODEL = ASSETS / "tones" / "t2a"
CONFIGS = ROOT / "configs"
PROMPTS = ["a red circle", "two green stars", "a yellow sun", "a purple square"]


def prompt_lines(name: str, count: int | None = None) -> list[str]:
    """The first `count` lines of configs/prompts/<name>.txt (all of them for None)."""
    lines = (CONFIGS / "prompts" / f"{name}.txt").read_text().splitlines()
    return lines if count is None else lines[:count]


def tiny_sd_pipe(image_size: int):
    """The tiny SD-layout StableDiffusionPipeline at `image_size` pixels, progress bar off."""
    from genalign.worlds.tiny import build_tiny_text_to_image

    pipe = build_tiny_text_to_image("sd", image_size=image_size)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shapes_pipe(device: str):
    """The committed shapes-world model as a diffusers StableDiffusionPipeline, progress bar off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SHAPES_MODEL, safety_checker=None).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shapes_unet_batch(device: str):
    """The committed shapes-world UNet (eval mode) and one forward's inputs at the demo's sampling batch: 64
    held-out prompts + their unconditional copies, latents (128, C, H, W), timestep 500 for every row, and the
    text states (128, tokens, D). Returns (unet, latents, timesteps, text, description)."""
    import torch

    from genalign.generators.diffusion import DiffusionGenerator

    generator = DiffusionGenerator.from_pretrained(SHAPES_MODEL).to(device)
    unet = generator.denoiser.eval()
    prompts = prompt_lines("shapes_eval", 64)
    size = unet.config.sample_size
    with torch.no_grad():
        pixels = size * generator.vae_scale_factor
        text = generator.encode_prompts([""] * len(prompts) + prompts, pixels, pixels).embeds
    latents = torch.randn(len(text), unet.config.in_channels, size, size, device=device)
    timesteps = torch.full((len(text),), 500, device=device)
    description = f"shapes-world UNet forward, batch {len(text)} (64 images + CFG), {size}×{size} latents"
    return unet, latents, timesteps, text, description
