"""Relative trajectory balance: the update's gradient against the loss in one graph (masked and image diffusion
generators, with prior samples and step chunks), the posterior p_pre·r^β reached on an enumerable masked toy,
resume, and bad input."""

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from genalign.config import ConfigError, build_config
from genalign.generators.masked import MaskedDiffusionConfig, MaskedDiffusionGenerator, MaskedSamplingOptions
from pipelines import get_pipeline
from pipelines.rtb import RTBConfig, RTBPipeline
from rewards import build_reward
from tests.helpers.interrupt import interrupt_on_call
from tests.test_ddpo import CountingReward

ALPHABET, LENGTH = "ACG", 3


pytestmark = pytest.mark.usefixtures("one_thread")


class PositionTable(torch.nn.Module):
    """Logits that depend on the position only (not on x_t or the step). With it the posterior
    p_pre(τ)·r(x)^β / Z of a reward that factorises over positions is itself such a model — every position's
    token distribution tilted by its factor, the schedule's unmasking times unchanged — so RTB can reach it
    exactly and the test can demand a small distance."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(LENGTH, len(ALPHABET), generator=g, dtype=torch.float64)
        mask_column = torch.zeros(LENGTH, 1, dtype=torch.float64)  # the MASK logit is never used
        self.table = torch.nn.Parameter(torch.cat([logits, mask_column], dim=1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table.expand(x.shape[0], -1, -1)


def toy_generator(seed: int = 0) -> MaskedDiffusionGenerator:
    return MaskedDiffusionGenerator(PositionTable(seed), MaskedDiffusionConfig(alphabet=ALPHABET, length=LENGTH))


def masked_config(out_dir: Path, **overrides) -> RTBConfig:
    data = {
        "pipeline": "rtb",
        "prompts": {"unconditional": True},
        "reward": {"name": "gc_content", "kwargs": {"alphabet": ALPHABET}},
        "sampling": {"num_inference_steps": LENGTH, "final_step": "sample"},
        "trainer": {"output_dir": str(out_dir), "learning_rate": 0.05, "max_grad_norm": 1e6, "progress": False,
                    "weight_decay": 0.0, "lora": {"enabled": False}, "checkpoint_every": 1},
        "eval": {"every": 1000, "samples_per_prompt": 4},
        "epochs": 2, "batch_size": 8, "train_batch_size": 4, "beta": 3.0, "prior_fraction": 0.25,
        "log_z_learning_rate": 0.1, "chunk_steps": 2,
    }
    return build_config(RTBConfig, data, [f"{k}={v}" for k, v in overrides.items()])


def exact_marginal(generator: MaskedDiffusionGenerator, options: MaskedSamplingOptions) -> dict[tuple, float]:
    """P(x_0) by dynamic programming over every state of the reverse chain, from the step transitions
    q(x_s | x_t) = Π_i q_i(x_s,i | x_t) of `transition_log_probs` — not from the pipeline's sums."""
    mask = len(ALPHABET)
    current = {(mask,) * LENGTH: 1.0}
    for k in range(options.num_inference_steps):
        following: dict[tuple, float] = {}
        states = list(current)
        with torch.no_grad():
            q = generator.transition_log_probs(torch.tensor(states), torch.full((len(states),), k), options).exp()
        for row, state in enumerate(states):
            for x_s in itertools.product(range(mask + 1), repeat=LENGTH):
                p = current[state] * float(torch.prod(q[row, torch.arange(LENGTH), torch.tensor(x_s)]))
                if p > 0:
                    following[x_s] = following.get(x_s, 0.0) + p
        current = following
    assert all(mask not in x for x in current), "the final step must unmask every position"
    return current


def posterior_distance(pipeline: RTBPipeline) -> tuple[float, float]:
    """(TV between the model's exact marginal and p_pre(x)·r(x)^β / Z, log Z of that posterior)."""
    generator, options = pipeline.generator, pipeline.options
    model = exact_marginal(generator, options)
    with generator.reference():
        prior = exact_marginal(generator, options)
    sequences = sorted(prior)
    log_r = pipeline.config.beta * pipeline.reward(torch.tensor(sequences)).rewards.double()
    weights = torch.tensor([prior[x] for x in sequences], dtype=torch.float64) * log_r.exp()
    target = weights / weights.sum()
    p = torch.tensor([model.get(x, 0.0) for x in sequences], dtype=torch.float64)
    return float(0.5 * (p - target).abs().sum()), float(weights.sum().log())


