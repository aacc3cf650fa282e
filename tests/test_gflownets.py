"""GFlowNets: every loss against a hand computation on small padded trajectories; TB and SubTB reaching R/Z on an
enumerable HyperGrid; the exact terminal distribution against Monte Carlo; the sampler's sharding invariance;
preference conditioning; resume with a replay buffer; environment facts; bad input."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from genalign.config import ConfigError, build_config
from pipelines import get_pipeline
from pipelines.gfn import losses
from pipelines.gfn.environments import HyperGrid, build_task, ngrams_task
from pipelines.gfn.exact import terminal_distribution
from pipelines.gfn.policies import GridPolicy, SequencePolicy, sample_trajectories
from pipelines.gfn.preferences import scalarised_log_reward
from pipelines.gfn.replay import ReplayBuffer, replay_actions
from pipelines.gflownet import GFlowNetConfig, GFlowNetPipeline
from tests.helpers.interrupt import interrupt_on_call


pytestmark = pytest.mark.usefixtures("one_thread")


def grid_config(out_dir: Path, **overrides) -> GFlowNetConfig:
    data = {
        "pipeline": "gflownet",
        "task": {"name": "hypergrid", "kwargs": {"ndim": 2, "height": 4, "reward": "corners"}},
        "policy": {"hidden": 32, "layers": 2},
        "trainer": {"output_dir": str(out_dir), "learning_rate": 3e-3, "progress": False, "checkpoint_every": 100_000},
        "eval": {"every": 100_000, "samples_per_preference": 16},
        "epochs": 2, "batch_size": 16, "epsilon": 0.05, "log_z_learning_rate": 0.1,
    }
    return build_config(GFlowNetConfig, data, [f"{k}={v}" for k, v in overrides.items()])


# ------------------------------------------------------------------------------------------ losses by hand
# Two trajectories padded to T = 3: the first has 3 transitions, the second 2. Padding entries hold junk that every
# loss must ignore.
LOG_PF = [[-0.5, -1.2, -0.3], [-0.7, -0.1, 9.0]]
LOG_PB = [[0.0, -0.69, 0.0], [-0.2, 0.0, 7.0]]
LENGTHS = [3, 2]
LOG_FLOWS = [[1.5, 0.9, 0.4, 5.0], [1.1, 0.2, 3.0, -4.0]]  # entry n is replaced by log R
LOG_R = [-0.25, 0.6]


def tensors():
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return t(LOG_PF), t(LOG_PB), torch.tensor(LENGTHS), t(LOG_FLOWS), t(LOG_R)


def flows_with_reward(b: int) -> list[float]:
    n = LENGTHS[b]
    return LOG_FLOWS[b][:n] + [LOG_R[b]]


def test_trajectory_balance_equals_a_hand_computation():
    """Catches padding counted into the sums, P_B added instead of subtracted, or a per-sample log Z misread."""
    log_pf, log_pb, lengths, _, log_r = tensors()
    log_z = torch.tensor([0.3, -0.4], dtype=torch.float64)
    expected = []
    for b in range(2):
        ratio = sum(LOG_PF[b][t] - LOG_PB[b][t] for t in range(LENGTHS[b]))
        expected.append((float(log_z[b]) + ratio - LOG_R[b]) ** 2)
    assert float(losses.trajectory_balance(log_pf, log_pb, lengths, log_r, log_z)) == pytest.approx(np.mean(expected))
    scalar = losses.trajectory_balance(log_pf, log_pb, lengths, log_r, torch.tensor(0.3, dtype=torch.float64))
    ratio0 = sum(LOG_PF[0][t] - LOG_PB[0][t] for t in range(3))
    ratio1 = sum(LOG_PF[1][t] - LOG_PB[1][t] for t in range(2))
    assert float(scalar) == pytest.approx(((0.3 + ratio0 - LOG_R[0]) ** 2 + (0.3 + ratio1 - LOG_R[1]) ** 2) / 2)


def test_detailed_balance_equals_a_hand_computation():
    """Catches the terminal flow not replaced by R, padding transitions counted, or a mean over B·T instead of the
    real transitions."""
    log_pf, log_pb, lengths, log_flows, log_r = tensors()
    squares = []
    for b in range(2):
        f = flows_with_reward(b)
        for t in range(LENGTHS[b]):
            squares.append((f[t] + LOG_PF[b][t] - f[t + 1] - LOG_PB[b][t]) ** 2)
    assert len(squares) == 5
    got = losses.detailed_balance(log_pf, log_pb, log_flows, lengths, log_r)
    assert float(got) == pytest.approx(sum(squares) / 5)


@pytest.mark.parametrize("lamda", [0.9, 1.0])
def test_subtrajectory_balance_equals_a_hand_computation(lamda):
    """Catches a wrong weight λ^{j−i}, a missing pair, pairs past a trajectory's end, or a normalisation over the
    whole batch instead of per trajectory."""
    log_pf, log_pb, lengths, log_flows, log_r = tensors()
    per_trajectory = []
    for b in range(2):
        f, n = flows_with_reward(b), LENGTHS[b]
        numerator = denominator = 0.0
        for i in range(n):
            for j in range(i + 1, n + 1):
                delta = f[i] + sum(LOG_PF[b][k] - LOG_PB[b][k] for k in range(i, j)) - f[j]
                numerator += lamda ** (j - i) * delta**2
                denominator += lamda ** (j - i)
        per_trajectory.append(numerator / denominator)
    got = losses.subtrajectory_balance(log_pf, log_pb, log_flows, lengths, log_r, lamda)
    assert float(got) == pytest.approx(np.mean(per_trajectory))


def test_subtrajectory_balance_of_one_step_trajectories_is_detailed_balance():
    """With every trajectory one transition long the only pair is (0, 1): SubTB must equal DB and TB (log F(s_0) =
    log Z). Catches an off-by-one in the pair mask."""
    log_pf = torch.tensor([[-0.4], [-1.3]], dtype=torch.float64)
    log_pb = torch.zeros_like(log_pf)
    lengths = torch.tensor([1, 1])
    log_flows = torch.tensor([[0.7, 0.0], [0.7, 0.0]], dtype=torch.float64)
    log_r = torch.tensor([0.1, -0.9], dtype=torch.float64)
    sub = losses.subtrajectory_balance(log_pf, log_pb, log_flows, lengths, log_r, 0.5)
    db = losses.detailed_balance(log_pf, log_pb, log_flows, lengths, log_r)
    tb = losses.trajectory_balance(log_pf, log_pb, lengths, log_r, torch.tensor(0.7, dtype=torch.float64))
    assert float(sub) == pytest.approx(float(db)) and float(db) == pytest.approx(float(tb))


def test_pareto_order_loss_is_the_cross_entropy_to_the_uniform_front():
    """Objectives: rows 0 and 2 are non-dominated, row 1 is dominated by row 0, row 3 by both. Catches a front
    that includes dominated rows, a target that is not uniform on it, or a softmax over the wrong axis."""
    log_r_hat = torch.tensor([0.2, 1.5, -0.3, 0.0], dtype=torch.float64)
    objectives = torch.tensor([[3.0, 2.0], [2.0, 1.0], [1.0, 4.0], [0.5, 0.5]], dtype=torch.float64)
    log_softmax = [v - math.log(sum(math.exp(u) for u in log_r_hat.tolist())) for v in log_r_hat.tolist()]
    expected = -(0.5 * log_softmax[0] + 0.5 * log_softmax[2])
    assert float(losses.pareto_order_loss(log_r_hat, objectives)) == pytest.approx(expected)


def test_pairwise_order_loss_with_a_tie():
    """Rewards (2, 1, 2): pairs (0,1) → target (1, 0), (0,2) a tie → (½, ½), (1,2) → (0, 1). Catches a tie
    scored as a win, or a reversed pair."""
    a, b, c = 0.4, -0.3, 1.1
    log_r_hat = torch.tensor([a, b, c], dtype=torch.float64)
    reward = torch.tensor([2.0, 1.0, 2.0], dtype=torch.float64)

    def log_p_first(x, y):
        return x - math.log(math.exp(x) + math.exp(y))

    expected = -(log_p_first(a, b) + 0.5 * log_p_first(a, c) + 0.5 * log_p_first(c, a) + log_p_first(c, b)) / 3
    assert float(losses.pairwise_order_loss(log_r_hat, reward)) == pytest.approx(expected)


def test_relative_trajectory_balance_equals_a_hand_computation():
    """Catches β applied to the wrong term or the prior's log-likelihood added instead of subtracted."""
    log_p_post = torch.tensor([-3.0, -1.5], dtype=torch.float64)
    log_p_prior = torch.tensor([-2.0, -2.5], dtype=torch.float64)
    log_r = torch.tensor([0.5, -1.0], dtype=torch.float64)
    log_z = torch.tensor(0.25, dtype=torch.float64)
    expected = np.mean([(0.25 - 3.0 + 2.0 - 2 * 0.5) ** 2, (0.25 - 1.5 + 2.5 + 2 * 1.0) ** 2])
    got = losses.relative_trajectory_balance(log_z, log_p_post, log_p_prior, log_r, beta=2.0)
    assert float(got) == pytest.approx(expected)


