"""Ctrl-U on the shapes world's segmentation ControlNet against a plain loop: one update (two noised copies of each
training example, the diffusion loss on both, and for t ≤ t_max the reward model on both decoded one-step estimates,
its loss weighted by exp(−U) plus λ_u·mean U)."""

from __future__ import annotations

import torch

from benchmarks.pipelines.harness import Case, Outcome, Stopwatch
from benchmarks.pipelines.models import ImageModels, load_image_models
from benchmarks.pipelines.plain_training import EpochDraw, adamw, optimizer_step


def reference(config, models: ImageModels) -> Outcome:
    """The update as a plain loop over the examples: each one encoded, noised twice and predicted one copy at a time,
    each decoded estimate read by the reward model on its own, one backward per example. The per-pixel loss and
    uncertainty are the condition type's own formulas (`rewards.controllability`), which define the reward."""
    from genalign.control_data import build_control_dataset

    parts, reward = models.parts, models.reward
    controlnet = parts.controlnet.requires_grad_(True)
    optimizer = adamw(config.trainer, list(controlnet.parameters()))
    data = build_control_dataset(config.data.name, config.condition, **config.data.kwargs)
    draw = EpochDraw.make(config.trainer.seed, 0, data.size("train"), config.batch_size, 1)
    steps = parts.scheduler.config.num_train_timesteps
    n = len(draw)
    sums = {"loss": 0.0, "diffusion_loss": 0.0, "reward_loss": 0.0}
    with Stopwatch() as clock:
        for index, seed in zip(draw.prompt_index, draw.seeds):
            example = data.examples([index], "train")
            with torch.no_grad():
                posterior = parts.vae.encode(example.samples * 2 - 1).latent_dist
                clean = posterior.sample(torch.Generator().manual_seed(seed)) * parts.vae.config.scaling_factor
            generator = torch.Generator().manual_seed(seed + 1)
            t = torch.randint(steps, (1,), generator=generator)
            noise = torch.randn(clean.shape[1:], generator=generator)[None]
            rewarded = bool(t <= config.max_reward_timestep)
            diffusion_loss, predictions = 0.0, []
            for copy_t in (t, (t + 1).clamp(max=steps - 1)):
                noisy = parts.scheduler.add_noise(clean, noise, copy_t)
                output = parts.denoise(noisy, copy_t, parts.text(example.texts[0]), example.control)
                target = parts.scheduler.get_velocity(clean, noise, copy_t)
                diffusion_loss = diffusion_loss + (output - target).pow(2).mean() / 2
                if rewarded:
                    alpha = parts.scheduler.alphas_cumprod[copy_t].double()
                    x0, _ = parts.x0_and_eps(output.double(), noisy.double(), alpha)
                    predictions.append(reward.predict(parts.decode(x0.float())))
            loss = diffusion_loss
            reward_loss = torch.zeros(())
            if rewarded:
                condition = reward.condition
                uncertainty = config.uncertainty_scale * condition.uncertainty(*predictions)
                pixel_loss, labelled = condition.pixel_loss(predictions[0], example.target)
                weight = labelled.float()
                reward_loss = (torch.exp(-uncertainty) * pixel_loss * weight).sum() / weight.sum().clamp_min(1.0)
                loss = loss + config.reward_weight * reward_loss + config.uncertainty_weight * uncertainty.mean()
            (loss / n).backward()
            for key, value in (("loss", loss), ("diffusion_loss", diffusion_loss), ("reward_loss", reward_loss)):
                sums[key] += float(value.detach()) / n
        grad_norm = optimizer_step(optimizer, config.trainer.max_grad_norm)
    return Outcome(clock.seconds, {**sums, "grad_norm": grad_norm})


CASE = Case(
    name="ctrl_u",
    title="Ctrl-U update, shapes world segmentation ControlNet, 8 examples (two noised copies each), reward model "
          "on x̂_0 for t ≤ 400, full fine-tuning of the ControlNet",
    config="ctrl_u_shapes_segmentation.yaml",
    # No ramp: the reward term counts from the first update (with the shipped ramp its weight is 0 there).
    overrides=["batch_size=8", "train_batch_size=8", "ramp_updates=0", "evaluation=null"],
    test_overrides=["batch_size=4", "train_batch_size=4"],
    samples=lambda c: c.batch_size,
    updates=lambda c: 1,
    load_models=load_image_models,
    reference=reference,
    engine_values=lambda records: {key: records[0][key] for key in ("loss", "diffusion_loss", "reward_loss",
                                                                    "grad_norm")},
    leaves_out="one example per call: encoder, each noised copy through ControlNet + UNet, decoder and reward model; "
               "the caption re-encoded for each copy",
)
