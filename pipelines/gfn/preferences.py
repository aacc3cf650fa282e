"""Preference conditioning for multi-objective GFlowNets (MOGFN-PC, Jain et al., 2023): Dirichlet preference
draws, the thermometer encoding the policy and log Z(ω) read, the simplex grid used for evaluation, and the
scalarised log-reward log R(x|ω)^β."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

from rewards.pareto import log_convex, tchebycheff, weighted_sum

SCALARISATIONS = ("weighted_sum", "tchebycheff", "log_convex")


def dirichlet(count: int, objectives: int, alpha: float, generator: torch.Generator) -> Tensor:
    """[count, K] float64 preference vectors ω ~ Dirichlet(α·1), drawn from `generator` alone (never the global
    RNG): numpy's Dirichlet sampler seeded by one draw of it."""
    seed = int(torch.randint(2**62, (), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).dirichlet([float(alpha)] * objectives, size=count))


def thermometer(values: Tensor, bins: int, low: float = 0.0, high: float = 1.0) -> Tensor:
    """[B, K] values in [low, high] → [B, K·bins] float32: bin j of value v is clamp((v − edge_j)·bins/(high−low),
    0, 1) for edges evenly spaced from low, a "thermometer" that fills as v grows (MOGFN's conditioning input)."""
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64, device=values.device)[:-1]
    scaled = (values.to(torch.float64)[..., None] - edges) * bins / (high - low)
    return scaled.clamp(0, 1).flatten(1).float()


def simplex_grid(objectives: int, divisions: int) -> Tensor:
    """Every preference with coordinates in {0, 1/n, …, 1} summing to 1: [M, K] float64 (n = `divisions`)."""
    points = [p for p in itertools.product(range(divisions + 1), repeat=objectives) if sum(p) == divisions]
    return torch.tensor(points, dtype=torch.float64) / divisions


def interior(preferences: Tensor, margin: float = 0.01) -> Tensor:
    """Preferences moved towards the centre so that none is zero: (1 − K·m)·ω + m. Tchebycheff's min_k ω_k R_k is
    0 for a zero weight whatever x is, so evaluation grids use this."""
    k = preferences.shape[1]
    return (1 - k * margin) * preferences + margin


def scalarised_log_reward(objectives: Tensor, preferences: Tensor, scalarisation: str, beta: Tensor | float) -> Tensor:
    """β·log R(x|ω): [B, K] positive objectives, [B, K] preferences, β scalar or [B] → [B] float64.

    weighted sum: β·log Σ ω_k R_k; Tchebycheff: β·log min_k ω_k R_k; log-convex: β·Σ ω_k log R_k. Non-positive
    objectives raise ValueError (log R would be undefined): the task must make them positive."""
    if bool((objectives <= 0).any()):
        raise ValueError(f"GFlowNet objectives must be positive to take log R; got min {float(objectives.min())}. "
                         "Give the task a positive transform of its scores (see pipelines/gfn/environments.py)")
    if scalarisation == "weighted_sum":
        log_r = torch.log(weighted_sum(objectives, preferences).to(torch.float64))
    elif scalarisation == "tchebycheff":
        log_r = torch.log(tchebycheff(objectives, preferences).to(torch.float64))
    elif scalarisation == "log_convex":
        log_r = log_convex(objectives, preferences, eps=0.0).to(torch.float64)
    else:
        raise ValueError(f"unknown scalarisation '{scalarisation}'; choose one of {', '.join(SCALARISATIONS)}")
    return beta * log_r