def test_losses_reject_inconsistent_shapes():
    log_pf, log_pb, lengths, log_flows, log_r = tensors()
    with pytest.raises(ValueError, match="lengths must be"):
        losses.trajectory_balance(log_pf, log_pb, lengths[:1], log_r, log_r)
    with pytest.raises(ValueError, match="every length"):
        losses.trajectory_balance(log_pf, log_pb, torch.tensor([4, 1]), log_r, log_r)
    with pytest.raises(ValueError, match=r"log_flows must be \[B, T\+1\]"):
        losses.detailed_balance(log_pf, log_pb, log_flows[:, :3], lengths, log_r)


# ------------------------------------------------------------------------------------------ environments
def test_hypergrid_facts():
    """The corner landscape of side 8 has 4 top modes (one ring cell per corner) and 64 terminals; the two-objective form
    spans [floor, 1] per objective and has a front of several points. Catches a wrong reward region, a wrong
    horizon or a normalisation that leaves zeros (log R = −inf)."""
    grid = HyperGrid(ndim=2, height=8)
    terminals = grid.enumerate_terminals()
    reward = grid.objectives(terminals)[:, 0]
    assert grid.max_steps == 15 and len(terminals) == 64
    assert int((reward == reward.max()).sum()) == 4  # one ring cell per corner: x_d ∈ {1, 6}
    assert int((reward > 0.5).sum()) == 16  # the outer region: x_d ∈ {0, 1, 6, 7}
    assert float(reward.min()) == pytest.approx(1e-3)
    mo = HyperGrid(ndim=2, height=8, reward="branin_currin", floor=0.01)
    values = mo.objectives(mo.enumerate_terminals())
    assert torch.allclose(values.amin(0), torch.full((2,), 0.01, dtype=torch.float64))
    assert torch.allclose(values.amax(0), torch.ones(2, dtype=torch.float64))
    from rewards.pareto import non_dominated_mask
    assert 2 <= int(non_dominated_mask(values).sum()) < 64
    state = torch.tensor([[3, 7]])
    assert grid.forward_mask(state).tolist() == [[True, False, True]]
    assert grid.backward_mask(state).tolist() == [[True, True]]
    assert grid.step(state, torch.tensor([0])).tolist() == [[4, 7]]
    assert grid.step(state, torch.tensor([2])).tolist() == [[3, 7]]  # stop leaves the object as it is


