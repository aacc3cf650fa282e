"""Parrot on the shapes world against a plain loop: one epoch (the prompt-expansion network writes one expansion per
sample for the reward it serves, the T2I model samples from it, four rewards score the image against the short
prompt, batch-wise Pareto selection, then REINFORCE on the selected samples for the T2I model and the PEN)."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.pipelines.harness import Case, Outcome, Stopwatch
from benchmarks.pipelines.models import ImageModels, load_image_models
from benchmarks.pipelines.plain_diffusion import gaussian_log_prob
from benchmarks.pipelines.plain_training import EpochDraw, adamw, optimizer_step, read_prompts


def pareto_selection(scores: list[list[float]]) -> list[bool]:
    """The paper's double loop: a sample is kept unless another is at least as good in every reward and better in
    one."""
    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [not any(dominates(other, mine) for other in scores) for mine in scores]


def credits(scores: list[list[float]], prompt_index: list[int], targets: list[int], clip: float) -> list[float]:
    """Each sample's served reward, standardised within its prompt's samples, clipped to ±clip."""
    values, index = np.asarray(scores, dtype=np.float64), np.asarray(prompt_index)
    standardised = np.empty_like(values)
    for prompt in set(prompt_index):
        members = index == prompt
        group = values[members]
        standardised[members] = (group - group.mean(0)) / (group.std(0) + 1e-6)
    return np.clip(standardised[np.arange(len(targets)), targets], -clip, clip).tolist()


def reference(config, models: ImageModels) -> Outcome:
    """The epoch as a plain loop: per sample one PEN call, one sampler run from the expansion (batch 2 with CFG) and
    one reward call; then per selected sample and step one log-prob with gradients, and one PEN log-prob."""
    from genalign.generators.prompt_expansion import PromptExpansionNetwork

    parts, reward, s = models.parts, models.reward, config.sampling
    lora = config.trainer.lora
    unet_parameters = parts.add_lora(lora.rank, lora.alpha, lora.target_modules, config.trainer.seed)
    num_rewards = len(reward.objectives)
    pen = PromptExpansionNetwork.from_pretrained(config.pen.pretrained)
    pen.ensure_reward_tokens(num_rewards)
    pen.model.requires_grad_(True).eval()
    optimizer = adamw(config.trainer, unet_parameters,
                      [{"params": [p for p in pen.model.parameters() if p.requires_grad], "lr": config.pen.learning_rate}])
    prompts = read_prompts(config.prompts.file)
    draw = EpochDraw.make(config.trainer.seed, 0, len(prompts), config.prompts_per_epoch, config.samples_per_prompt)
    targets = [g % config.samples_per_prompt % num_rewards for g in range(len(draw))]
    timesteps = parts.timesteps(s.num_inference_steps)
    with Stopwatch() as clock:
        expansions, chains, scores = [], [], []
        for g, (prompt_index, seed) in enumerate(zip(draw.prompt_index, draw.seeds)):
            prompt = prompts[prompt_index]
            expansion_seed = int(np.random.default_rng([seed, sum(map(ord, "expansion"))]).integers(2**31 - 1))
            expansion = pen.expand([prompt], [(targets[g] + 1,)], seeds=[expansion_seed])
            with torch.no_grad():
                chain = parts.sample(expansion.texts[0], seed, s.num_inference_steps, s.guidance_scale, s.eta)
                scores.append(reward(parts.decode(chain[-1]), [prompt]).rewards[0].tolist())
            expansions.append(expansion)
            chains.append(chain)
        selected = pareto_selection(scores)
        credit = credits(scores, draw.prompt_index, targets, config.adv_clip_max)
        chosen = [g for g in range(len(draw)) if selected[g]]
        policy_loss = pen_loss = 0.0
        for g in chosen:
            weight = credit[g] / len(chosen)
            cond, uncond = parts.text(expansions[g].texts[0]), parts.text("")
            for i, t in enumerate(timesteps):
                output = parts.guided(chains[g][i], torch.tensor([t]), cond, uncond, s.guidance_scale)
                mean, std = parts.ddim_step(chains[g][i], output, t, s.num_inference_steps, s.eta)
                loss = -weight * gaussian_log_prob(chains[g][i + 1], mean, std, s.log_prob_reduction).sum()
                loss.backward()
                policy_loss += float(loss.detach())
            loss = -weight * pen.log_prob(expansions[g]).sum()
            loss.backward()
            pen_loss += float(loss.detach())
        grad_norm = optimizer_step(optimizer, config.trainer.max_grad_norm)
    return Outcome(clock.seconds, {"reward_mean": float(np.mean(np.sum(scores, axis=1))),
                                   "selected_fraction": len(chosen) / len(draw), "policy_loss": policy_loss,
                                   "pen_loss": pen_loss, "grad_norm": grad_norm})


CASE = Case(
    name="parrot",
    title="Parrot epoch, shapes world, 2 short prompts × 4 samples, PEN expansions, 10 DDIM steps, 4 rewards, "
          "batch-wise Pareto selection, REINFORCE on the T2I LoRA r16 and the PEN",
    config="parrot_shapes.yaml",
    overrides=["prompts_per_epoch=2", "samples_per_prompt=4", "train_batch_size=8", "gallery_prompts=0",
               "eval.gold.name=null"],
    test_overrides=["prompts_per_epoch=1", "train_batch_size=4", "sampling.num_inference_steps=2"],
    samples=lambda c: c.prompts_per_epoch * c.samples_per_prompt,
    updates=lambda c: c.updates_per_epoch,
    load_models=load_image_models,
    reference=reference,
    engine_values=lambda records: {key: records[0][key] for key in ("reward_mean", "selected_fraction", "policy_loss",
                                                                    "pen_loss", "grad_norm")},
    leaves_out="one PEN call (its own cached decoding), one sampler run (batch 2 with CFG) and one call of the "
               "4-reward stack per sample; the selected samples' log-probs one step and one sample at a time; "
               "Pareto selection as the paper's O(N²) double loop",
)
