"""DRAGON on the shapes world against a plain loop: one round (on-policy demonstrations scored by the CLIP reward,
each prompt's best sample paired with its worst, Diffusion-DPO updates against the frozen base model)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.pipelines.harness import Case, Outcome, Stopwatch
from benchmarks.pipelines.models import ImageModels, load_image_models
from benchmarks.pipelines.plain_training import EpochDraw, adamw, optimizer_step, read_prompts


def reference(config, models: ImageModels) -> Outcome:
    """The round as a plain loop: each sample drawn and scored on its own; per prompt the best and the worst sample
    form a pair; each update draws t and ε per pair from its seed, and computes the policy's and the base model's
    denoising error of winner and loser one call each (the base model by switching the LoRA adapters off)."""
    parts, reward, s = models.parts, models.reward, config.sampling
    lora = config.trainer.lora
    optimizer = adamw(config.trainer, parts.add_lora(lora.rank, lora.alpha, lora.target_modules, config.trainer.seed))
    prompts = read_prompts(config.prompts.file)
    draw = EpochDraw.make(config.trainer.seed, 0, len(prompts), config.prompts_per_epoch, config.samples_per_prompt)
    group = config.samples_per_prompt

    def denoising_error(latents: torch.Tensor, prompt: str, seed: int) -> torch.Tensor:
        """‖target − UNet(x_t, t, c)‖² averaged over elements, for t and ε drawn from `seed` (t first)."""
        generator = torch.Generator().manual_seed(int(seed))
        t = torch.randint(parts.scheduler.config.num_train_timesteps, (1,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        noisy = parts.scheduler.add_noise(latents, noise, t)
        target = parts.scheduler.get_velocity(latents, noise, t)  # the shapes model predicts v
        return (parts.denoise(noisy, t, parts.text(prompt)) - target).pow(2).mean()

    with Stopwatch() as clock:
        finals, rewards = [], []
        for prompt_index, seed in zip(draw.prompt_index, draw.seeds):
            with torch.no_grad():
                final = parts.sample(prompts[prompt_index], seed, s.num_inference_steps, s.guidance_scale, s.eta)[-1]
                rewards.append(float(reward(parts.decode(final), [prompts[prompt_index]]).rewards[0]))
            finals.append(final)
        pairs = []
        for start in range(0, len(rewards), group):
            members = list(range(start, start + group))
            best, worst = max(members, key=lambda i: rewards[i]), min(members, key=lambda i: rewards[i])
            if rewards[best] > rewards[worst]:
                pairs.append((best, worst))
        losses, grad_norm = [], 0.0
        for update in range(config.updates_per_epoch):
            seeds = np.random.SeedSequence([config.trainer.seed, 0, update, 11]).generate_state(len(pairs))
            loss_sum = 0.0
            for (winner, loser), seed in zip(pairs, seeds):
                texts = prompts[draw.prompt_index[winner]], prompts[draw.prompt_index[loser]]
                with torch.no_grad():
                    parts.unet.disable_adapters()
                    ref_w, ref_l = (denoising_error(finals[i], text, seed) for i, text in zip((winner, loser), texts))
                    parts.unet.enable_adapters()
                policy_w, policy_l = (denoising_error(finals[i], text, seed) for i, text in zip((winner, loser), texts))
                delta = (policy_w - ref_w) - (policy_l - ref_l)
                loss = -F.logsigmoid(-config.beta * delta) / len(pairs)
                loss.backward()
                loss_sum += float(loss.detach())
            grad_norm = optimizer_step(optimizer, config.trainer.max_grad_norm)
            losses.append(loss_sum)
    return Outcome(clock.seconds, {"reward_mean": float(np.mean(rewards)), "dragon_loss": float(np.mean(losses)),
                                   "grad_norm": grad_norm})


CASE = Case(
    name="dragon",
    title="DRAGON round, shapes world, 4 prompts × 4 samples, 10 DDIM steps, paired construction, Diffusion-DPO, "
          "2 updates, LoRA r16",
    config="dragon_shapes.yaml",
    overrides=["prompts_per_epoch=4", "samples_per_prompt=4", "updates_per_epoch=2", "train_batch_size=4",
               "demo_gallery_round=null", "eval.gold.name=null"],
    test_overrides=["prompts_per_epoch=2", "samples_per_prompt=2", "sampling.num_inference_steps=2"],
    samples=lambda c: c.prompts_per_epoch * c.samples_per_prompt,
    updates=lambda c: c.updates_per_epoch,
    load_models=load_image_models,
    reference=reference,
    engine_values=lambda records: {key: records[0][key] for key in ("reward_mean", "dragon_loss", "grad_norm")},
    leaves_out="samples without recording trajectories or log-probs; every UNet call one sample (the policy's and "
               "the base model's errors of winner and loser four calls per pair, the engine batches a micro-batch's "
               "pairs), every reward call one image, prompts re-encoded per call",
)
