"""GFlowNet trajectory balance on HyperGrid against a plain loop: a run of 50 updates, each rolling out 16 fresh
trajectories (ε-uniform exploration), scoring them and minimising (log Z + Σ log P_F − log R − Σ log P_B)²."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.pipelines.harness import Case, Outcome, Stopwatch
from benchmarks.pipelines.plain_training import adamw, optimizer_step


def load_task(config):
    """The task (the environment: states, actions, masks and the reward), the only "model" a GFlowNet starts from."""
    from pipelines.gfn.environments import build_task

    return build_task(config.task.name, config.task.kwargs)


def uniforms(config, env, epoch: int, index: int) -> torch.Tensor:
    """Trajectory `index`'s uniforms of update `epoch` (one per step), from its own seeded stream (the pipeline's
    seeding scheme, so that both sides roll out the same trajectories)."""
    from pipelines.gflownet import _stream_seed

    generator = torch.Generator().manual_seed(_stream_seed(config.trainer.seed, epoch, "fresh", index))
    return torch.rand(env.max_steps, generator=generator, dtype=torch.float64)


def reference(config, env) -> Outcome:
    """Each update as a plain loop: every trajectory rolled out step by step with one MLP call per state, scored on
    its own, then its log P_F and log P_B recomputed with gradients transition by transition (two MLP calls each)."""
    from pipelines.gfn.policies import GridPolicy, LogPartition

    torch.manual_seed(config.trainer.seed)  # the pipeline builds its policy from the run's seed
    net = GridPolicy(env, 0, config.policy.hidden, config.policy.layers).net
    log_z = LogPartition(0, config.policy.hidden).value
    optimizer = adamw(config.trainer, list(net.parameters()),
                      [{"params": [log_z], "lr": config.log_z_learning_rate, "weight_decay": 0.0}])
    actions = env.num_actions

    def heads(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked forward and backward log-probabilities of one state [1, D]."""
        out = net(F.one_hot(state, env.height).flatten(1).float())
        forward = torch.log_softmax(out[:, :actions].masked_fill(~env.forward_mask(state), float("-inf")), dim=-1)
        backward = torch.log_softmax(out[:, actions:-1].masked_fill(~env.backward_mask(state), float("-inf")), dim=-1)
        return forward, backward

    values: dict[str, float] = {}
    with Stopwatch() as clock:
        for epoch in range(config.epochs):
            loss_sum = 0.0
            for index in range(config.batch_size):
                u = uniforms(config, env, epoch, index)
                states, taken = [env.initial_states(1)], []
                for t in range(env.max_steps):
                    mask = env.forward_mask(states[-1])
                    with torch.no_grad():
                        logits = net(F.one_hot(states[-1], env.height).flatten(1).float())[:, :actions]
                    probs = torch.softmax((logits.double() / config.temperature).masked_fill(~mask, float("-inf")), -1)
                    probs = (1 - config.epsilon) * probs + config.epsilon * mask.double() / mask.sum()
                    cdf = probs.cumsum(1)
                    action = torch.searchsorted(cdf, u[t] * cdf[:, -1:], right=True).clamp(max=actions - 1)[:, 0]
                    taken.append(action)
                    if bool(env.is_stop(action)):
                        break
                    states.append(env.step(states[-1], action))
                log_r = config.beta * torch.log(env.objectives(states[-1])[0, 0]).float()
                log_pf = log_pb = torch.zeros(())
                for t, action in enumerate(taken):
                    log_pf = log_pf + heads(states[t])[0][0, action[0]]
                    if not bool(env.is_stop(action)):
                        log_pb = log_pb + heads(states[t + 1])[1][0, env.backward_action(action)[0]]
                loss = (log_z + log_pf - log_r - log_pb).pow(2) / config.batch_size
                loss.backward()
                loss_sum += float(loss.detach())
            values[f"loss_{epoch}"] = loss_sum
            values[f"grad_norm_{epoch}"] = optimizer_step(optimizer, config.trainer.max_grad_norm)
    last = config.epochs - 1
    return Outcome(clock.seconds, {key: values[key] for key in ("loss_0", "grad_norm_0", f"loss_{last}",
                                                                 f"grad_norm_{last}")})


def engine_values(records: list[dict]) -> dict[str, float]:
    last = len(records) - 1
    return {"loss_0": records[0]["loss"], "grad_norm_0": records[0]["grad_norm"], f"loss_{last}": records[last]["loss"],
            f"grad_norm_{last}": records[last]["grad_norm"]}


CASE = Case(
    name="gflownet",
    title="GFlowNet TB, HyperGrid 8×8 (corners), 50 updates of 16 trajectories, ε = 0.05",
    config="gflownet_hypergrid.yaml",
    overrides=["epochs=50"],
    test_overrides=["epochs=3", "batch_size=4"],
    samples=lambda c: c.batch_size,
    updates=lambda c: 1,
    load_models=load_task,
    reference=reference,
    engine_values=engine_values,
    leaves_out="one trajectory at a time: one MLP call per state while rolling out (the engine steps all 16 together), "
               "one reward call per trajectory, log P_F and log P_B recomputed transition by transition with "
               "gradients (the engine evaluates every state of the batch in one call)",
)
