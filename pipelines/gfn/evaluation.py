"""Held-out evaluation of a GFlowNet policy (MOGFN's protocol) and its gallery.

At every preference ω of an interior simplex grid (one "preference" for a single objective) the policy draws
`samples_per_preference` samples on-policy with fixed seeds, at β = `beta` (the top of `beta_range` when β is
drawn). Reported:

* hypervolume of all samples (reference point 0: every task's objectives lie in (0, 1]) and R2 over the grid
  (ideal point 1; lower is better);
* per preference, the top-10 mean scalarised reward R(x|ω) and the top-10 mean pairwise distance (diversity),
  averaged over preferences;
* modes: distinct Pareto-optimal samples among all of them (K > 1), or distinct samples with at least 90% of the
  best sampled reward (K = 1);
* on enumerable tasks, IGD to the true Pareto front (K > 1) and the mean total-variation distance between the
  policy's exact terminal distribution and R(x|ω)^β / Z (GFlowNet objectives, not OP-GFN).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipelines.gfn.exact import terminal_distribution
from pipelines.gfn.policies import sample_trajectories
from pipelines.gfn.preferences import interior, scalarised_log_reward, simplex_grid
from rewards.pareto import hypervolume, igd, non_dominated_mask, r2_indicator


@dataclass
class Evaluation:
    """preferences [M, K]; terminals [M, n, D]; objectives [M, n, K] float64; metrics by name."""

    preferences: Tensor
    terminals: Tensor
    objectives: Tensor
    metrics: dict[str, float]


def evaluation_preferences(num_objectives: int, divisions: int) -> Tensor:
    """[M, K] the preference grid (interior, so Tchebycheff never sees a zero weight); [[1]] for one objective."""
    if num_objectives == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    return interior(simplex_grid(num_objectives, divisions))


def scalarised_reward(objectives: Tensor, preferences: Tensor, scalarisation: str) -> Tensor:
    """R(x|ω) [N] for objectives [N, K] and preferences [N, K] (β = 1)."""
    if objectives.shape[1] == 1:
        return objectives[:, 0]
    return scalarised_log_reward(objectives, preferences, scalarisation, 1.0).exp()


def _mean_pairwise_distance(env, terminals: Tensor) -> float:
    i, j = torch.triu_indices(len(terminals), len(terminals), offset=1)
    return float(env.distance(terminals[i], terminals[j]).mean()) if len(i) else 0.0


@torch.no_grad()
def evaluate_policy(pipeline, config) -> Evaluation:
    """Sample at every evaluation preference and compute the metrics above (`pipeline`: a GFlowNetPipeline)."""
    c = pipeline.config
    env = pipeline.env
    device = next(pipeline.policy.parameters()).device
    preferences = evaluation_preferences(pipeline.num_objectives, config.preference_divisions)
    beta = c.beta_range[1] if c.beta_range else c.beta
    n = config.samples_per_preference
    generator = torch.Generator().manual_seed(config.seed)
    terminals, objectives, tvs = [], [], []
    exact = env.enumerate_terminals() is not None and c.objective != "op"
    for preference in preferences:
        rows = preference[None].expand(n, -1)
        betas = torch.full((n,), float(beta), dtype=torch.float64)
        condition = pipeline.condition(rows, betas)
        condition = None if condition is None else condition.to(device)
        uniforms = torch.rand(n, env.max_steps, generator=generator, dtype=torch.float64).to(device)
        x = sample_trajectories(env, pipeline.policy, uniforms, condition).terminals
        terminals.append(x.cpu())
        objectives.append(env.objectives(x).cpu())
        if exact:
            tvs.append(_total_variation(pipeline, preference, beta, None if condition is None else condition[0]))
    evaluation = sample_set_metrics(env, preferences, torch.stack(terminals), torch.stack(objectives),
                                    c.scalarisation)
    if tvs:
        evaluation.metrics["eval_tv"] = float(np.mean(tvs))
    return evaluation


def sample_set_metrics(env, preferences: Tensor, terminals: Tensor, objectives: Tensor,
                       scalarisation: str) -> Evaluation:
    """The metrics above but the TV (which needs a policy) of any sampler's sets: preferences [M, K], terminals
    [M, n, D] and their objectives [M, n, K], set i drawn for preference i (so baselines such as best-of-N are
    scored exactly as the policy is)."""
    top_rewards, diversities = [], []
    for preference, x, values in zip(preferences, terminals, objectives):
        reward = scalarised_reward(values, preference[None].expand(len(values), -1), scalarisation)
        top = torch.topk(reward, min(10, len(reward))).indices
        top_rewards.append(float(reward[top].mean()))
        diversities.append(_mean_pairwise_distance(env, x[top]))
    all_objectives = objectives.reshape(-1, objectives.shape[-1])
    all_terminals = terminals.reshape(-1, terminals.shape[-1])
    metrics = {"eval_top10_reward": float(np.mean(top_rewards)), "eval_top10_diversity": float(np.mean(diversities))}
    for k, name in enumerate(env.objective_names):
        metrics[f"eval_{name}"] = float(all_objectives[:, k].mean())
    k = all_objectives.shape[1]
    if k > 1:
        metrics["eval_hypervolume"] = hypervolume(all_objectives, torch.zeros(k, dtype=torch.float64))
        ideal = torch.full((k,), max(1.0, float(all_objectives.max())), dtype=torch.float64)
        metrics["eval_r2"] = r2_indicator(all_objectives, preferences, ideal)
        front = non_dominated_mask(all_objectives)
        metrics["eval_modes"] = float(len(torch.unique(all_terminals[front], dim=0)))
        enumerated = env.enumerate_terminals()
        if enumerated is not None:
            everything = env.objectives(enumerated).cpu()
            metrics["eval_igd"] = igd(all_objectives, everything[non_dominated_mask(everything)])
    else:
        reward = all_objectives[:, 0]
        metrics["eval_modes"] = float(len(torch.unique(all_terminals[reward >= 0.9 * reward.max()], dim=0)))
    return Evaluation(preferences, terminals, objectives, metrics)


def _total_variation(pipeline, preference: Tensor, beta: float, condition: Tensor | None) -> float:
    """½ Σ_x |P_T(x|ω) − R(x|ω)^β / Z(ω)| over every terminal state."""
    terminals, p_policy = terminal_distribution(pipeline.env, pipeline.policy, condition)
    values = pipeline.env.objectives(terminals)
    rows = preference[None].expand(len(terminals), -1).to(values.device)
    log_r = pipeline.log_reward(values, rows, torch.full((len(terminals),), float(beta), dtype=torch.float64,
                                                          device=values.device))
    target = torch.softmax(log_r, dim=0)
    return float(0.5 * (p_policy.to(target.device) - target).abs().sum())


def write_gallery(evaluation: Evaluation, env, folder: str | Path, title: str = "GFlowNet samples",
                  scalarisation: str = "tchebycheff", per_preference: int = 8) -> Path:
    """`folder`/pareto_front.png (every sample's objectives coloured by its preference, the non-dominated ones
    ringed, the true front as a line where the task is enumerable) and `folder`/index.html (the metrics, and per
    preference the best samples by R(x|ω) with their objectives). Returns the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = env.objective_names
    m, n, k = evaluation.objectives.shape
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)] or [(0, 0)]
    figure, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4), squeeze=False)
    flat = evaluation.objectives.reshape(m * n, k)
    front = non_dominated_mask(flat) if k > 1 else torch.zeros(m * n, dtype=torch.bool)
    colours = plt.cm.viridis(np.linspace(0, 1, m))
    enumerated = env.enumerate_terminals()
    true_front = None
    if enumerated is not None and k > 1:
        everything = env.objectives(enumerated)
        true_front = everything[non_dominated_mask(everything)]
    for axis, (a, b) in zip(axes[0], pairs):
        if k == 1:
            axis.hist(flat[:, 0].numpy(), bins=30)
            axis.set_xlabel(names[0])
            continue
        for i in range(m):
            block = evaluation.objectives[i]
            label = "ω=(" + ", ".join(f"{w:.2f}" for w in evaluation.preferences[i].tolist()) + ")"
            axis.scatter(block[:, a], block[:, b], s=8, color=colours[i], alpha=0.6, label=label)
        axis.scatter(flat[front, a], flat[front, b], s=40, facecolors="none", edgecolors="red", label="non-dominated")
        if true_front is not None:
            order = torch.argsort(true_front[:, a])
            axis.plot(true_front[order, a], true_front[order, b], "k--", lw=1, label="true front")
        axis.set_xlabel(names[a])
        axis.set_ylabel(names[b])
    if k > 1:
        axes[0][0].legend(fontsize=6, loc="lower left")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(folder / "pareto_front.png", dpi=120)
    plt.close(figure)
    rows = []
    for i in range(m):
        preference = evaluation.preferences[i]
        values = evaluation.objectives[i]
        reward = scalarised_reward(values, preference[None].expand(n, -1), scalarisation)
        best = torch.argsort(reward, descending=True)[:per_preference]
        texts = env.describe(evaluation.terminals[i][best])
        cells = "".join(
            f"<tr><td><code>{html.escape(t)}</code></td><td>{float(reward[j]):.4f}</td>"
            + "".join(f"<td>{float(values[j, q]):.4f}</td>" for q in range(k)) + "</tr>"
            for t, j in zip(texts, best.tolist()))
        header = "".join(f"<th>{html.escape(name)}</th>" for name in names)
        weights = ", ".join(f"{w:.2f}" for w in preference.tolist())
        rows.append(f"<h3>ω = ({weights})</h3><table><tr><th>sample</th><th>R(x|ω)</th>{header}</tr>{cells}</table>")
    metrics = "".join(f"<tr><td>{html.escape(key)}</td><td>{value:.4f}</td></tr>"
                      for key, value in evaluation.metrics.items())
    page = (f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h1>{html.escape(title)}</h1><img src='pareto_front.png'><h2>Metrics</h2><table>{metrics}</table>"
            f"<h2>Best samples per preference</h2>{''.join(rows)}</body></html>")
    path = folder / "index.html"
    path.write_text(page)
    return path
