"""Our GFlowNet losses against torchgfn 2.4.1 on fixed HyperGrid trajectories (no torchgfn needed here).

tests/data/gflownet_torchgfn_crosscheck.json was written by scripts/crosscheck_torchgfn.py in a separate venv that
has torchgfn: for 16 sampled trajectories on two HyperGrids (ndim 2 / height 4, ndim 3 / height 3) with learned
P_F, P_B (non-uniform), log F and a fixed log Z, it holds the per-transition inputs in our padded convention and
torchgfn's TBGFlowNet, DBGFlowNet and SubTBGFlowNet(weighting="geometric_within", λ = 0.9) losses, in float64.
Here we recompute ours from those tensors and require agreement to 1e-6 (relative).

What would break it (each changes these values by 5 % or more, checked when the fixture was made):

* DB or SubTB dropping the exit action s_n → s_f as a transition, i.e. putting R(x) on the last grid state instead
  of balancing F(x)·P_F(stop | x) = R(x), or giving that transition a log P_B ≠ 0;
* DB averaging per trajectory first instead of over all transitions of the batch;
* SubTB normalising the λ^{j−i} weights over the whole batch (torchgfn's "geometric") or not at all, instead of
  per trajectory then a mean over trajectories, or using equal weights (λ = 1);
* any loss reading the entries it must ignore: the fixture's padding transitions hold log_pf = −3, log_pb = 5 and
  log_flows holds 11 from entry n on (entry n must become log R), not torchgfn's zeros.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.gfn.losses import detailed_balance, subtrajectory_balance, trajectory_balance

DATA = Path(__file__).parent / "data" / "gflownet_torchgfn_crosscheck.json"
CROSSCHECK = json.loads(DATA.read_text())
LOSSES = ("tb", "db", "subtb")


def _ours(case: dict) -> dict[str, float]:
    """Our three losses on the case's padded tensors, in float64 like torchgfn's run."""
    log_pf, log_pb, log_flows, log_reward = (torch.tensor(case[key], dtype=torch.float64)
                                             for key in ("log_pf", "log_pb", "log_flows", "log_reward"))
    lengths = torch.tensor(case["lengths"], dtype=torch.long)
    log_z = torch.tensor(case["log_z"], dtype=torch.float64)
    return {
        "tb": trajectory_balance(log_pf, log_pb, lengths, log_reward, log_z).item(),
        "db": detailed_balance(log_pf, log_pb, log_flows, lengths, log_reward).item(),
        "subtb": subtrajectory_balance(log_pf, log_pb, log_flows, lengths, log_reward,
                                       lamda=CROSSCHECK["lambda"]).item(),
    }


@pytest.mark.parametrize("case", CROSSCHECK["cases"], ids=lambda case: case["name"])
def test_losses_match_torchgfn(case: dict) -> None:
    ours = _ours(case)
    for loss in LOSSES:
        assert ours[loss] == pytest.approx(case["torchgfn"][loss], rel=1e-6, abs=0), loss


@pytest.mark.parametrize("case", CROSSCHECK["cases"], ids=lambda case: case["name"])
def test_fixture_can_tell_the_conventions_apart(case: dict) -> None:
    """The bugs listed above only show on batches with mixed lengths (weighting, per-trajectory vs per-transition
    means) and with real backward steps whose learned log P_B is not 0."""
    lengths = torch.tensor(case["lengths"])
    steps = torch.arange(len(case["log_pb"][0]))[None, :]
    backward_steps = torch.tensor(case["log_pb"])[(steps < lengths[:, None] - 1) & (steps > 0)]
    assert len(set(case["lengths"])) >= 3 and int(lengths.max()) > 2
    assert bool((backward_steps.abs() > 1e-3).any())