def test_ngrams_facts():
    """Catches overlapping bigrams miscounted, the +1 shift lost, or stop allowed before min_length."""
    task = ngrams_task(alphabet="ABCD", bigrams=("AB", "BC", "CA"), max_length=8, min_length=2)
    x = task.encode(["ABCABC", "DD"])
    assert task.objectives(x).tolist() == [[3 / 5, 3 / 5, 2 / 5], [1 / 5, 1 / 5, 1 / 5]]
    assert task.describe(x) == ["ABCABC", "DD"]
    one_letter = task.encode(["A"])
    assert task.forward_mask(one_letter).tolist() == [[True, True, True, True, False]]
    assert task.forward_mask(x[1:]).tolist() == [[True, True, True, True, True]]
    assert task.distance(task.encode(["ABC"]), task.encode(["AC"])).tolist() == [1.0]
    with pytest.raises(ValueError, match="'E' at position 1"):
        task.encode(["AE"])
    with pytest.raises(ConfigError, match="bigram 'AX'"):
        ngrams_task(bigrams=("AX",))


# ------------------------------------------------------------------------------------------ sampler and exact
def random_grid_policy(env: HyperGrid, seed: int = 0) -> GridPolicy:
    torch.manual_seed(seed)
    policy = GridPolicy(env, hidden=16)
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(3.0)  # a far-from-uniform policy, so a wrong propagation shows
    return policy


