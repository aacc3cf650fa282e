"""DRAKES on the DNA world against a plain loop: two updates (relaxed Gumbel-softmax sampling through the last K steps,
the reward oracle, and the exact KL to the pretrained model over every step). Two, because at the first update the
model is the pretrained one and the KL and its gradient are exactly zero."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.pipelines.harness import Case, Outcome, Stopwatch
from benchmarks.pipelines.models import MaskedModels, load_masked_models
from benchmarks.pipelines.plain_masked import gumbel
from benchmarks.pipelines.plain_training import EpochDraw, adamw, optimizer_step


def reference(config, models: MaskedModels) -> Outcome:
    """Each update as a plain loop over its samples: T − K hard steps without gradients, K relaxed steps, the KL of
    every step (hard and relaxed, each with its own forward pass) in one graph with the reward, one backward per
    sample."""
    model, reward = models.model, models.reward
    steps, k_relaxed, batch = config.sampling.num_inference_steps, config.grad_steps, config.batch_size
    policy = model.backbone.requires_grad_(True)
    pretrained = copy.deepcopy(policy).requires_grad_(False)
    optimizer = adamw(config.trainer, list(policy.parameters()))
    values: dict[str, float] = {}
    with Stopwatch() as clock:
        for epoch in range(config.epochs):
            draw = EpochDraw.make(config.trainer.seed, epoch, 1, batch, 1)
            rewards, kls = [], []
            for seed in draw.seeds:
                generator = torch.Generator().manual_seed(seed)
                x = torch.full((1, model.length), model.mask)
                hard_states = []
                with torch.no_grad():
                    for k in range(steps - k_relaxed):
                        hard_states.append(x)
                        x, _ = model.hard_step(policy, x, k, steps, generator)
                kl = sum((model.kl(policy, pretrained, state, k, steps) for k, state in enumerate(hard_states)),
                         torch.zeros(1, dtype=torch.float64))
                soft = F.one_hot(x, model.vocab + 1).float()
                for k in range(steps - k_relaxed, steps):
                    kl = kl + model.kl(policy, pretrained, soft, k, steps)
                    m_t, m_s = model.levels(k, steps)
                    log_p0 = model.log_p0(policy, soft)
                    mask_entry = torch.full_like(log_p0[..., :1], math.log(m_s / m_t) if m_s > 0 else -math.inf)
                    log_q = torch.cat([log_p0 + math.log((m_t - m_s) / m_t), mask_entry], dim=-1)
                    relaxed = torch.softmax((log_q + gumbel(model.uniforms(generator)).float()) / config.tau, dim=-1)
                    keep = 1.0 - soft[..., model.mask :]
                    soft = keep * soft + (1.0 - keep) * relaxed
                real = soft[..., : model.vocab]
                one_hot = real + (F.one_hot(real.argmax(-1), model.vocab).float() - real).detach()
                score = reward(one_hot, [""]).rewards[0]
                ((-score + config.alpha * kl[0]) / batch).backward()
                rewards.append(float(score.detach()))
                kls.append(float(kl.detach()))
            values[f"reward_mean_{epoch}"] = float(np.mean(rewards))
            values[f"kl_{epoch}"] = float(np.mean(kls))
            values[f"grad_norm_{epoch}"] = optimizer_step(optimizer, config.trainer.max_grad_norm)
    return Outcome(clock.seconds, {key: values[key] for key in ("reward_mean_0", "grad_norm_0", "kl_1", "grad_norm_1")})


CASE = Case(
    name="drakes",
    title="DRAKES, 2 updates, DNA world (drakes_dna), 8 sequences of 128 bp, 32 steps, K = 8 relaxed, α = 0.01, "
          "full fine-tuning",
    config="drakes_dna.yaml",
    overrides=["epochs=2", "batch_size=8", "train_batch_size=8", "eval.gold.name=null"],
    test_overrides=["batch_size=2", "train_batch_size=2", "sampling.num_inference_steps=6", "grad_steps=2",
                    "kl_chunk_steps=2"],
    samples=lambda c: c.batch_size,
    updates=lambda c: 1,
    load_models=load_masked_models,
    reference=reference,
    engine_values=lambda records: {"reward_mean_0": records[0]["reward_mean"], "grad_norm_0": records[0]["grad_norm"],
                                   "kl_1": records[1]["kl"], "grad_norm_1": records[1]["grad_norm"]},
    leaves_out="one sequence per backbone call, one reward call per sequence; the KL of every step computed with its "
               "own policy and reference forward passes (the engine reuses the relaxed steps' logits) and "
               "backpropagated in one graph with the reward (the engine backpropagates the hard steps' KL in chunks)",
)
