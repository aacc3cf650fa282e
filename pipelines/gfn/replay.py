"""A replay buffer of scored trajectories for off-policy GFlowNet training, checkpointed with the run.

It keeps the last `capacity` trajectories as their actions and objectives (not their states, which
`replay_actions` rebuilds), so replayed trajectories cost no reward call and a checkpoint stays small. Every
process adds the same gathered batch in global order and draws with the same seeded generator, so all processes
hold the same buffer and resuming restores it exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipelines.gfn.environments import Environment
from pipelines.gfn.policies import Trajectories


def replay_actions(env: Environment, actions: Tensor, lengths: Tensor) -> Trajectories:
    """Rebuild the states of trajectories from their actions [B, T] (−1 past the end) and lengths [B]."""
    state = env.initial_states(len(actions), actions.device)
    states = [state]
    for t in range(actions.shape[1]):
        live = t < lengths
        state = torch.where(live[:, None], env.step(state, actions[:, t].clamp_min(0)), state)
        states.append(state)
    return Trajectories(torch.stack(states, dim=1), actions, lengths)


class ReplayBuffer:
    """A ring buffer of (actions, lengths, objectives)."""

    def __init__(self, capacity: int, max_steps: int, num_objectives: int) -> None:
        self.capacity = capacity
        self.actions = torch.full((capacity, max_steps), -1, dtype=torch.long)
        self.lengths = torch.zeros(capacity, dtype=torch.long)
        self.objectives = torch.zeros(capacity, num_objectives, dtype=torch.float64)
        self.size = 0
        self.next = 0  # the slot the next trajectory overwrites

    def __len__(self) -> int:
        return self.size

    def add(self, actions: Tensor, lengths: Tensor, objectives: Tensor) -> None:
        """Store trajectories given by their actions [B, T], lengths [B] and objectives [B, K] (oldest overwritten)."""
        for row in range(len(actions)):
            self.actions[self.next] = actions[row].cpu()
            self.lengths[self.next] = lengths[row].cpu()
            self.objectives[self.next] = objectives[row].cpu()
            self.next = (self.next + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """`count` stored entries drawn uniformly with replacement: actions [n, T], lengths [n], objectives [n, K]."""
        if self.size == 0:
            raise RuntimeError("the replay buffer is empty; add trajectories before sampling")
        index = torch.randint(self.size, (count,), generator=generator)
        return self.actions[index], self.lengths[index], self.objectives[index]

    def state_dict(self) -> dict:
        return {"actions": self.actions.clone(), "lengths": self.lengths.clone(), "objectives": self.objectives.clone(),
                "size": self.size, "next": self.next}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["actions"].shape) != tuple(self.actions.shape):
            raise ValueError(f"the checkpoint's replay buffer is {tuple(state['actions'].shape)}, this run's "
                             f"{tuple(self.actions.shape)}; resume with the same replay_capacity and task")
        self.actions.copy_(state["actions"])
        self.lengths.copy_(state["lengths"])
        self.objectives.copy_(state["objectives"])
        self.size, self.next = int(state["size"]), int(state["next"])
