"""The pipeline benchmarks compare like with like: at the smallest size, each plain reference loop of
scripts/benchmarks/pipelines/ computes what the real pipeline computes in one training unit (rewards, losses, gradient
norms before clipping, within the case's tolerance), and the check notices when they do not.

Each test runs one unit of both sides from the pretrained weights (a few seconds at most)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from benchmarks.pipelines import CASES  # noqa: E402
from benchmarks.pipelines.harness import check, run_side  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_unit(name: str) -> None:
    case = CASES[name]
    engine, reference = run_side(case, "engine", test_size=True), run_side(case, "reference", test_size=True)
    agrees, line = check(case, engine, reference)
    assert agrees, f"{name}: the plain loop and the pipeline computed different units: {line}"


def test_ddpo_reference_loop_equals_the_pipeline():
    """Catches a DDPO benchmark whose two sides train differently: advantages normalised otherwise than per prompt,
    a different PPO-clip loss or loss normalisation (over samples × steps), steps left out, or the engine's
    sampler drifting from the plain DDIM step (noise order, CFG, v-prediction)."""
    assert_same_unit("ddpo")


def test_draft_reference_loop_equals_the_pipeline():
    """Catches DRaFT's two sides backpropagating through different steps (K off by one, the no-grad prefix) or
    scaling the loss differently over micro-batches."""
    assert_same_unit("draft")


def test_alignprop_reference_loop_equals_the_pipeline():
    """Catches the reference drawing AlignProp's random K otherwise than the pipeline (another seed or range), which
    would time different truncations."""
    assert_same_unit("alignprop")


def test_prdp_reference_loop_equals_the_pipeline():
    """Catches PRDP's sides disagreeing on the pairwise loss (pairs, clipping, the Σ B² normaliser), on π_old, or on
    the second update (values pass against the epoch-start log-probs)."""
    assert_same_unit("prdp")


def test_dragon_reference_loop_equals_the_pipeline():
    """Catches DRAGON's sides forming other pairs (ties, per-prompt best/worst), drawing other t and ε per pair, or
    computing the base model's error with the adapters on."""
    assert_same_unit("dragon")


def test_drakes_reference_loop_equals_the_pipeline():
    """Catches DRAKES' sides drawing other Gumbel noise, relaxing a different number of steps, or computing another
    KL (the second update compares the KL, which is zero at the first)."""
    assert_same_unit("drakes")


def test_ctrl_u_reference_loop_equals_the_pipeline():
    """Catches Ctrl-U's sides noising the copies differently (t, t + 1, shared ε), rewarding other examples than
    t ≤ t_max, or weighting the reward loss, U and the diffusion loss differently."""
    assert_same_unit("ctrl_u")


def test_parrot_reference_loop_equals_the_pipeline():
    """Catches Parrot's sides selecting another Pareto set, crediting another reward per sample, expanding with other
    seeds, or scaling the T2I and PEN policy gradients differently."""
    assert_same_unit("parrot")


def test_gflownet_reference_loop_equals_the_pipeline():
    """Catches the GFlowNet sides rolling out different trajectories (uniforms, ε-mixing, the stop action) or
    computing another TB loss (log P_B, log Z's learning rate) over several updates."""
    assert_same_unit("gflownet")


def test_rtb_reference_loop_equals_the_pipeline():
    """Catches RTB's sides drawing another share of the batch from the pretrained model, initialising log Z
    otherwise, or using other trajectory densities."""
    assert_same_unit("rtb")


def test_the_check_notices_a_different_algorithm():
    """Catches a tolerance too loose to notice a changed algorithm: the GFlowNet reference run with a reward
    exponent β 1 % larger must disagree with the pipeline."""
    case = CASES["gflownet"]
    engine = run_side(case, "engine", test_size=True)
    original = case.build_config

    def other_beta(output_dir, test_size=False):
        config = original(output_dir, test_size)
        config.beta *= 1.01
        return config

    case.build_config = other_beta
    try:
        reference = run_side(case, "reference", test_size=True)
    finally:
        case.build_config = original
    agrees, line = check(case, engine, reference)
    assert not agrees, line