def test_rtb_reaches_the_posterior_on_an_enumerable_masked_toy(tmp_path):
    """Catches a wrong sign or weight of either model's log-likelihood, β applied to the wrong term, a log Z
    that does not train (or trains with weight decay), and prior rows scored with the wrong model: each leaves
    the fine-tuned marginal away from p_pre(x)·e^{β·gc(x)} / Z. Measured: TV 0.317 before, 0.0002 after 150
    updates (log Z 1.3436 vs the true 1.3439)."""
    config = masked_config(tmp_path / "run", epochs=150, batch_size=32, train_batch_size=16)
    pipeline = RTBPipeline(config, generator=toy_generator())
    pipeline.generator.keep_reference_copy()  # the distance below needs the reference before training too
    before, true_log_z = posterior_distance(pipeline)
    metrics = pipeline.train()
    after, _ = posterior_distance(pipeline)
    assert before > 0.25, before
    assert after < 0.01, (before, after)
    assert abs(metrics["log_z"] - true_log_z) < 0.02, (metrics["log_z"], true_log_z)


def record_rollouts(generator, monkeypatch) -> list:
    """The list that every rollout `generator.sample` returns from now on is appended to (with a trajectory:
    sampling for training, not the held-out evaluation's)."""
    sampled, original = [], generator.sample

    def recording(*args, **kwargs):
        rollout = original(*args, **kwargs)
        if rollout.trajectory is not None:
            sampled.append(rollout)
        return rollout

    monkeypatch.setattr(generator, "sample", recording)
    return sampled


