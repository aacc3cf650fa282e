"""DRaFT-K and AlignProp (K drawn per epoch) on the shapes world against a plain loop: one epoch (one update: sample
with gradients through the last K steps, score with the differentiable CLIP reward, minimise −reward)."""

from __future__ import annotations

import numpy as np

from benchmarks.pipelines.harness import Case, Outcome, Stopwatch
from benchmarks.pipelines.models import ImageModels, load_image_models
from benchmarks.pipelines.plain_training import EpochDraw, adamw, optimizer_step, read_prompts


def truncation(config, epoch: int) -> int:
    """K of this epoch: fixed, or (AlignProp) uniform in [min_grad_steps, grad_steps] from the run's seed."""
    if not config.random_truncation:
        return config.grad_steps
    return int(np.random.default_rng([config.trainer.seed, epoch, 7]).integers(config.min_grad_steps,
                                                                                config.grad_steps + 1))


def reference(config, models: ImageModels) -> Outcome:
    """The epoch as a plain loop: each sample drawn with gradients through its last K steps (no activation
    checkpointing), decoded and scored on its own, its −reward/B backpropagated at once."""
    parts, reward, s = models.parts, models.reward, config.sampling
    lora = config.trainer.lora
    optimizer = adamw(config.trainer, parts.add_lora(lora.rank, lora.alpha, lora.target_modules, config.trainer.seed))
    prompts = read_prompts(config.prompts.file)
    draw = EpochDraw.make(config.trainer.seed, 0, len(prompts), config.batch_size, 1)
    k = truncation(config, 0)
    with Stopwatch() as clock:
        rewards = []
        for prompt_index, seed in zip(draw.prompt_index, draw.seeds):
            prompt = prompts[prompt_index]
            chain = parts.sample(prompt, seed, s.num_inference_steps, s.guidance_scale, s.eta, grad_steps=k)
            score = reward(parts.decode(chain[-1]), [prompt]).rewards[0]
            (-score / len(draw)).backward()
            rewards.append(float(score.detach()))
        grad_norm = optimizer_step(optimizer, config.trainer.max_grad_norm)
    return Outcome(clock.seconds, {"reward_mean": float(np.mean(rewards)), "grad_norm": grad_norm})


def _case(name: str, title: str, overrides: list[str], test_overrides: list[str], leaves_out: str) -> Case:
    """A case on draft_shapes.yaml; DRaFT-K and AlignProp differ only in how K is chosen."""
    return Case(
        name=name,
        title=title,
        config="draft_shapes.yaml",
        overrides=["batch_size=8", "train_batch_size=4", "eval.gold.name=null", *overrides],
        test_overrides=["batch_size=2", "train_batch_size=1", "sampling.num_inference_steps=2", *test_overrides],
        samples=lambda c: c.batch_size,
        updates=lambda c: 1,
        load_models=load_image_models,
        reference=reference,
        engine_values=lambda records: {"reward_mean": records[0]["reward_mean"], "grad_norm": records[0]["grad_norm"]},
        leaves_out=leaves_out,
    )


LEAVES_OUT = ("every sampler call is one sample (batch 2 with CFG), every reward call one image, gradients through "
              "the last K steps without activation checkpointing (the engine checkpoints each tracked step and the "
              "decoder, which costs it a recomputation)")
DRAFT = _case("draft", "DRaFT-2 epoch, shapes world, 8 samples (2 micro-batches of 4), 10 DDIM steps (CFG 3, η = 1), "
                       "CLIP-score reward, LoRA r16", ["grad_steps=2"], [], LEAVES_OUT)
# K is drawn from the run's seed and the epoch: 10 for epoch 0 at seed 0 (the longest truncation AlignProp draws).
ALIGNPROP = _case("alignprop", "AlignProp epoch (K uniform in 1…10 per epoch; this epoch draws K = 10), otherwise as "
                               "DRaFT-2", ["grad_steps=10", "random_truncation=true", "min_grad_steps=1"],
                  ["grad_steps=2"], LEAVES_OUT)
