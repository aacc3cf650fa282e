"""A latent text-to-image model as the plain reference loops use it: the diffusers modules, and the few formulas a
researcher writes around them (the DDIM step with its Gaussian log-density, as DDPO's `ddim_step_with_logprob`
does), one sample at a time, with nothing cached between calls.

This is the benchmark's own code, independent of `genalign.generators.diffusion`: the same model computed by a
second implementation, which is what lets the pipeline benchmarks check that the engine computes the same update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class PlainDiffusion:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    controlnet: ControlNetModel | None = None

    @classmethod
    def load(cls, folder: str | Path, controlnet: str | Path | None = None) -> "PlainDiffusion":
        """The diffusers folder's parts (and a ControlNet folder), frozen and in eval mode."""
        parts = cls(
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
            controlnet=None if controlnet is None else ControlNetModel.from_pretrained(controlnet),
        )
        for module in (parts.unet, parts.vae, parts.text_encoder, parts.controlnet):
            if module is not None:
                module.requires_grad_(False).eval()
        return parts

    def add_lora(self, rank: int, alpha: float, target_modules: list[str], seed: int) -> list[torch.nn.Parameter]:
        """LoRA adapters on the UNet as diffusers' training scripts add them; A is drawn from torch's RNG seeded
        with the run's seed (as the trainer seeds it). Returns the trainable parameters."""
        from peft import LoraConfig

        torch.manual_seed(seed)
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                         target_modules=list(target_modules)))
        return [p for p in self.unet.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ one call each
    def text(self, prompt: str) -> torch.Tensor:
        """The prompt's CLIP token states [1, L, D]."""
        ids = self.tokenizer([prompt], padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]

    def denoise(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                control: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's output for latents x [n, C, h, w] at timestep t (with the ControlNet's residuals when there is
        one; `control` [n, 3, H, W] in [0, 1])."""
        residuals = {}
        if self.controlnet is not None:
            down, mid = self.controlnet(x, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.unet(x, t, encoder_hidden_states=text, return_dict=False, **residuals)[0]

    def guided(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Classifier-free guidance for one sample: the UNet on [∅; c] in one call of batch 2."""
        out_uncond, out_cond = self.denoise(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    def x0_and_eps(self, output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x̂_0 and ε̂ from the model output (ε- or v-prediction) at ᾱ = alpha."""
        if self.scheduler.config.prediction_type == "v_prediction":
            return alpha.sqrt() * x - (1 - alpha).sqrt() * output, alpha.sqrt() * output + (1 - alpha).sqrt() * x
        return (x - (1 - alpha).sqrt() * output) / alpha.sqrt(), output

    def ddim_step(self, x: torch.Tensor, output: torch.Tensor, t: int, steps: int,
                  eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The DDIM step's Gaussian: (mean, std) of x_{t−Δ} given x_t and the guided model output."""
        alphas = self.scheduler.alphas_cumprod
        previous = t - self.scheduler.config.num_train_timesteps // steps
        alpha = alphas[t]
        alpha_prev = alphas[previous] if previous >= 0 else self.scheduler.final_alpha_cumprod
        x0, eps = self.x0_and_eps(output, x, alpha)
        std = eta * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)).sqrt()
        mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps
        return mean, std

    def timesteps(self, steps: int) -> list[int]:
        self.scheduler.set_timesteps(steps)
        return [int(t) for t in self.scheduler.timesteps]

    # ------------------------------------------------------------------ a whole sample
    def sample(self, prompt: str, seed: int, steps: int, scale: float, eta: float,
               grad_steps: int = 0) -> list[torch.Tensor]:
        """One sample's latents x_T … x_0 ([1, C, h, w] each), its noise drawn from a generator seeded with `seed`
        (x_T first, then one draw per step). The last `grad_steps` steps carry gradients."""
        generator = torch.Generator().manual_seed(seed)
        size = self.unet.config.sample_size
        shape = (1, self.unet.config.in_channels, size, size)
        with torch.no_grad():
            cond, uncond = self.text(prompt), self.text("")
        states = [torch.randn(shape, generator=generator) * self.scheduler.init_noise_sigma]
        timesteps = self.timesteps(steps)
        for i, t in enumerate(timesteps):
            with torch.set_grad_enabled(i >= steps - grad_steps and torch.is_grad_enabled()):
                t_tensor = torch.tensor([t])
                mean, std = self.ddim_step(states[-1], self.guided(states[-1], t_tensor, cond, uncond, scale), t,
                                           steps, eta)
                noise = torch.randn(shape, generator=generator) if std > 0 else torch.zeros(shape)
                states.append(mean + std * noise)
        return states

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images [n, 3, H, W] in [0, 1]."""
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str) -> torch.Tensor:
    """log N(x; mean, std²) per sample [n], summed or averaged over the elements. In float64: the engine's
    importance ratios (ε = 1e-4) and PRDP's clipped log-ratios (ε = 1e-6) are below float32's resolution of a
    log-density, so a faithful reimplementation needs it too."""
    x, mean, std = x.double(), mean.double(), torch.as_tensor(std).double()
    per_element = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    per_element = per_element.flatten(1)
    return per_element.sum(1) if reduction == "sum" else per_element.mean(1)


def sample_and_score(parts: PlainDiffusion, reward, prompts: list[str], draw,
                     sampling) -> tuple[list[list[torch.Tensor]], list[float]]:
    """One sampler call and one reward call per sample of `draw` (an EpochDraw), without gradients: each sample's
    chain [x_T, …, x_0] (latents (1, C, H, W)) and its reward."""
    chains, rewards = [], []
    for prompt_index, seed in zip(draw.prompt_index, draw.seeds):
        with torch.no_grad():
            chain = parts.sample(prompts[prompt_index], seed, sampling.num_inference_steps, sampling.guidance_scale,
                                 sampling.eta)
            rewards.append(float(reward(parts.decode(chain[-1]), [prompts[prompt_index]]).rewards[0]))
        chains.append(chain)
    return chains, rewards
