"""Reverse-diffusion steps as Gaussian policies, with exact log-probabilities (spec 00).

A diffusers scheduler's `step()` returns the next sample but not its density. Here each step of a DDIM
(η > 0) or DDPM schedule is written as x_{t-1} ~ N(μ_θ(x_t, t, c), σ_t² I): `StepSchedule` holds the
per-step scalars (ᾱ_t, ᾱ_{t-1}, σ_t) read from the scheduler's own tensors, `step_mean` computes μ_θ from
a model output, and `gaussian_log_prob` gives log π_θ(x_{t-1} | x_t, c). The formulas mirror diffusers'
`DDIMScheduler.step` / `DDPMScheduler.step` so that sampling here reproduces their samples exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler

LogProbReduction = Literal["sum", "mean"]
MIN_TRAINABLE_STD = 1e-6


class SchedulerNotSupportedError(ValueError):
    """A scheduler whose steps are not Gaussian with a known variance (so no exact log-probability)."""


@dataclass
class StepSchedule:
    """Per inference step i (0 = noisiest): the scalars of the Gaussian step x_{t_i} → x_{t_i − Δ}.

    Attributes (all 1-D tensors of length T = number of inference steps, float64 for exactness):
        timesteps: t_i as the denoiser sees it (long).
        alpha_prod: ᾱ_{t_i}.
        alpha_prod_prev: ᾱ of the step's target timestep (the scheduler's final ᾱ after the last step).
        std: σ_i, the step's noise standard deviation (0 for a deterministic step).
    """

    kind: Literal["ddim", "ddpm"]
    prediction_type: str
    timesteps: torch.Tensor
    alpha_prod: torch.Tensor
    alpha_prod_prev: torch.Tensor
    std: torch.Tensor
    clip_sample_range: float | None
    eta: float

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def stochastic(self) -> torch.Tensor:
        """Bool [T]: steps with a usable density to train on.

        DDPM's last step has σ = 1e-10 in diffusers (a clamped zero variance); its "log-probability" would
        be ~1e20, so steps with σ below `MIN_TRAINABLE_STD` count as deterministic.
        """
        return self.std > MIN_TRAINABLE_STD

    @classmethod
    def from_scheduler(
        cls, scheduler: DDIMScheduler | DDPMScheduler, num_inference_steps: int, eta: float = 1.0
    ) -> "StepSchedule":
        """Read the step scalars from a diffusers scheduler after `set_timesteps(num_inference_steps)`.

        DDIM uses σ_t = η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t−1}); DDPM uses its configured fixed variance
        (η is ignored: DDPM is η = 1 by construction) and is deterministic on its last step, as diffusers is.
        """
        config = scheduler.config
        if getattr(config, "thresholding", False):
            raise SchedulerNotSupportedError(
                "dynamic thresholding makes x̂_0 depend on batch statistics; set the scheduler's "
                "thresholding=False (clip_sample is supported)"
            )
        if config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise SchedulerNotSupportedError(
                f"prediction_type {config.prediction_type!r} is not supported; use epsilon, v_prediction or sample"
            )
        scheduler.set_timesteps(num_inference_steps)
        timesteps = scheduler.timesteps.detach().cpu().long()
        alphas = scheduler.alphas_cumprod.detach().cpu().double()
        alpha_prod = alphas[timesteps]
        clip = float(config.clip_sample_range) if config.clip_sample else None

        if isinstance(scheduler, DDIMScheduler):
            if eta < 0:
                raise ValueError(f"eta must be ≥ 0, got {eta}")
            ratio = config.num_train_timesteps // num_inference_steps
            prev = timesteps - ratio
            final = torch.tensor(float(scheduler.final_alpha_cumprod), dtype=torch.float64)
            alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], final)
            variance = (1 - alpha_prev) / (1 - alpha_prod) * (1 - alpha_prod / alpha_prev)
            std = eta * variance.sqrt()
            return cls("ddim", config.prediction_type, timesteps, alpha_prod, alpha_prev, std, clip, eta)

        if isinstance(scheduler, DDPMScheduler):
            if config.variance_type not in ("fixed_small", "fixed_large"):
                raise SchedulerNotSupportedError(
                    f"DDPM variance_type {config.variance_type!r} is not supported; use fixed_small or fixed_large"
                )
            prev = torch.cat([timesteps[1:], torch.tensor([-1])])
            alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], torch.ones((), dtype=torch.float64))
            beta = 1 - alpha_prod / alpha_prev
            if config.variance_type == "fixed_small":
                variance = ((1 - alpha_prev) / (1 - alpha_prod) * beta).clamp(min=1e-20)
            else:
                variance = beta
            std = torch.where(timesteps > 0, variance.sqrt(), torch.zeros_like(variance))
            return cls("ddpm", config.prediction_type, timesteps, alpha_prod, alpha_prev, std, clip, 1.0)

        raise SchedulerNotSupportedError(
            f"{type(scheduler).__name__} has no exact per-step log-probability here; "
            "use DDIMScheduler (with eta > 0 for a stochastic policy) or DDPMScheduler "
            "(e.g. DDIMScheduler.from_config(pipe.scheduler.config))"
        )

    def gather(self, step_index: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-sample (ᾱ_t, ᾱ_prev, σ) for step indices [B], shaped and typed to broadcast against `like`."""
        shape = (-1,) + (1,) * (like.ndim - 1)
        idx = step_index.detach().cpu().long()
        out = []
        for values in (self.alpha_prod, self.alpha_prod_prev, self.std):
            out.append(values[idx].to(device=like.device, dtype=like.dtype).reshape(shape))
        return tuple(out)


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Step arithmetic runs in float32 at least (half-precision models), float64 for float64 models."""
    return torch.promote_types(tensor.dtype, torch.float32)


def predicted_x0_and_eps(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_prod: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂_0 and ε̂ from a denoiser output under the three diffusers parameterisations."""
    beta_prod = 1 - alpha_prod
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - beta_prod.sqrt() * eps) / alpha_prod.sqrt()
    elif prediction_type == "v_prediction":
        x0 = alpha_prod.sqrt() * sample - beta_prod.sqrt() * model_output
        eps = alpha_prod.sqrt() * model_output + beta_prod.sqrt() * sample
    else:  # "sample"
        x0 = model_output
        eps = (sample - alpha_prod.sqrt() * x0) / beta_prod.sqrt()
    return x0, eps


