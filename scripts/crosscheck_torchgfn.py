"""Cross-check pipelines.gfn.losses (TB, DB, SubTB(λ)) against the reference library torchgfn on HyperGrid.

    PYTHONPATH=/work/main /work/envs/torchgfn/bin/python scripts/crosscheck_torchgfn.py \
        --out tests/data/gflownet_torchgfn_crosscheck.json

For each case (HyperGrid ndim=2/height=4 and ndim=3/height=3) the script builds torchgfn's environment, a learned
forward policy P_F, a learned backward policy P_B (so P_B is not the uniform one), a log-state-flow estimator and a
log Z, all small MLPs with a fixed seed, samples 16 trajectories with torchgfn's Sampler, and computes

* torchgfn's losses: ``TBGFlowNet.loss``, ``DBGFlowNet.loss`` (on ``trajectories.to_transitions()``) and
  ``SubTBGFlowNet.loss`` with ``weighting="geometric_within"``, λ = 0.9;
* ours, on the same trajectories and estimators re-expressed in our padded convention (see losses.py): T = the
  longest trajectory's number of actions *including* the exit action, lengths = torchgfn's ``terminating_idx``,
  log_pb = 0 for the exit action, log_flows[t] = log F(s_t) for the non-sink states s_0 … s_{n−1} and entry n (the
  sink s_f) left for the losses to replace by log R(x). Entries the losses must ignore (padding transitions, and
  log_flows from entry n on) hold distinct nonzero junk (PADDING) rather than torchgfn's zeros, so that the committed
  tensors also catch a loss that reads them.

Everything runs in float64 (torch default dtype), so the two sides should agree to ~1e-12; the JSON keeps the padded
tensors so that tests/test_gflownet_crosscheck.py can recompute our side in the main venv, which has no torchgfn.

torchgfn pins numpy < 2, so it lives in its own venv that borrows torch (and the rest) from the main venv through a
.pth file, appended after its own site-packages so that its numpy 1.26 wins. Setup (torch 2.14 accepts numpy 1.26):

    /root/.pyenv/versions/3.11.7/bin/python3.11 -m venv /work/envs/torchgfn
    /work/envs/torchgfn/bin/python -m pip install "numpy<2"
    # --no-deps: torchgfn, tensordict and the attention packages all require torch, which must not be reinstalled.
    /work/envs/torchgfn/bin/python -m pip install --no-deps torchgfn==2.4.1 tensordict==0.15.3 pyvers==0.2.3 \
        torch-geometric==2.8.1 xxhash==4.1.0 einops==0.8.2 dill==0.4.1 linear-attention-transformer==0.19.1 \
        axial-positional-embedding==0.3.12 local-attention==1.11.2 hyper-connections==0.4.11 \
        product-key-memory==0.3.0 CoLT5-attention==0.11.2 linformer==0.2.3
    echo /work/main/.venv/lib/python3.11/site-packages \
        > /work/envs/torchgfn/lib/python3.11/site-packages/zz_main_venv.pth

(The attention packages are only there because gfn.utils.modules imports linear_attention_transformer at import
time; HyperGrid does not use them.)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gfn.containers import Trajectories
from gfn.estimators import DiscretePolicyEstimator, ScalarEstimator
from gfn.gflownet import DBGFlowNet, SubTBGFlowNet, TBGFlowNet
from gfn.gym import HyperGrid
from gfn.preprocessors import KHotPreprocessor
from gfn.samplers import Sampler
from gfn.utils.modules import MLP
from gfn.utils.prob_calculations import get_trajectory_pbs, get_trajectory_pfs

from pipelines.gfn.losses import detailed_balance, subtrajectory_balance, trajectory_balance

LAMBDA = 0.9
N_TRAJECTORIES = 16
# Values of the entries our losses must ignore (padding, and log_flows' entry n); log_pf − log_pb ≠ 0 there.
PADDING = {"log_pf": -3.0, "log_pb": 5.0, "log_flows": 11.0}
NOTES = [
    "Transitions: torchgfn trajectories end with an explicit exit action s_n -> s_f; it is one of our transitions, "
    "so our lengths are torchgfn's terminating_idx (number of actions including the exit) and T is max_length.",
    "log P_B: torchgfn sets log P_B = 0 for the exit action (get_trajectory_pbs masks is_exit) and evaluates the "
    "learned P_B at s_{t+1} for every other action, backward action index = forward action index; this is our "
    "'stop transition has log_pb = 0' convention. The s_1 -> s_0 step is evaluated too (one parent, so 0).",
    "DB: DBGFlowNet.loss on trajectories.to_transitions() includes the exit transitions (is_terminating = next "
    "state is s_f), whose target flow is log R(x) instead of log F(s_f): residual log F(x) + log P_F(exit|x) - "
    "log R(x). Default SquaredLoss and reduction='mean' over all transitions = our sum / lengths.sum().",
    "SubTB: weighting='geometric_within' (torchgfn's default, 'the one in the paper') weights a sub-trajectory of "
    "k transitions by lambda^(k-1) / sum_i (n - i) lambda^i within its trajectory, then 1/B; the constant "
    "factor lambda^-1 cancels, so it equals our sum lambda^(j-i) delta^2 / sum lambda^(j-i), mean over "
    "trajectories. A sub-trajectory ending with the exit action (j = n) gets log R as its end flow; every other "
    "end state s_j (j < n, including the last grid state x) gets the learned log F(s_j), as in ours. loss() "
    "coerces reduction='mean' to 'sum' for this weighting since the contributions already sum to one.",
    "TB: TBGFlowNet.loss = mean over trajectories of (log Z + sum log P_F - sum log P_B - log R)^2, as ours.",
    "Padding: entries our losses must ignore hold junk (log_pf -3, log_pb 5, log_flows 11 from entry n on; "
    "entry n is replaced by log R), unlike torchgfn's zero padding, so a masking bug changes the values.",
    "No torchgfn option had to differ from its default (apart from choosing the learned P_B and lambda = 0.9).",
]


@dataclass(frozen=True)
class Case:
    """One HyperGrid configuration and the seed that fixes its estimators and trajectories."""

    ndim: int
    height: int
    seed: int
    log_z: float

    @property
    def name(self) -> str:
        return f"hypergrid_ndim{self.ndim}_height{self.height}"


CASES = (Case(ndim=2, height=4, seed=0, log_z=1.3), Case(ndim=3, height=3, seed=1, log_z=0.7))


def padded_inputs(env: HyperGrid, trajectories: Trajectories, pf: DiscretePolicyEstimator,
                  pb: DiscretePolicyEstimator, log_f: ScalarEstimator) -> dict[str, Tensor]:
    """Our padded tensors ([B, T] / [B, T+1], see losses.py) from torchgfn's time-major trajectories.

    Evaluated directly from the estimators (not through torchgfn's loss helpers) so that the index conventions are
    ours; they are then checked against torchgfn's get_trajectory_pfs / get_trajectory_pbs."""
    states, actions = trajectories.states, trajectories.actions  # batch shapes [T+1, B], [T, B]
    lengths = trajectories.terminating_idx.long()
    steps = trajectories.max_length
    real = torch.arange(steps)[:, None] < lengths[None, :]  # [T, B]: transition t of trajectory b exists
    # The states before the real transitions are exactly torchgfn's non-sink states s_0 … s_{n−1}.
    if not torch.equal(real, ~states.is_sink_state[:-1]):
        raise AssertionError("terminating_idx does not count the exit action as expected")

    log_pf = torch.zeros(steps, len(lengths))
    sources = states[:-1][real]
    log_pf[real] = pf.to_probability_distribution(sources, pf(sources)).log_prob(actions.tensor[real])

    # Non-exit transitions have a learned P_B(s_t | s_{t+1}); the exit action's P_B is 1.
    moves = real & ~actions.is_exit
    log_pb = torch.zeros(steps, len(lengths))
    targets = states[1:][moves]
    log_pb[moves] = pb.to_probability_distribution(targets, pb(targets)).log_prob(actions.tensor[moves])

    if not (torch.allclose(log_pf, get_trajectory_pfs(pf, trajectories), rtol=0, atol=1e-12)
            and torch.allclose(log_pb, get_trajectory_pbs(pb, trajectories), rtol=0, atol=1e-12)):
        raise AssertionError("our per-transition log-probabilities differ from torchgfn's")

    non_sink = ~states.is_sink_state
    # Entry n (s_f) and the padding hold junk: the losses must replace entry n by log R and ignore the rest.
    log_flows = torch.full((steps + 1, len(lengths)), PADDING["log_flows"])
    log_flows[non_sink] = log_f(states[non_sink]).squeeze(-1)

    log_reward = env.log_reward(trajectories.terminating_states)
    if not torch.allclose(log_reward, trajectories.log_rewards, rtol=0, atol=1e-12):
        raise AssertionError("trajectories.log_rewards is not log R of the terminating states")
    # Padding transitions get distinct junk (not 0 like torchgfn's) so that a loss that reads them shows it.
    log_pf = torch.where(real, log_pf, PADDING["log_pf"])
    log_pb = torch.where(real, log_pb, PADDING["log_pb"])
    return {"lengths": lengths, "log_pf": log_pf.T, "log_pb": log_pb.T, "log_flows": log_flows.T,
            "log_reward": log_reward}


def run_case(case: Case) -> dict[str, object]:
    """Build the estimators, sample the trajectories, and compute both sides' three losses."""
    torch.manual_seed(case.seed)
    # validate_modes=False: these grids are too small to contain the original reward's modes, which is irrelevant here.
    env = HyperGrid(ndim=case.ndim, height=case.height, validate_modes=False)
    preprocessor = KHotPreprocessor(height=case.height, ndim=case.ndim)
    width = preprocessor.output_dim

    def mlp(outputs: int) -> MLP:
        return MLP(input_dim=width, output_dim=outputs, hidden_dim=32, n_hidden_layers=2)

    pf = DiscretePolicyEstimator(mlp(env.n_actions), env.n_actions, preprocessor=preprocessor)
    pb = DiscretePolicyEstimator(mlp(env.n_actions - 1), env.n_actions, preprocessor=preprocessor, is_backward=True)
    log_f = ScalarEstimator(mlp(1), preprocessor=preprocessor)

    with torch.no_grad():
        trajectories = Sampler(pf).sample_trajectories(env, n=N_TRAJECTORIES)
        tb = TBGFlowNet(pf, pb, init_logZ=case.log_z)
        db = DBGFlowNet(pf, pb, log_f)
        subtb = SubTBGFlowNet(pf, pb, log_f, weighting="geometric_within", lamda=LAMBDA)
        theirs = {"tb": tb.loss(env, trajectories), "db": db.loss(env, trajectories.to_transitions()),
                  "subtb": subtb.loss(env, trajectories)}

        inputs = padded_inputs(env, trajectories, pf, pb, log_f)
        log_z = torch.tensor(case.log_z)
        ours = {
            "tb": trajectory_balance(inputs["log_pf"], inputs["log_pb"], inputs["lengths"], inputs["log_reward"],
                                     log_z),
            "db": detailed_balance(inputs["log_pf"], inputs["log_pb"], inputs["log_flows"], inputs["lengths"],
                                   inputs["log_reward"]),
            "subtb": subtrajectory_balance(inputs["log_pf"], inputs["log_pb"], inputs["log_flows"],
                                           inputs["lengths"], inputs["log_reward"], lamda=LAMBDA),
        }
    return {"name": case.name, "ndim": case.ndim, "height": case.height, "seed": case.seed, "log_z": case.log_z,
            **{key: value.tolist() for key, value in inputs.items()},
            "torchgfn": {key: float(value) for key, value in theirs.items()},
            "ours": {key: float(value) for key, value in ours.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    # HyperGrid warns that height <= 4 may be unsolvable; these grids are only loss inputs.
    logging.getLogger("gfn").setLevel(logging.ERROR)
    torch.set_default_dtype(torch.float64)

    cases = [run_case(case) for case in CASES]
    result = {"torchgfn_version": importlib.metadata.version("torchgfn"), "torch_version": torch.__version__,
              "dtype": "float64", "lambda": LAMBDA, "subtb_weighting": "geometric_within", "padding": PADDING,
              "notes": NOTES, "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    worst = 0.0
    for case in cases:
        for loss in ("tb", "db", "subtb"):
            theirs, ours = case["torchgfn"][loss], case["ours"][loss]
            relative = abs(ours - theirs) / abs(theirs)
            worst = max(worst, relative)
            print(f"{case['name']:28s} {loss:6s} torchgfn {theirs:.12f}  ours {ours:.12f}  rel diff {relative:.1e}")
    print(f"wrote {args.out}; worst relative difference {worst:.1e}")
    if worst > 1e-6:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
