"""GFlowNet training objectives on batches of padded trajectories (spec ../shared/specs/gflownets.md).

A batch holds B trajectories s_0 → … → s_n of different lengths n_b ≤ T, padded to T transitions:

* ``log_pf`` [B, T]: log P_F(s_{t+1} | s_t) of transition t (a stop action included, when the environment has one);
* ``log_pb`` [B, T]: log P_B(s_t | s_{t+1}); 0 for a stop transition and for autoregressive environments (P_B = 1);
* ``lengths`` [B] long: n_b, the number of real transitions; entries at t ≥ n_b are ignored (may be anything finite);
* ``log_flows`` [B, T+1]: log F(s_t) of the states s_0 … s_{n−1}; entry n (the state after the last transition:
  the terminal object, or the sink after a stop action) is ignored and replaced by ``log_reward``, since the
  flow into it is the reward;
* ``log_reward`` [B]: log R(x) (or β·log R(x)), the target of every objective.

Every function returns a loss to minimise (a scalar) or per-trajectory terms; all are plain differentiable torch
functions with no model in them, so the pipeline, the tests and the torchgfn cross-check call the same code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rewards.pareto import non_dominated_mask


def _valid(lengths: Tensor, steps: int) -> Tensor:
    """[B, steps] bool: transition t of trajectory b is real (t < n_b)."""
    return torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]


def _check(log_pf: Tensor, log_pb: Tensor, lengths: Tensor) -> None:
    if log_pf.shape != log_pb.shape or log_pf.ndim != 2:
        raise ValueError(f"log_pf and log_pb must both be [B, T]; got {tuple(log_pf.shape)} and {tuple(log_pb.shape)}")
    if lengths.shape != log_pf.shape[:1]:
        raise ValueError(f"lengths must be [B] = [{log_pf.shape[0]}]; got {tuple(lengths.shape)}")
    if bool((lengths < 1).any()) or bool((lengths > log_pf.shape[1]).any()):
        raise ValueError(f"every length must be in 1 … T = {log_pf.shape[1]}; got {lengths.tolist()}")


def trajectory_log_ratio(log_pf: Tensor, log_pb: Tensor, lengths: Tensor) -> Tensor:
    """Σ_t (log P_F − log P_B) over each trajectory's real transitions: [B]."""
    _check(log_pf, log_pb, lengths)
    return ((log_pf - log_pb) * _valid(lengths, log_pf.shape[1])).sum(1)


def trajectory_balance_residuals(log_pf: Tensor, log_pb: Tensor, lengths: Tensor, log_reward: Tensor,
                                 log_z: Tensor) -> Tensor:
    """δ_b = log Z + Σ_t log P_F − log R(x) − Σ_t log P_B, [B]; `log_z` is a scalar or [B] (log Z(ω) per sample)."""
    return log_z + trajectory_log_ratio(log_pf, log_pb, lengths) - log_reward


def trajectory_balance(log_pf: Tensor, log_pb: Tensor, lengths: Tensor, log_reward: Tensor, log_z: Tensor) -> Tensor:
    """TB: mean over trajectories of δ_b² (Malkin et al., 2022)."""
    return trajectory_balance_residuals(log_pf, log_pb, lengths, log_reward, log_z).pow(2).mean()


def _flows_with_reward(log_flows: Tensor, lengths: Tensor, log_reward: Tensor) -> Tensor:
    """log_flows [B, T+1] with entry n_b set to log R(x_b)."""
    if log_flows.ndim != 2 or log_flows.shape[0] != lengths.shape[0]:
        raise ValueError(f"log_flows must be [B, T+1]; got {tuple(log_flows.shape)}")
    terminal = torch.nn.functional.one_hot(lengths, log_flows.shape[1]).bool()
    return torch.where(terminal, log_reward[:, None].to(log_flows.dtype), log_flows)


def detailed_balance_residuals(log_pf: Tensor, log_pb: Tensor, log_flows: Tensor, lengths: Tensor,
                               log_reward: Tensor) -> Tensor:
    """log F(s_t) + log P_F(s_{t+1}|s_t) − log F(s_{t+1}) − log P_B(s_t|s_{t+1}) per transition, [B, T]; the
    flow after the last transition is R(x). Padding transitions are 0."""
    _check(log_pf, log_pb, lengths)
    if log_flows.shape[1] != log_pf.shape[1] + 1:
        raise ValueError(f"log_flows must be [B, T+1] = [B, {log_pf.shape[1] + 1}]; got {tuple(log_flows.shape)}")
    flows = _flows_with_reward(log_flows, lengths, log_reward)
    residuals = flows[:, :-1] + log_pf - flows[:, 1:] - log_pb
    return residuals * _valid(lengths, log_pf.shape[1])