def step_mean(
    schedule: StepSchedule, model_output: torch.Tensor, sample: torch.Tensor, step_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian step's mean μ_θ and standard deviation σ.

    Args:
        model_output: guided denoiser output [B, C, H, W].
        sample: x_t [B, C, H, W].
        step_index: [B] index into the schedule (samples may sit at different steps).
    Returns:
        (mean [B, C, H, W], std [B, 1, 1, 1]) in float32 (float64 for a float64 model).
    """
    dtype = compute_dtype(model_output)
    model_output = model_output.to(dtype)
    sample = sample.to(dtype)
    alpha_prod, alpha_prev, std = schedule.gather(step_index, sample)
    x0, eps = predicted_x0_and_eps(model_output, sample, alpha_prod, schedule.prediction_type)
    if schedule.clip_sample_range is not None:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    if schedule.kind == "ddim":
        # diffusers keeps the unclipped ε̂ in the direction term (use_clipped_model_output=False).
        mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps
    else:
        beta_t = 1 - alpha_prod / alpha_prev
        mean = (alpha_prev.sqrt() * beta_t / (1 - alpha_prod)) * x0 + (
            (alpha_prod / alpha_prev).sqrt() * (1 - alpha_prev) / (1 - alpha_prod)
        ) * sample
    return mean, std


def gaussian_log_prob(
    next_sample: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    reduction: LogProbReduction = "sum",
) -> torch.Tensor:
    """log N(next_sample; mean, std² I), summed (the true density) or averaged over the non-batch elements.

    Args:
        next_sample, mean: [B, ...]; std: broadcastable to them, all > 0.
    Returns:
        [B] in float64: a sum over ~1e4 latent elements reaches |log p| ≈ 1e4, where float32's resolution
        (~1e-3) would swamp importance ratios clipped at 1 ± 1e-4, and PRDP's ε = 1e-6 is a few float32 ulps
        even with mean reduction. Differences of two log-probs are then exact to ~1e-12.
    """
    if bool((std <= 0).any()):
        raise ValueError(
            "a deterministic step (σ = 0) has no density; train only on stochastic steps "
            "(StepSchedule.stochastic) or sample with eta > 0"
        )
    next_sample, mean, std = next_sample.double(), mean.double(), std.double()
    per_element = (
        -((next_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    )
    per_element = per_element.flatten(1)
    return per_element.sum(dim=1) if reduction == "sum" else per_element.mean(dim=1)