@pytest.mark.parametrize("kind", ["grid", "sequence"])
def test_exact_terminal_distribution_matches_monte_carlo(kind):
    """20,000 rollouts of a random policy against `terminal_distribution`: the empirical frequencies agree to
    within Monte Carlo noise (the expected TV of 20,000 draws over ≤ 16 outcomes is < 0.015), the exact one sums to
    1. Catches a sampler and an exact computation that disagree about the policy (a mask, the stop action, the
    transition order)."""
    torch.manual_seed(1)
    if kind == "grid":
        env = HyperGrid(ndim=2, height=4)
        policy = random_grid_policy(env)
    else:
        env = ngrams_task(alphabet="AB", bigrams=("AB",), max_length=3, min_length=1)
        policy = SequencePolicy(env, hidden=16, layers=1, heads=2)
    terminals, exact = terminal_distribution(env, policy)
    assert float(exact.sum()) == pytest.approx(1.0, abs=1e-6)  # float32 log-probs
    assert float(exact.max()) > 2 / len(exact)  # not close to uniform: the comparison means something
    draws = 20_000
    uniforms = torch.rand(draws, env.max_steps, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sampled = sample_trajectories(env, policy, uniforms).terminals
    index = {tuple(row.tolist()): i for i, row in enumerate(terminals)}
    counts = torch.bincount(torch.tensor([index[tuple(row.tolist())] for row in sampled]), minlength=len(terminals))
    tv = 0.5 * float((counts.double() / draws - exact).abs().sum())
    assert tv < 0.015, tv


def test_sampling_is_the_same_however_rows_are_sharded():
    """A row's trajectory depends on its uniforms alone; the pipeline's per-trajectory draws do not depend on
    which other rows a process draws. Catches a shared RNG or batch-dependent sampling (two processes would then
    differ from one)."""
    env = HyperGrid(ndim=2, height=5)
    policy = random_grid_policy(env)
    uniforms = torch.rand(8, env.max_steps, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    whole = sample_trajectories(env, policy, uniforms, epsilon=0.1)
    halves = [sample_trajectories(env, policy, uniforms[rows], epsilon=0.1) for rows in (slice(0, 8, 2), slice(1, 8, 2))]
    assert torch.equal(whole.actions[0::2], halves[0].actions) and torch.equal(whole.actions[1::2], halves[1].actions)
    assert torch.equal(whole.lengths[1::2], halves[1].lengths)

    pipeline = GFlowNetPipeline(grid_config(Path("unused"), **{"task.kwargs.reward": "branin_currin"}))
    every = pipeline.draws(7, 3, np.arange(6))
    shards = [pipeline.draws(7, 3, np.arange(r, 6, 2)) for r in (0, 1)]
    for whole_part, even, odd in zip(every, *shards):
        assert torch.equal(whole_part[0::2], even) and torch.equal(whole_part[1::2], odd)
    assert not torch.equal(every[1], pipeline.draws(7, 4, np.arange(6))[1])  # a new epoch, new preferences


def test_replay_rebuilds_the_sampled_states_and_the_buffer_round_trips():
    """Catches replayed trajectories whose states differ from the sampled ones (the policy would then be trained
    on transitions it never took), padding steps applied, or a buffer that loses entries in its state dict."""
    env = ngrams_task(alphabet="ABCD", max_length=6, min_length=2)
    torch.manual_seed(0)
    policy = SequencePolicy(env, hidden=16, layers=1, heads=2)
    uniforms = torch.rand(12, env.max_steps, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sampled = sample_trajectories(env, policy, uniforms)
    assert len(set(sampled.lengths.tolist())) > 1  # variable lengths: padding is exercised
    rebuilt = replay_actions(env, sampled.actions, sampled.lengths)
    assert torch.equal(rebuilt.states, sampled.states)

    buffer = ReplayBuffer(capacity=8, max_steps=env.max_steps, num_objectives=3)
    buffer.add(sampled.actions, sampled.lengths, env.objectives(sampled.terminals))
    assert len(buffer) == 8 and buffer.next == 4  # 12 into 8 slots: the 4 oldest overwritten
    assert torch.equal(buffer.actions[:4], sampled.actions[8:])
    copy = ReplayBuffer(capacity=8, max_steps=env.max_steps, num_objectives=3)
    copy.load_state_dict(buffer.state_dict())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(buffer.sample(5, g1), copy.sample(5, g2)))
    with pytest.raises(ValueError, match="same replay_capacity"):
        ReplayBuffer(capacity=4, max_steps=env.max_steps, num_objectives=3).load_state_dict(buffer.state_dict())


# ------------------------------------------------------------------------------------------ learning
def true_log_partition(env: HyperGrid) -> float:
    return float(torch.logsumexp(torch.log(env.objectives(env.enumerate_terminals())[:, 0]), 0))


@pytest.mark.parametrize("objective", ["tb", "subtb"])
def test_balance_objectives_reach_the_reward_distribution_on_an_enumerable_grid(tmp_path, objective):
    """HyperGrid 2×4 (16 terminals, corner reward): the untrained sampler is far from R/Z (TV > 0.4); after 400
    updates the exact TV is below 0.03 and, for TB, the learned log Z is within 0.05 of log Σ R. Catches any
    wrong sign, flow or mask in the objective or the policy's log-probs (each leaves a biased sampler)."""
    pipeline = GFlowNetPipeline(grid_config(tmp_path, objective=objective, epochs=400))
    before = pipeline.evaluate()["eval_tv"]
    metrics = pipeline.train()
    assert before > 0.4, before
    assert metrics["eval_tv"] < 0.03, metrics["eval_tv"]  # measured 0.005 (tb), 0.011 (subtb) from 0.65
    if objective == "tb":
        assert metrics["log_z"] == pytest.approx(true_log_partition(pipeline.env), abs=0.05)


def test_order_preserving_and_reinforce_raise_the_reward(tmp_path):
    """OP-GFN (pairwise order loss, one objective) and the REINFORCE baseline: 150 updates raise the mean
    held-out reward of the corner grid well above the untrained sampler's. Catches a sign error in either."""
    for objective in ("op", "reinforce"):
        pipeline = GFlowNetPipeline(grid_config(tmp_path / objective, objective=objective, epochs=150, **{
            "eval.samples_per_preference": 256, "epsilon": 0.05 if objective == "op" else 0.0}))
        before = pipeline.evaluate()["eval_reward"]
        after = pipeline.train()["eval_reward"]
        assert after > before + 0.2, (objective, before, after)  # measured 0.17 → 0.49 (op), 0.50 (reinforce)


def test_the_preference_moves_the_sampled_objectives(tmp_path):
    """MOGFN-PC on the two-objective grid: after training, the exact expected objectives under ω = (.9, .1)
    favour the first objective and under (.1, .9) the second. Catches a preference that is not fed to the policy,
    is fed in the wrong order, or is dropped from log R(x|ω)."""
    pipeline = GFlowNetPipeline(grid_config(tmp_path, epochs=300, **{
        "task.kwargs": {"ndim": 2, "height": 6, "reward": "branin_currin"}, "scalarisation": "weighted_sum",
        "beta": 8.0, "batch_size": 32}))
    pipeline.train()
    expected = {}
    for weight in (0.9, 0.1):
        preference = torch.tensor([[weight, 1 - weight]], dtype=torch.float64)
        condition = pipeline.condition(preference, torch.tensor([8.0], dtype=torch.float64))[0]
        terminals, p = terminal_distribution(pipeline.env, pipeline.policy, condition)
        expected[weight] = (p[:, None] * pipeline.env.objectives(terminals)).sum(0)
    # measured (0.96, 0.59) at ω = (.9, .1) and (0.86, 0.88) at (.1, .9)
    assert float(expected[0.9][0]) > float(expected[0.1][0]) + 0.05, expected
    assert float(expected[0.1][1]) > float(expected[0.9][1]) + 0.2, expected


def test_the_initial_policy_follows_the_run_seed(tmp_path):
    """Catches weights initialised from whatever the caller's global RNG holds (two runs of one config would
    then differ)."""
    torch.manual_seed(123)
    a = GFlowNetPipeline(grid_config(tmp_path))
    torch.manual_seed(456)
    b = GFlowNetPipeline(grid_config(tmp_path))
    c = GFlowNetPipeline(grid_config(tmp_path, **{"trainer.seed": 1}))
    pa, pb, pc = (torch.cat([p.flatten() for p in x.policy.parameters()]) for x in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_a_resumed_run_with_replay_equals_an_uninterrupted_one(tmp_path):
    """Stop in the third of four updates, resume from the latest checkpoint: the final weights, log Z and replay
    buffer equal those of a run that never stopped. Catches a buffer not checkpointed (or restored after it is
    used), a redrawn replay sample, or lost optimiser state."""
    overrides = {"epochs": 4, "trainer.checkpoint_every": 1, "trainer.keep_checkpoints": 0, "replay_capacity": 24,
                 "replay_batch": 8, "objective": "subtb"}
    GFlowNetPipeline(grid_config(tmp_path / "straight", **overrides)).train()
    stopped = GFlowNetPipeline(grid_config(tmp_path / "resumed", **overrides))
    interrupt_on_call(stopped, "loss", 3)  # the third update
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    resumed = GFlowNetPipeline(grid_config(tmp_path / "resumed", **overrides, **{"trainer.resume": "latest"}))
    resumed.train()
    folder = Path("checkpoints/step_000003")
    for name in ("trainable.safetensors", "pipeline_state.safetensors"):
        a = load_file(str(tmp_path / "straight" / folder / name))
        b = load_file(str(tmp_path / "resumed" / folder / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert any("log_z" in k for k in load_file(str(tmp_path / "straight" / folder / "trainable.safetensors")))
    assert resumed.reward_calls == 4 * 16 and len(resumed.replay) == 24


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_a_clear_error(tmp_path):
    """Each names the problem and the fix."""
    assert get_pipeline("gflownet") is GFlowNetPipeline
    with pytest.raises(ValueError, match="must be positive"):
        scalarised_log_reward(torch.tensor([[0.5, 0.0]]), torch.tensor([[0.5, 0.5]]), "tchebycheff", 1.0)
    with pytest.raises(ConfigError, match="unknown GFlowNet task 'hypergird'"):
        build_task("hypergird", {})
    with pytest.raises(ConfigError, match="task 'hypergrid'.*heigth"):
        build_task("hypergrid", {"heigth": 4})
    with pytest.raises(ConfigError, match="branin_currin HyperGrid is two-dimensional"):
        HyperGrid(ndim=3, reward="branin_currin")
    with pytest.raises(ConfigError, match="replay_batch and replay_capacity go together"):
        GFlowNetPipeline(grid_config(tmp_path, replay_batch=4))
    with pytest.raises(ConfigError, match="epsilon is a probability"):
        GFlowNetPipeline(grid_config(tmp_path, epsilon=1.5))
    with pytest.raises(ConfigError, match="reinforce is an on-policy baseline: set epsilon: 0"):
        GFlowNetPipeline(grid_config(tmp_path, objective="reinforce"))  # epsilon 0.05
    with pytest.raises(ConfigError, match="lora.enabled: false"):
        GFlowNetPipeline(grid_config(tmp_path, **{"trainer.lora.enabled": True}))
    with pytest.raises(ConfigError, match="beta_range"):
        GFlowNetPipeline(grid_config(tmp_path, beta_range=[2.0, 1.0]))
    with pytest.raises(ConfigError, match="subtb_lamda"):
        grid_config(tmp_path, subtb_lamda=0.5)


@pytest.mark.parametrize("objective", ["tb", "db", "reinforce"])
def test_the_pipeline_loss_wires_policy_log_z_and_reward_as_the_spec_says(tmp_path, objective):
    """The pipeline's loss on a sampled batch of the two-objective grid at β = 16, recomputed from the policy's
    outputs: TB with log Z(ω) and β·log R(x|ω); DB with log F(s_0) = log Z(ω); REINFORCE on R(x|ω) at β = 1 with
    Σ log P_F only. Catches log Z not tied to the initial flow, β or ω dropped from log R, and a REINFORCE
    baseline trained on R^β (its advantages vanish at large β) or through P_B."""
    from types import SimpleNamespace

    pipeline = GFlowNetPipeline(grid_config(tmp_path, objective=objective, beta=16.0, scalarisation="weighted_sum",
                                            epsilon=0.0, **{"task.kwargs.reward": "branin_currin"}))
    pipeline.trained_policy = pipeline.policy
    uniforms, preferences, betas = pipeline.draws(0, 0, np.arange(6))
    condition = pipeline.condition(preferences, betas)
    batch = sample_trajectories(pipeline.env, pipeline.policy, uniforms, condition, epsilon=0.2)
    objectives = pipeline.env.objectives(batch.terminals)
    loss, _ = pipeline.loss(SimpleNamespace(device=torch.device("cpu")), batch, objectives, preferences, betas)

    log_pf, log_pb, log_flows = pipeline.policy(batch.states, batch.actions, batch.lengths, condition)
    log_z = pipeline.log_z(condition, 6)
    weighted = (preferences * objectives).sum(1)
    if objective == "tb":
        expected = losses.trajectory_balance(log_pf, log_pb, batch.lengths, 16 * weighted.log().float(), log_z)
    elif objective == "db":
        flows = torch.cat([log_z[:, None], log_flows[:, 1:]], dim=1)
        expected = losses.detailed_balance(log_pf, log_pb, flows, batch.lengths, 16 * weighted.log().float())
    else:
        advantage = ((weighted - weighted.mean()) / (weighted.std() + 1e-8)).float()
        expected = -(advantage * log_pf.sum(1)).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


@pytest.mark.parametrize("fixed_length", [False, True])
def test_the_cached_sequence_sampler_equals_re_reading_the_prefix(fixed_length):
    """The key–value cache gives every step's logits of a full forward over the prefix (within float32 rounding)
    and the same trajectories, with conditioning and (variable length) stopped rows. Catches a position offset, the
    conditioning added at the wrong position, or a cache that attends to the wrong keys."""
    if fixed_length:
        from pipelines.gfn.environments import SequenceTask

        env = SequenceTask(alphabet="ACGT", max_length=7, min_length=7, score=lambda x: torch.ones(len(x)),
                           objective_names=("one",), fixed_length=True)
    else:
        env = ngrams_task(alphabet="ABC", bigrams=("AB",), max_length=7, min_length=2)
    torch.manual_seed(0)
    policy = SequencePolicy(env, condition_size=5, hidden=16, layers=2, heads=2)
    condition = torch.rand(9, 5, generator=torch.Generator().manual_seed(1))
    uniforms = torch.rand(9, env.max_steps, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    full = sample_trajectories(env, policy, uniforms, condition, epsilon=0.1, cached=False)
    fast = sample_trajectories(env, policy, uniforms, condition, epsilon=0.1)
    assert torch.equal(full.actions, fast.actions) and torch.equal(full.lengths, fast.lengths)
    assert fixed_length or len(set(full.lengths.tolist())) > 1
    stepper = policy.stepper(condition, 9)
    live = torch.ones(9, dtype=torch.bool)
    for t in range(env.max_steps):
        state = full.states[:, t]
        cached, reference = stepper.logits(state), policy.step_logits(state, condition)
        assert torch.allclose(cached[live], reference[live], atol=1e-5), t
        live &= t + 1 < full.lengths


# ------------------------------------------------------------------------------------------ mutation tasks
def toy_mutations(max_edits: int = 2):
    """Parent "ABCA" over "ABC"; the objective rewards C's: (1 + #C)² / 25."""
    from pipelines.gfn.environments import MutationTask

    return MutationTask(parent="ABCA", alphabet="ABC", max_edits=max_edits,
                        score=lambda x: ((1 + (x == 2).sum(1)).double() ** 2 / 25),
                        objective_names=("c_count",))


def test_mutation_task_facts():
    """Every design has one trajectory (mutations by increasing position, each a real change), stop needs
    min_edits, and the enumeration holds Σ_k C(L,k)(V−1)^k designs that replay to themselves. Catches a
    no-op mutation (two trajectories to one design, which P_B = 1 would miscount) or a reopened position."""
    env = toy_mutations()
    start = env.initial_states(1)
    mask = env.forward_mask(start)[0]
    assert mask.tolist()[-1] is False  # no stop before a mutation
    assert mask.reshape(-1)[:-1].reshape(4, 3).tolist() == [[False, True, True], [True, False, True],
                                                             [True, True, False], [False, True, True]]
    after = env.step(start, torch.tensor([2 * 3 + 0]))  # position 3 (1-based) C → A
    assert after.tolist() == [[0, 1, 0, 0, 3]] and env.describe(after) == ["C3A"]
    mask = env.forward_mask(after)[0]
    assert not bool(mask[: 3 * 3].any()) and bool(mask[3 * 3 :].any())  # only position 4 and stop remain
    terminals = env.enumerate_terminals()
    assert len(terminals) == 4 * 2 + 6 * 4 and len(torch.unique(terminals, dim=0)) == len(terminals)
    actions, lengths = env.trajectory_actions(terminals)
    assert torch.equal(replay_actions(env, actions, lengths).terminals, terminals)
    assert toy_mutations(max_edits=8).enumerate_terminals() is not None
    from pipelines.gfn.environments import MutationTask
    with pytest.raises(ConfigError, match="outside the alphabet"):
        MutationTask(parent="ABX", alphabet="ABC", max_edits=1, score=lambda x: x, objective_names=("x",))


def test_mutation_policy_exact_distribution_matches_monte_carlo():
    """As for grids and sequences: 20,000 rollouts of a random mutation policy against the exact distribution."""
    from pipelines.gfn.policies import MutationPolicy

    env = toy_mutations()
    torch.manual_seed(3)
    policy = MutationPolicy(env, hidden=16, layers=1, heads=2)
    with torch.no_grad():
        policy.mutation_head.weight.mul_(20)
    terminals, exact = terminal_distribution(env, policy)
    assert float(exact.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(exact.max()) > 2 / len(exact)
    uniforms = torch.rand(20_000, env.max_steps, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sampled = sample_trajectories(env, policy, uniforms).terminals
    index = {tuple(row.tolist()): i for i, row in enumerate(terminals)}
    counts = torch.bincount(torch.tensor([index[tuple(row.tolist())] for row in sampled]), minlength=len(terminals))
    assert 0.5 * float((counts.double() / 20_000 - exact).abs().sum()) < 0.025  # 32 outcomes


def test_tb_on_a_mutation_task_reaches_the_reward_distribution(tmp_path):
    """TB with the mutation policy on the toy task (32 designs): exact TV to R/Z falls from > 0.3 to < 0.05.
    Catches a mask, stop or summary-token error in the mutation policy that biases the sampler."""
    config = grid_config(tmp_path, epochs=300, **{"policy.hidden": 32, "policy.heads": 2})
    pipeline = GFlowNetPipeline(config, env=toy_mutations())
    before = pipeline.evaluate()["eval_tv"]
    after = pipeline.train()["eval_tv"]
    assert before > 0.3 and after < 0.05, (before, after)


def test_the_rfp_task_scores_stability_and_naturalness():
    """The protein world's RFP task: objectives in (0, 1]; the native sequence reads far more natural than a
    shuffle of it; the evaluation oracle is a different model.
    Catches a profile indexed by the wrong residue order or a stability scaled outside (0, 1]."""
    task = build_task("rfp", {"backbone": "2vad_A", "max_edits": 4})
    parent = task.initial_states(1)
    values = task.objectives(parent)[0]
    assert 0 < float(values[0]) <= 1 and 0 < float(values[1]) <= 1
    designs = parent.repeat(20, 1)
    designs[:, 10] = torch.arange(20)
    # ProteinMPNN recovers about half of native residues: the native must read far more natural than the same
    # backbone with its residues shuffled (a profile read in the wrong alphabet order would not see it).
    shuffled = parent.clone()
    shuffled[0, : task.length] = task.parent_ids[torch.randperm(task.length, generator=torch.Generator().manual_seed(0))]
    native, scrambled = task.objectives(torch.cat([parent, shuffled]))[:, 1].tolist()
    assert native > 2 * scrambled, (native, scrambled)
    evaluation = build_task("rfp", {"backbone": "2vad_A", "oracle": "eval"})
    assert not torch.equal(evaluation.objectives(designs)[:, 0], task.objectives(designs)[:, 0])
    assert task.describe(designs[:1]) in (["parent"], [f"{task.parent[10]}11A"])
    with pytest.raises(ConfigError, match="unknown backbone '1abc'"):
        build_task("rfp", {"backbone": "1abc"})


@pytest.mark.parametrize("objective", ["tb", "db"])
def test_two_processes_train_like_one_on_the_same_global_batch(tmp_path, torchrun, objective):
    """MOGFN-PC (TB or DB, with replay) on 2 processes (gloo) ends with the weights of a 1-process run of the same
    global batch, to float32 rounding. Catches per-process random streams, a replay buffer that differs between
    processes, or a loss normalised by the local instead of the global batch (DB's transition count). OP-GFN is
    left out: its softmax runs over each process's share by design (pipelines/gflownet.py)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    worker = root / "tests" / "helpers" / "gflownet_worker.py"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    overrides = [f"objective={objective}", "epochs=3", "trainer.checkpoint_every=3", "replay_capacity=32",
                 "replay_batch=8", "task.kwargs.reward=branin_currin", "batch_size=8", "eval.samples_per_preference=4"]
    subprocess.run([sys.executable, str(worker), tmp_path / "one", *overrides], env=env, check=True, timeout=300)
    torchrun([worker, tmp_path / "two", *overrides], env=env, timeout=300)
    folder = Path("checkpoints/step_000002/trainable.safetensors")
    a, b = load_file(str(tmp_path / "one" / folder)), load_file(str(tmp_path / "two" / folder))
    assert a.keys() == b.keys()
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert gap < 1e-5, gap
