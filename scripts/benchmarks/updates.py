"""The cost of one policy-gradient update against plain passes on the same batch (tiny SD model, CFG, η = 1)."""

from __future__ import annotations

import torch

from benchmarks.timing import paired
from benchmarks.worlds import PROMPTS, tiny_sd_pipe
from genalign.generators.diffusion import DiffusionGenerator, PromptEmbeds, SamplingOptions


def trainable_rollout(args):
    """The tiny model with every denoiser weight trainable, and a recorded batch of trajectories (CFG, η = 1)."""
    gen = DiffusionGenerator.from_pipeline(tiny_sd_pipe(args.image_size).to(args.device))
    gen.denoiser.requires_grad_(True)
    prompts = PROMPTS * (args.batch // len(PROMPTS))
    options = SamplingOptions(num_inference_steps=args.steps, guidance_scale=5.0, eta=1.0)
    return gen, prompts, gen.sample(prompts, options, seeds=list(range(len(prompts)))).trajectory


def bench_ddpo(args) -> dict:
    """One DDPO update (PPO-clip loss through `step_log_prob`) vs a bare denoiser forward+backward on the same batch."""
    from pipelines.ddpo import ddpo_loss

    gen, prompts, traj = trainable_rollout(args)
    middle = args.steps // 2
    step = torch.full((len(prompts),), middle)
    adv = torch.randn(len(prompts))

    def update():
        lp = gen.step_log_prob(traj, step)
        loss, _ = ddpo_loss(lp, traj.log_probs[:, middle], adv.to(lp.device), 1e-4)
        loss.backward()
        gen.denoiser.zero_grad(set_to_none=True)

    x = traj.states[:, middle]
    t = gen.schedule(traj.options).timesteps[middle].expand(len(prompts)).to(x.device)
    cond = PromptEmbeds.from_conditioning(traj.conditioning)
    uncond = PromptEmbeds.from_conditioning(traj.conditioning, "uncond_")

    def bare():
        out = gen.predict(x, t, cond, uncond, traj.options.guidance_scale)
        out.float().pow(2).mean().backward()
        gen.denoiser.zero_grad(set_to_none=True)

    base, mine = paired(bare, update, args.repeats)
    return {"benchmark": f"DDPO update on {len(prompts)} samples (one timestep, CFG)",
            "baseline": "bare denoiser forward+backward, same batch", "baseline_s": base, "ours_s": mine,
            "ratio": mine / base, "ddpo_updates_per_s": 1 / mine}


def bench_prdp(args) -> list[dict]:
    """PRDP's update vs DDPO's on the same batch, both over every sampling step (DDPO's timestep_fraction 1)."""
    from pipelines.ddpo import ddpo_loss
    from pipelines.prdp import PRDPConfig, loss_coefficients

    gen, prompts, traj = trainable_rollout(args)
    steps = traj.trainable_steps.tolist()
    rewards = torch.randn(len(prompts), device=gen.device)
    groups = torch.arange(len(prompts), device=gen.device) // 4
    config = PRDPConfig(beta=1e-3, clip_range=1e-4)
    adv = torch.randn(len(prompts), device=gen.device)

    def log_prob(step):
        return gen.step_log_prob(traj, torch.full((len(prompts),), step))

    def ddpo():
        for step in steps:
            loss, _ = ddpo_loss(log_prob(step), traj.log_probs[:, step].to(gen.device), adv, 1e-4)
            loss.backward()
        gen.denoiser.zero_grad(set_to_none=True)

    def prdp(values_pass: bool):
        ratios = torch.zeros(len(prompts), len(steps), device=gen.device, dtype=torch.float64)
        if values_pass:
            with torch.no_grad():
                ratios = torch.stack([log_prob(step) for step in steps], dim=1) - ratios
        _, coefficients, _ = loss_coefficients(ratios, rewards, groups, config)
        for j, step in enumerate(steps):
            (coefficients[:, j] * log_prob(step)).sum().backward()
        gen.denoiser.zero_grad(set_to_none=True)

    rows = []
    for values_pass, name in ((False, "first update of an epoch (θ = θ_old, as every update when K = 1)"),
                              (True, "later update (K > 1: no-grad values pass first)")):
        base, mine = paired(ddpo, lambda: prdp(values_pass), args.repeats)
        rows.append({"benchmark": f"PRDP {name}, {len(prompts)} samples × {len(steps)} steps, CFG",
                     "baseline": "DDPO update (PPO-clip, all steps), same batch", "baseline_s": base,
                     "ours_s": mine, "ratio": mine / base})
    return rows