def detailed_balance(log_pf: Tensor, log_pb: Tensor, log_flows: Tensor, lengths: Tensor, log_reward: Tensor,
                     transitions: float | None = None) -> Tensor:
    """DB (Bengio et al., 2023): the mean of the squared residuals over every real transition in the batch —
    their sum divided by `transitions` (default: this batch's, Σ lengths; a share of a larger batch passes the
    larger batch's count per share, so that the shares' mean is the whole batch's DB)."""
    residuals = detailed_balance_residuals(log_pf, log_pb, log_flows, lengths, log_reward)
    return residuals.pow(2).sum() / (lengths.sum() if transitions is None else transitions)


def subtrajectory_balance(log_pf: Tensor, log_pb: Tensor, log_flows: Tensor, lengths: Tensor, log_reward: Tensor,
                          lamda: float = 0.9) -> Tensor:
    """SubTB(λ) (Madan et al., 2023): per trajectory Σ_{i<j≤n} λ^{j−i} δ_ij² / Σ_{i<j≤n} λ^{j−i}, averaged over
    trajectories, where δ_ij = log F(s_i) + Σ_{k=i}^{j−1}(log P_F − log P_B)_k − log F(s_j) and F(s_n) = R(x).

    Memory is O(B·T²) (every pair i < j at once)."""
    _check(log_pf, log_pb, lengths)
    if not lamda > 0:
        raise ValueError(f"lamda must be positive; got {lamda}")
    steps = log_pf.shape[1]
    flows = _flows_with_reward(log_flows, lengths, log_reward)
    step_terms = (log_pf - log_pb) * _valid(lengths, steps)
    cumulative = torch.cat([torch.zeros_like(step_terms[:, :1]), step_terms.cumsum(1)], dim=1)  # [B, T+1]
    # δ[b, i, j] = F_i + C_j − C_i − F_j
    delta = (flows - cumulative)[:, :, None] + (cumulative - flows)[:, None, :]
    index = torch.arange(steps + 1, device=log_pf.device)
    span = (index[None, :] - index[:, None]).to(log_pf.dtype)  # j − i
    pairs = (span > 0)[None] & (index[None, None, :] <= lengths[:, None, None])  # i < j ≤ n_b
    weights = torch.where(pairs, torch.as_tensor(lamda, dtype=log_pf.dtype, device=log_pf.device) ** span, 0.0)
    per_trajectory = (weights * delta.pow(2)).sum((1, 2)) / weights.sum((1, 2))
    return per_trajectory.mean()


def pareto_order_loss(log_r_hat: Tensor, objectives: Tensor) -> Tensor:
    """OP-GFN's multi-objective loss (Chen & Mauch, 2023): cross-entropy between the uniform distribution over the
    batch's non-dominated set and softmax over the batch of the implied log-rewards. log_r_hat [B], objectives
    [B, K] (maximised) → scalar."""
    if log_r_hat.ndim != 1 or objectives.shape[:1] != log_r_hat.shape:
        raise ValueError(f"log_r_hat must be [B] and objectives [B, K]; got {tuple(log_r_hat.shape)} and "
                         f"{tuple(objectives.shape)}")
    front = non_dominated_mask(objectives).to(log_r_hat.dtype)
    target = front / front.sum()
    return -(target * torch.log_softmax(log_r_hat, dim=0)).sum()


def pairwise_order_loss(log_r_hat: Tensor, reward: Tensor) -> Tensor:
    """OP-GFN's single-objective loss: over every pair i < j of the batch, the cross-entropy between the target
    (1, 0), (0, 1) or (½, ½) for a tie, and softmax(log r̂_i, log r̂_j); the mean over pairs. [B], [B] → scalar."""
    if log_r_hat.ndim != 1 or reward.shape != log_r_hat.shape:
        raise ValueError(f"log_r_hat and reward must both be [B]; got {tuple(log_r_hat.shape)}, {tuple(reward.shape)}")
    i, j = torch.triu_indices(len(reward), len(reward), offset=1, device=reward.device)
    target_i = (reward[i] > reward[j]).to(log_r_hat.dtype) + 0.5 * (reward[i] == reward[j]).to(log_r_hat.dtype)
    log_p_i = torch.nn.functional.logsigmoid(log_r_hat[i] - log_r_hat[j])
    log_p_j = torch.nn.functional.logsigmoid(log_r_hat[j] - log_r_hat[i])
    return -(target_i * log_p_i + (1 - target_i) * log_p_j).mean()


def relative_trajectory_balance_residuals(log_z: Tensor, log_p_posterior: Tensor, log_p_prior: Tensor,
                                          log_reward: Tensor, beta: float = 1.0) -> Tensor:
    """RTB (Venkatraman et al., 2024): δ = log Z_φ + log p_φ(τ) − log p_pre(τ) − β·log r(x), [B], for trajectory
    log-likelihoods [B] under the fine-tuned and the pretrained sampler."""
    return log_z + log_p_posterior - log_p_prior - beta * log_reward


def relative_trajectory_balance(log_z: Tensor, log_p_posterior: Tensor, log_p_prior: Tensor, log_reward: Tensor,
                                beta: float = 1.0) -> Tensor:
    """The mean over trajectories of the squared RTB residual."""
    return relative_trajectory_balance_residuals(log_z, log_p_posterior, log_p_prior, log_reward, beta).pow(2).mean()