def balance_terms(pipeline: RTBPipeline, rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recomputed apart from the pipeline: Σ log p_φ over the steps with a density (with gradients), Σ log p_pre
    under reference(), and log r [B] of one recorded rollout."""
    generator, trajectory = pipeline.generator, rollout.trajectory
    steps = torch.nonzero(trajectory.trainable).flatten().tolist()
    log_p = sum(generator.step_log_prob(trajectory, k) for k in steps)
    with torch.no_grad(), generator.reference():
        log_pre = sum(generator.step_log_prob(trajectory, k) for k in steps)
    log_r = pipeline.log_reward(pipeline.reward(rollout.outputs, rollout.texts).rewards).to(log_p.device)
    return log_p, log_pre, log_r


def _check_update_gradients(pipeline: RTBPipeline, monkeypatch, tolerance: float) -> list[float]:
    """Train with a hook that, before every optimiser step, recomputes mean δ² over the update's trajectories in
    one graph (φ's log-probabilities with gradients, p_pre's under reference(), the same log Z) and compares its
    gradient with the one the update applies, to a relative error below `tolerance`. Returns |∇ log Z| per
    update."""
    sampled = record_rollouts(pipeline.generator, monkeypatch)
    seen = []

    def check(optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        applied = [p.grad.clone() for p in params]
        deltas = []
        for rollout in sampled:
            log_p, log_pre, log_r = balance_terms(pipeline, rollout)
            deltas.append(pipeline.log_z.double() + log_p - log_pre - pipeline.config.beta * log_r)
        loss = torch.cat(deltas).pow(2).mean()
        expected = torch.autograd.grad(loss, params, allow_unused=True)
        for got, want in zip(applied, expected):
            want = torch.zeros_like(got) if want is None else want.to(got.dtype)
            error = float((got - want).norm() / want.norm().clamp_min(1e-12))
            assert error < tolerance, (error, got.shape)
        seen.append(float(pipeline.log_z.grad.abs()))
        sampled.clear()

    handle = register_optimizer_step_pre_hook(check)
    try:
        pipeline.train()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("prior_fraction, chunk_steps", [(0.25, 2), (0.0, 3), (1.0, 1)])
def test_an_update_applies_the_gradient_of_the_whole_loss_masked(tmp_path, monkeypatch, prior_fraction, chunk_steps):
    """Catches a missing or doubled δ² term for log Z, chunks or micro-batches that do not add up to the mean
    (accelerate's division by the accumulation steps), a δ built from the wrong sampler's recorded log-probs
    for prior rows, and a gradient that flows into p_pre."""
    config = masked_config(tmp_path / "run", prior_fraction=prior_fraction, chunk_steps=chunk_steps)
    log_z_grads = _check_update_gradients(RTBPipeline(config, generator=toy_generator()), monkeypatch, 1e-6)
    assert len(log_z_grads) == 2 and all(g > 1e-3 for g in log_z_grads)


def test_an_update_applies_the_gradient_of_the_whole_loss_image_diffusion(tiny_sd_dir, tmp_path, monkeypatch):
    """The same check on the tiny SD-layout model: the trajectory likelihood is the sum of its per-step Gaussian
    log-probabilities (DDIM, η = 1), under LoRA, where reference() disables the adapters."""
    data = {
        "pipeline": "rtb",
        "model": {"pretrained": str(tiny_sd_dir)},
        "prompts": {"prompts": ["a red circle", "a blue square"]},
        "sampling": {"num_inference_steps": 3, "guidance_scale": 2.0, "eta": 1.0},
        "trainer": {"output_dir": str(tmp_path / "run"), "learning_rate": 1e-3, "max_grad_norm": 1e6,
                    "progress": False},
        "eval": {"every": 1000, "samples_per_prompt": 1},
        "epochs": 2, "batch_size": 4, "train_batch_size": 2, "beta": 10.0, "prior_fraction": 0.5, "chunk_steps": 2,
    }
    pipeline = RTBPipeline(build_config(RTBConfig, data), reward=CountingReward())
    # float32 UNet: the recorded and the recomputed Gaussian log-probabilities differ in the last bits, which
    # the large δ (β = 10) amplifies; a missing term or a wrong scale is an error of order 1.
    log_z_grads = _check_update_gradients(pipeline, monkeypatch, 1e-3)
    assert len(log_z_grads) == 2 and all(g > 1e-4 for g in log_z_grads)


def test_a_fresh_run_starts_log_z_at_the_first_batch_minimiser(tmp_path, monkeypatch):
    """With log Z frozen (learning rate 0), log Z after one update is what the first micro-batch set it to: it
    must equal mean(β·log r − log p_φ + log p_pre) of that batch recomputed before the step, so the first
    update's mean residual is 0. With log_z_init: zero it stays 0. Catches an initialisation from the wrong sign
    or terms, one applied after the first backward, or one that overrides log_z_init."""
    generator = toy_generator()
    sampled = record_rollouts(generator, monkeypatch)
    for init, expect_zero in (("first_batch", False), ("zero", True)):
        sampled.clear()
        pipeline = RTBPipeline(masked_config(tmp_path / init, epochs=1, batch_size=8, train_batch_size=8,
                                             log_z_learning_rate=0.0, log_z_init=init,
                                             **{"trainer.learning_rate": 0.0}),
                               generator=generator)
        pipeline.train()
        terms = []
        with torch.no_grad():
            for rollout in sampled:
                log_p, log_pre, log_r = balance_terms(pipeline, rollout)
                terms.append(pipeline.config.beta * log_r - log_p.double() + log_pre.double())
        expected = 0.0 if expect_zero else float(torch.cat(terms).mean())
        assert float(pipeline.log_z.detach()) == pytest.approx(expected, abs=1e-5), init
        assert expect_zero or abs(expected) > 0.5  # the initial value is not 0 by accident


def test_a_resumed_run_ends_with_the_weights_and_log_z_of_an_uninterrupted_one(tmp_path):
    """Catches a resume that loses log Z or its optimiser state, redraws the interrupted epoch's trajectories
    (or its prior rows) differently, or loses the frozen reference copy."""
    overrides = {"epochs": 3, "trainer.keep_checkpoints": 0}
    RTBPipeline(masked_config(tmp_path / "straight", **overrides), generator=toy_generator()).train()
    stopped = RTBPipeline(masked_config(tmp_path / "resumed", **overrides), generator=toy_generator())
    # Reward call 4 is in the second epoch: 1 = the base evaluation, then one call per micro-batch (two per epoch).
    interrupt_on_call(stopped.reward, "score", 4)
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    RTBPipeline(masked_config(tmp_path / "resumed", **overrides, **{"trainer.resume": "latest"}),
                generator=toy_generator()).train()
    folder = Path("checkpoints/step_000002")
    a = load_file(str(tmp_path / "straight" / folder / "trainable.safetensors"))
    b = load_file(str(tmp_path / "resumed" / folder / "trainable.safetensors"))
    assert any("log_z" in k for k in a), sorted(a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_a_clear_error(tmp_path):
    """A prior share outside [0, 1], a log transform of a non-positive reward, and a misspelt setting each name
    the problem and the fix."""
    assert get_pipeline("rtb") is RTBPipeline
    with pytest.raises(ConfigError, match="prior_fraction"):
        RTBPipeline(masked_config(tmp_path / "a", prior_fraction=1.5), generator=toy_generator())
    pipeline = RTBPipeline(masked_config(tmp_path / "b", reward_transform="log"), generator=toy_generator())
    with pytest.raises(ConfigError, match="reward_transform: identity"):
        pipeline.log_reward(torch.tensor([0.5, 0.0]))
    with pytest.raises(ConfigError, match="log_prob_reduction: sum"):
        RTBPipeline(masked_config(tmp_path / "d", **{"sampling.log_prob_reduction": "mean"}), generator=toy_generator())
    with pytest.raises(ConfigError, match="prior_fractoin"):
        masked_config(tmp_path / "c", prior_fractoin=0.5)
    assert build_reward("gc_content", alphabet=ALPHABET).modality == "sequence"
