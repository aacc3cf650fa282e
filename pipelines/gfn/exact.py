"""Exact terminal distributions of a GFlowNet policy on tasks small enough to enumerate: what the tests and the
HyperGrid evaluation compare with the target R(x)^β / Z."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipelines.gfn.environments import Environment, HyperGrid, MutationTask, SequenceTask
from pipelines.gfn.policies import _masked_log_softmax


@torch.no_grad()
def terminal_distribution(env: Environment, policy: nn.Module, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(terminals [N, D], P_T(x) [N] float64) of the policy's forward sampler over every terminal state.

    HyperGrid: flow propagation in topological order (by coordinate sum) — P(s') = Σ_s P(s)·P_F(s'|s), and
    P_T(x) = P(x)·P_F(stop|x). Sequences and mutation designs: each has one trajectory, so P_T(x) = Π_t P_F. `condition` is [C]
    (one conditioning vector for every state)."""
    terminals = env.enumerate_terminals()
    if terminals is None:
        raise ValueError(f"this {type(env).__name__} is too large to enumerate")
    device = next(policy.parameters()).device
    terminals = terminals.to(device)
    if isinstance(env, HyperGrid):
        return terminals, _grid_distribution(env, policy, terminals, condition)
    if isinstance(env, SequenceTask):
        return terminals, _sequence_distribution(env, policy, terminals, condition)
    if isinstance(env, MutationTask):
        return terminals, _mutation_distribution(env, policy, terminals, condition)
    raise TypeError(f"no exact distribution for a {type(env).__name__}")


def _repeat(condition: Tensor | None, n: int) -> Tensor | None:
    return None if condition is None else condition[None].expand(n, -1)


def _grid_distribution(env: HyperGrid, policy: nn.Module, states: Tensor, condition: Tensor | None) -> Tensor:
    log_pf = _masked_log_softmax(policy.step_logits(states, _repeat(condition, len(states))).double(),
                                 env.forward_mask(states))
    p_forward = log_pf.exp()
    index = {tuple(s.tolist()): i for i, s in enumerate(states)}
    reach = torch.zeros(len(states), dtype=torch.float64, device=states.device)
    reach[index[(0,) * env.ndim]] = 1.0
    for i in torch.argsort(states.sum(1)).tolist():
        for d in range(env.ndim):
            if states[i, d] < env.height - 1:
                child = states[i].clone()
                child[d] += 1
                reach[index[tuple(child.tolist())]] += reach[i] * p_forward[i, d]
    return reach * p_forward[:, -1]


def _sequence_distribution(env: SequenceTask, policy: nn.Module, terminals: Tensor, condition: Tensor | None) -> Tensor:
    lengths = env.lengths(terminals)
    steps = env.max_steps
    actions = torch.full((len(terminals), steps), -1, dtype=torch.long, device=terminals.device)
    actions[:, : env.max_length] = torch.where(terminals == env.pad, -1, terminals)
    if env.has_stop:
        actions[torch.arange(len(terminals)), lengths] = env.num_actions - 1
    n = lengths + int(env.has_stop)
    states = terminals[:, None].expand(-1, steps + 1, -1)  # only the terminal state is read by SequencePolicy
    log_pf, _, _ = policy(states.contiguous(), actions, n, _repeat(condition, len(terminals)))
    return log_pf.sum(1).double().exp()


def _mutation_distribution(env: MutationTask, policy: nn.Module, terminals: Tensor, condition: Tensor | None) -> Tensor:
    from pipelines.gfn.replay import replay_actions

    actions, lengths = env.trajectory_actions(terminals)
    trajectories = replay_actions(env, actions, lengths)
    log_pf, _, _ = policy(trajectories.states, actions, lengths, _repeat(condition, len(terminals)))
    return log_pf.sum(1).double().exp()
