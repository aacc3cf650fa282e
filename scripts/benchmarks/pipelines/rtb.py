"""Relative trajectory balance on the DNA world against a plain loop: two updates, each drawing a batch (a quarter from
the pretrained model, the rest from the fine-tuned one), scoring it, and minimising mean (log Z + log p_φ(τ) −
log p_pre(τ) − β·log r(x))² with a learned log Z set from the first batch."""

from __future__ import annotations

import copy

import numpy as np
import torch

from benchmarks.pipelines.harness import Case, Outcome, Stopwatch
from benchmarks.pipelines.models import MaskedModels, load_masked_models
from benchmarks.pipelines.plain_training import EpochDraw, adamw, optimizer_step


def reference(config, models: MaskedModels) -> Outcome:
    """Each update as a plain loop: every trajectory drawn on its own (states only, no log-probs recorded) and scored
    on its own; then log p_φ(τ) with gradients and log p_pre(τ) without, step by step for every trajectory (both
    recomputed, none reused from sampling), in one graph; one backward of the batch's mean δ²."""
    model, reward = models.model, models.reward
    steps, batch, beta = config.sampling.num_inference_steps, config.batch_size, config.beta
    policy = model.backbone.requires_grad_(True)
    pretrained = copy.deepcopy(policy).requires_grad_(False)
    log_z = torch.nn.Parameter(torch.zeros(()))
    optimizer = adamw(config.trainer, list(policy.parameters()),
                      [{"params": [log_z], "lr": config.log_z_learning_rate, "weight_decay": 0.0}])
    n_prior = round(config.prior_fraction * batch)
    values: dict[str, float] = {}

    def trajectory_log_prob(network, states: list[torch.Tensor]) -> torch.Tensor:
        return sum(model.step_log_q(network, states[k], k, steps).gather(-1, states[k + 1][..., None]).sum()
                   for k in range(steps))

    with Stopwatch() as clock:
        for epoch in range(config.epochs):
            draw = EpochDraw.make(config.trainer.seed, epoch, 1, batch, 1)
            chains, log_rewards = [], []
            for index, seed in enumerate(draw.seeds):
                sampler = pretrained if index < n_prior else policy
                generator = torch.Generator().manual_seed(seed)
                chain = [torch.full((1, model.length), model.mask)]
                with torch.no_grad():
                    for k in range(steps):
                        chain.append(model.hard_step(sampler, chain[-1], k, steps, generator)[0])
                    log_rewards.append(float(reward(chain[-1], [""]).rewards[0]))  # log r = the score (identity)
                chains.append(chain)
            log_p = torch.stack([trajectory_log_prob(policy, chain) for chain in chains])
            with torch.no_grad():
                log_pre = torch.stack([trajectory_log_prob(pretrained, chain) for chain in chains])
            log_r = torch.tensor(log_rewards, dtype=torch.float64)
            if epoch == 0:
                with torch.no_grad():
                    log_z.fill_(float((beta * log_r - log_p + log_pre).mean()))
            delta = log_z.double() + log_p - log_pre - beta * log_r
            loss = delta.pow(2).mean()
            loss.backward()
            on_policy = slice(n_prior, batch)
            values[f"rtb_loss_{epoch}"] = float(loss.detach())
            values[f"reward_mean_{epoch}"] = float(np.mean(log_rewards[on_policy]))
            values[f"grad_norm_{epoch}"] = optimizer_step(optimizer, config.trainer.max_grad_norm)
    return Outcome(clock.seconds, {key: values[key] for key in COMPARED})


# log Z is set so that the first batch's mean δ is zero, so its gradient in the first update is zero up to round-off,
# and Adam's first step (about ±lr whatever the gradient's size) moves it by round-off-decided amounts: log Z and the
# second update's loss differ between any two implementations by ~1e-4 relative, and are not compared.
COMPARED = ("rtb_loss_0", "reward_mean_0", "grad_norm_0", "reward_mean_1", "grad_norm_1")

CASE = Case(
    name="rtb",
    title="RTB, 2 updates, DNA world (rtb_dna), 8 sequences of 128 bp (2 from the pretrained model), 32 steps, "
          "β = 100, full fine-tuning",
    config="rtb_dna.yaml",
    overrides=["epochs=2", "batch_size=8", "train_batch_size=8", "eval.gold.name=null"],
    test_overrides=["batch_size=4", "train_batch_size=4", "sampling.num_inference_steps=4", "chunk_steps=2"],
    samples=lambda c: c.batch_size,
    updates=lambda c: 1,
    load_models=load_masked_models,
    reference=reference,
    engine_values=lambda records: {key: records[int(key[-1])][key[:-2]] for key in COMPARED},
    leaves_out="one sequence per backbone call, one reward call per sequence; no log-probs recorded while sampling "
               "(both densities recomputed: the engine reuses the sampler's and evaluates only the other model's), "
               "one graph over every step of the batch (the engine backpropagates chunks of steps)",
)
