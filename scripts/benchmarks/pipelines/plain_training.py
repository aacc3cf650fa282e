"""What every plain reference loop shares: the epoch's prompts and seeds, the optimiser step as the trainer takes it,
and the per-prompt reward normalisation of the policy-gradient methods."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class EpochDraw:
    """Which samples epoch `epoch` draws: prompt index and noise seed per sample. The reference takes them from the
    engine's `EpochPlan` so that both sides sample the same thing (the plan is the run's seeding scheme, not part of
    any method); it never uses the plan's process split or order."""

    prompt_index: list[int]
    seeds: list[int]

    @classmethod
    def make(cls, seed: int, epoch: int, num_prompts: int, prompts_per_epoch: int,
             samples_per_prompt: int) -> "EpochDraw":
        from genalign.engine import EpochPlan

        plan = EpochPlan.make(seed=seed, epoch=epoch, num_prompts=num_prompts, prompts_per_epoch=prompts_per_epoch,
                              samples_per_prompt=samples_per_prompt)
        return cls([int(i) for i in plan.prompt_index], [int(s) for s in plan.seeds])

    def __len__(self) -> int:
        return len(self.seeds)


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def adamw(trainer_config, parameters: list[torch.nn.Parameter],
          extra_groups: list[dict] = ()) -> torch.optim.AdamW:
    """AdamW with the trainer config's settings; `extra_groups` are further parameter groups (e.g. log Z)."""
    c = trainer_config
    return torch.optim.AdamW([{"params": parameters, "lr": c.learning_rate}, *extra_groups], lr=c.learning_rate,
                             betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_eps, weight_decay=c.weight_decay)


def optimizer_step(optimizer: torch.optim.Optimizer, max_grad_norm: float) -> float:
    """Clip every group's gradients to `max_grad_norm` together, step, zero; returns the norm before clipping."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def normalised_per_prompt(rewards: list[float], prompt_index: list[int], clip: float) -> list[float]:
    """(r − mean) / (std + 1e-6) within each prompt's samples of the epoch, clipped to ±clip."""
    rewards_array, index = np.asarray(rewards, dtype=np.float64), np.asarray(prompt_index)
    out = np.empty_like(rewards_array)
    for prompt in set(prompt_index):
        members = index == prompt
        group = rewards_array[members]
        out[members] = (group - group.mean()) / (group.std() + 1e-6)
    return np.clip(out, -clip, clip).tolist()
