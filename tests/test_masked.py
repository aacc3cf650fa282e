"""Masked discrete diffusion generator: the reverse step by hand, exact log-probs, the MDLM loss, pre-training on a
Markov grammar, persistence, soft inputs, reference weights and the relaxed (DRAKES) sampler."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from genalign.generators.base import Generator
from genalign.generators.masked import (
    MaskedDiffusionConfig,
    MaskedDiffusionGenerator,
    MaskedModelLoadError,
    MaskedSamplingOptions,
    dilated_conv1d,
    mdlm_loss,
)
from genalign.generators.masked_pretraining import encode_fixed_length, pretrain_masked, read_sequences
from genalign.worlds.markov import MarkovGrammar, kmer_correlation, kmer_total_variation, write_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_masked import bench_masked_sampling  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def small_generator(backbone: str = "cnn", *, length: int = 12, seed: int = 0) -> MaskedDiffusionGenerator:
    """A tiny model over "ACGT" whose (normally zero-initialised) output layer is random, so its predictions
    depend on the input and log-prob checks are not trivially state-independent."""
    torch.manual_seed(seed)
    config = MaskedDiffusionConfig(length=length, backbone=backbone, hidden_size=16, num_layers=2, kernel_size=3,
                                   num_heads=2, mlp_ratio=2)
    generator = MaskedDiffusionGenerator.from_config(config)
    torch.nn.init.normal_(generator.backbone.to_logits.weight, std=1.0)
    return generator


# ----------------------------------------------------------------------------------- the 3-token toy

# V = 3 tokens "abc" + MASK (id 3), L = 2. The stub's probabilities per position are fixed and known; its MASK
# logit is huge so any leak of it into p_θ shows.
P0 = [[1 / 6, 2 / 6, 3 / 6], [4 / 6, 1 / 6, 1 / 6]]


class FixedLogits(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        mask_logit = torch.full((2, 1), 50.0, dtype=torch.float64)
        self.table = torch.nn.Parameter(torch.cat([torch.tensor(P0, dtype=torch.float64).log(), mask_logit], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table.expand(x.shape[0], -1, -1)


def toy_generator() -> MaskedDiffusionGenerator:
    return MaskedDiffusionGenerator(FixedLogits(), MaskedDiffusionConfig(alphabet="abc", length=2))


def hand_q(position: int, k: int, T: int, temperature: float = 1.0) -> list[float]:
    """q(·) of a masked position at step k: p(v)·(t − s)/t for v real, s/t for MASK (m_t = (1 − ε)t cancels)."""
    t, s = (T - k) / T, (T - k - 1) / T
    weights = [p ** (1 / temperature) for p in P0[position]]
    p = [w / sum(weights) for w in weights]
    return [pv * (t - s) / t for pv in p] + [s / t]


def test_toy_step_distribution_is_the_hand_enumerated_one():
    gen, T = toy_generator(), 4
    options = MaskedSamplingOptions(num_inference_steps=T)
    all_masked = torch.tensor([[3, 3]])
    for k in range(T - 1):
        q = gen.transition_log_probs(all_masked, torch.tensor([k]), options).exp()[0]
        for i in range(2):
            assert q[i].tolist() == pytest.approx(hand_q(i, k, T), abs=1e-12)
    # Carry-over: an unmasked position is a point mass on its token; the masked one is unaffected by it.
    q = gen.transition_log_probs(torch.tensor([[3, 1]]), torch.tensor([1]), options).exp()[0]
    assert q[1].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert q[0].tolist() == pytest.approx(hand_q(0, 1, T), abs=1e-12)
    # Logit temperature: p ∝ p_stub^(1/τ).
    cold = MaskedSamplingOptions(num_inference_steps=T, temperature=0.5)
    q = gen.transition_log_probs(all_masked, torch.tensor([0]), cold).exp()[0]
    assert q[0].tolist() == pytest.approx(hand_q(0, 0, T, temperature=0.5), abs=1e-12)


def test_toy_sampling_frequencies_carry_over_mask_and_final_argmax():
    gen, T, n = toy_generator(), 4, 3000
    rollout = gen.sample([""] * n, MaskedSamplingOptions(num_inference_steps=T), seeds=range(n))
    states = rollout.trajectory.states  # [n, T+1, 2]
    assert states.shape == (n, T + 1, 2) and states.dtype == torch.long
    assert (states[:, 0] == 3).all()
    # First step: empirical frequencies of each position's token (incl. MASK) match q, within ~3 sigma.
    for i in range(2):
        freq = torch.bincount(states[:, 1, i], minlength=4).double() / n
        assert freq.tolist() == pytest.approx(hand_q(i, 0, T), abs=0.025)
    # Once unmasked, a position never changes.
    for k in range(T):
        unmasked = states[:, k] != 3
        assert (states[:, k + 1][unmasked] == states[:, k][unmasked]).all()
    # Outputs are real tokens; positions still masked before the last step get the argmax ('c' at 0, 'a' at 1).
    assert rollout.outputs.max() < 3 and torch.equal(rollout.outputs, states[:, -1])
    masked_last = states[:, T - 1] == 3
    assert masked_last.any(dim=0).all()
    assert (rollout.outputs[:, 0][masked_last[:, 0]] == 2).all()
    assert (rollout.outputs[:, 1][masked_last[:, 1]] == 0).all()


def test_toy_recorded_log_probs_equal_hand_values():
    gen, T, n = toy_generator(), 4, 64
    trajectory = gen.sample([""] * n, MaskedSamplingOptions(num_inference_steps=T), seeds=range(n)).trajectory
    assert trajectory.trainable.tolist() == [True, True, True, False]
    assert trajectory.log_probs.dtype == torch.float64 and (trajectory.log_probs[:, T - 1] == 0).all()
    for b in range(n):
        for k in range(T - 1):
            x_t, x_s = trajectory.states[b, k].tolist(), trajectory.states[b, k + 1].tolist()
            # Only positions masked at t count; carried-over ones contribute log 1.
            expected = sum(math.log(hand_q(i, k, T)[x_s[i]]) for i in range(2) if x_t[i] == 3)
            assert float(trajectory.log_probs[b, k]) == pytest.approx(expected, abs=1e-12)
        assert float(gen.step_log_prob(trajectory[[b]], torch.tensor([T - 1])).detach()) == 0.0


# ----------------------------------------------------------------------------------- exact re-evaluation


@pytest.mark.parametrize("backbone", ["cnn", "transformer"])
def test_reevaluated_log_probs_equal_recorded(backbone):
    gen = small_generator(backbone)
    assert isinstance(gen, Generator)
    T, n = 6, 8
    trajectory = gen.sample([""] * n, MaskedSamplingOptions(num_inference_steps=T, temperature=0.7), seeds=range(n)).trajectory
    assert trajectory.log_probs[:, : T - 1].lt(0).all()
    for k in range(T):
        ratio = torch.exp(gen.step_log_prob(trajectory, torch.full((n,), k)) - trajectory.log_probs[:, k])
        assert torch.allclose(ratio, torch.ones_like(ratio), rtol=0, atol=1e-6)
    # A different step per sample, in one call, and differentiable into the backbone.
    steps = torch.arange(n) % T
    log_prob = gen.step_log_prob(trajectory, steps)
    expected = trajectory.log_probs[torch.arange(n), steps]
    assert torch.allclose(torch.exp(log_prob.detach() - expected), torch.ones(n, dtype=torch.float64), atol=1e-6)
    log_prob.sum().backward()
    assert gen.backbone.to_logits.weight.grad.abs().sum() > 0


def test_chunked_sampling_equals_unchunked_and_texts_are_ignored():
    gen = small_generator()
    options = MaskedSamplingOptions(num_inference_steps=5)
    whole = gen.sample([""] * 7, options, seeds=range(10, 17))
    chunked = gen.sample([f"prompt {i}" for i in range(7)], options, seeds=range(10, 17), batch_size=3)
    assert torch.equal(whole.outputs, chunked.outputs)
    assert torch.equal(whole.trajectory.states, chunked.trajectory.states)
    # float32 kernels round differently for other batch sizes: equal to float32 precision, not bit for bit.
    assert torch.allclose(whole.trajectory.log_probs, chunked.trajectory.log_probs, rtol=1e-6, atol=0)
    assert chunked.texts == [f"prompt {i}" for i in range(7)]
    other = gen.sample([""] * 7, options, seeds=range(20, 27))
    assert not torch.equal(whole.outputs, other.outputs)


# ----------------------------------------------------------------------------------- the MDLM loss


def test_mdlm_loss_equals_direct_computation():
    gen = small_generator(length=5)
    x0 = torch.tensor([[0, 1, 2, 3, 0], [3, 3, 1, 0, 2], [1, 1, 1, 2, 2]])
    t = torch.tensor([0.2, 0.5, 0.9])
    masked = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 1]], dtype=torch.bool)
    loss = mdlm_loss(gen.logits, x0, gen.schedule, gen.mask_id, t=t, masked=masked)

    total = 0.0
    for b in range(3):
        x_t = [gen.mask_id if masked[b, i] else int(x0[b, i]) for i in range(5)]
        logits = gen.logits(torch.tensor([x_t]))[0]
        for i in range(5):
            if masked[b, i]:
                log_p = torch.log_softmax(logits[i, :4], dim=-1)  # MASK excluded from p_θ
                total += (1.0 / float(t[b])) * -float(log_p[x0[b, i]].detach())
    assert float(loss.detach()) == pytest.approx(total / 15, rel=1e-5)


def test_mdlm_loss_of_a_uniform_model_is_ln_v_per_token():
    # For p_θ uniform, every t gives E[(1/t)·#masked/L]·ln V = (1 − ε)·ln V: checks the 1/t weight, the per-token
    # normalisation and the stratified t / mask draws together.
    config = MaskedDiffusionConfig(length=64, hidden_size=8, num_layers=1, kernel_size=3)
    gen = MaskedDiffusionGenerator.from_config(config)  # zero-initialised output layer: uniform predictions
    x0 = torch.randint(4, (512, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = mdlm_loss(gen.logits, x0, gen.schedule, gen.mask_id, generator=torch.Generator().manual_seed(1))
    assert float(loss) == pytest.approx((1 - config.eps) * math.log(4), rel=0.02)


# ----------------------------------------------------------------------------------- pre-training on a grammar


@pytest.fixture(scope="module")
def grammar():
    return MarkovGrammar.random("ACGT", order=1, concentration=0.3, seed=0)


@pytest.fixture(scope="module")
def pretrained(grammar, tmp_path_factory):
    """A small CNN pre-trained for a few seconds on 2,000 grammar sequences (FASTA), saved."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("masked")
    data = write_dataset(folder / "grammar.fasta", grammar, 2000, 32, seed=0)
    config = MaskedDiffusionConfig(length=32, hidden_size=32, num_layers=4, kernel_size=5)
    return pretrain_masked(data, folder / "model", config=config, steps=120, batch_size=64, lr=3e-3,
                           warmup_steps=20, eval_every=60, seed=0, progress=False)


def test_pretraining_lowers_heldout_loss_and_learns_the_grammar(pretrained, grammar):
    losses = [entry["heldout_loss"] for entry in pretrained.history]
    assert [entry["step"] for entry in pretrained.history] == [0, 60, 120]
    assert losses[-1] < losses[0] - 0.15, losses
    samples = pretrained.generator.sample([""] * 256, MaskedSamplingOptions(num_inference_steps=32), seeds=range(256)).outputs
    reference = grammar.sample(4000, 32, seed=1)
    uniform = torch.randint(4, (256, 32), generator=torch.Generator().manual_seed(2))
    assert kmer_total_variation(samples, reference, 3, 4) < 0.5 * kmer_total_variation(uniform, reference, 3, 4)
    assert kmer_correlation(samples, reference, 3, 4) > 0.8
    assert grammar.log_likelihood(samples).mean() > grammar.log_likelihood(uniform).mean() + 10


def test_sequence_files_in_three_formats(grammar, tmp_path):
    for name in ("data.fa", "data.csv", "data.txt"):
        path = write_dataset(tmp_path / name, grammar, 5, 8, seed=3)
        assert read_sequences(path) == grammar.decode(grammar.sample(5, 8, seed=3))
    ids, cropped, dropped = encode_fixed_length(["ACGTA", "ACG", "CGTA"], "ACGT", 4)
    assert ids.tolist() == [[0, 1, 2, 3], [1, 2, 3, 0]] and (cropped, dropped) == (1, 1)
    with pytest.raises(ValueError, match="not in the alphabet"):
        encode_fixed_length(["ACNT"], "ACGT", 4)


# ----------------------------------------------------------------------------------- persistence and inputs


def test_save_load_round_trip_gives_identical_samples(pretrained, tmp_path):
    loaded = MaskedDiffusionGenerator.from_pretrained(pretrained.output_dir)
    assert loaded.config == pretrained.generator.config
    options = MaskedSamplingOptions(num_inference_steps=8)
    a = pretrained.generator.sample([""] * 6, options, seeds=range(6))
    b = loaded.sample([""] * 6, options, seeds=range(6))
    assert torch.equal(a.outputs, b.outputs) and torch.equal(a.trajectory.log_probs, b.trajectory.log_probs)

    with pytest.raises(MaskedModelLoadError, match="pretrain_masked.py"):
        MaskedDiffusionGenerator.from_pretrained(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(MaskedModelLoadError, match="not valid JSON"):
        MaskedDiffusionGenerator.from_pretrained(broken)
    (broken / "config.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(MaskedModelLoadError, match="save_pretrained"):
        MaskedDiffusionGenerator.from_pretrained(broken)
    (broken / "config.json").write_text((pretrained.output_dir / "config.json").read_text())
    with pytest.raises(MaskedModelLoadError, match="does not hold weights"):
        MaskedDiffusionGenerator.from_pretrained(broken)


@pytest.mark.parametrize("backbone", ["cnn", "transformer"])
def test_soft_one_hot_input_equals_id_input(backbone):
    gen = small_generator(backbone)
    ids = torch.randint(5, (3, 12), generator=torch.Generator().manual_seed(0))
    soft = F.one_hot(ids, 5).float()
    assert torch.allclose(gen.logits(soft), gen.logits(ids), rtol=0, atol=1e-6)


def test_folded_dilated_conv_equals_a_dilated_conv():
    conv = torch.nn.Conv1d(3, 4, 5, padding=2)
    for length, dilation in [(13, 4), (12, 3), (7, 8), (9, 1)]:
        x = torch.randn(2, 3, length)
        expected = F.conv1d(x, conv.weight, conv.bias, padding=2 * dilation, dilation=dilation)
        assert torch.allclose(dilated_conv1d(conv, x, dilation), expected, atol=1e-5)


# ----------------------------------------------------------------------------------- reference weights and wrappers


def perturb_lora(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)


@pytest.mark.parametrize("backbone,targets", [("cnn", ["dilated_conv", "pointwise_conv", "to_logits"]),
                                              ("transformer", ["to_q", "to_k", "to_v", "to_out"])])
def test_reference_under_lora_gives_base_log_probs(backbone, targets, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    gen = small_generator(backbone)
    trajectory = gen.sample([""] * 4, MaskedSamplingOptions(num_inference_steps=4), seeds=range(4)).trajectory
    step = torch.tensor([0, 1, 2, 1])
    base = gen.step_log_prob(trajectory, step).detach()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=targets), gen.backbone)
    perturb_lora(gen.backbone)
    gen.keep_reference_copy()  # under LoRA a no-op: a copy now would hold the tuned weights
    tuned = gen.step_log_prob(trajectory, step).detach()
    assert (tuned - base).abs().max() > 1e-3
    with gen.reference():
        assert torch.allclose(gen.step_log_prob(trajectory, step), base, rtol=0, atol=1e-6)
    assert torch.allclose(gen.step_log_prob(trajectory, step), tuned)
    # Saving merges the adapters: the folder reproduces the tuned model as a plain one.
    reloaded = MaskedDiffusionGenerator.from_pretrained(gen.save_pretrained(tmp_path / "merged"))
    assert torch.allclose(reloaded.step_log_prob(trajectory, step).detach(), tuned, rtol=0, atol=1e-5)


def test_reference_under_full_fine_tuning_and_training_stand_ins():
    gen = small_generator()
    trajectory = gen.sample([""] * 3, MaskedSamplingOptions(num_inference_steps=3), seeds=range(3)).trajectory
    with pytest.raises(RuntimeError, match="keep_reference_copy"):
        with gen.reference():
            pass
    base = gen.step_log_prob(trajectory, 0).detach()
    gen.keep_reference_copy()
    with torch.no_grad():
        gen.backbone.to_logits.weight.add_(torch.randn_like(gen.backbone.to_logits.weight))
    with gen.reference():
        assert torch.allclose(gen.step_log_prob(trajectory, 0), base, rtol=0, atol=1e-9)
    assert not torch.allclose(gen.step_log_prob(trajectory, 0), base)

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x)

    wrapper = Counting(gen.backbone)
    gen.set_training_modules({"backbone": wrapper})
    gen.step_log_prob(trajectory, 1)
    assert wrapper.calls == 1 and gen.trainable_modules() == {"backbone": gen.backbone}


# ----------------------------------------------------------------------------------- the relaxed sampler


def test_relaxed_sampler_gives_gradients_and_a_hard_one_hot():
    gen = small_generator()
    options = MaskedSamplingOptions(num_inference_steps=6)
    rollout = gen.sample_differentiable([""] * 4, options, grad_steps=3, seeds=range(4), tau=0.5)
    out = rollout.outputs
    assert out.shape == (4, 12, 4) and rollout.trajectory is None and out.requires_grad
    assert torch.allclose(out.sum(-1), torch.ones(4, 12), atol=1e-6)
    assert torch.allclose(out, F.one_hot(out.argmax(-1), 4).float(), atol=1e-6)
    reward = (out * torch.linspace(-1, 1, 4)).sum()
    reward.backward()
    assert gen.backbone.to_logits.weight.grad.abs().sum() > 0
    assert gen.backbone.blocks[0].dilated_conv.weight.grad.abs().sum() > 0
    # Without relaxed steps it is exactly `sample` with the same seeds (same draws, final argmax).
    hard = gen.sample_differentiable([""] * 4, options, grad_steps=0, seeds=range(4)).outputs
    assert torch.equal(hard.argmax(-1), gen.sample([""] * 4, options, seeds=range(4)).outputs)


def test_bench_row_has_the_bench_format():
    row = bench_masked_sampling(small_generator(), num_samples=4, num_steps=3, repeats=1)
    assert set(row) == {"benchmark", "baseline", "baseline_s", "ours_s", "ratio", "samples_per_s"}
    assert row["ratio"] > 0


def test_log_likelihood_bound_is_exact_for_a_position_independent_model():
    """For the fixed toy (p_θ ignores x_t) the ELBO's expectation is (1 − ε)·log p(x), log p(x) = Σ_i log P0[i][x_i]:
    a position is masked with probability m_t = (1 − ε)t and weighted by 1/t. A bound that forgot the weight
    would be about half of it; one that counted unmasked positions would be off too."""
    gen = toy_generator()
    ids = torch.tensor([[0, 0], [2, 1], [1, 2]])
    exact = torch.tensor([math.log(P0[0][a]) + math.log(P0[1][b]) for a, b in ids.tolist()], dtype=torch.float64)
    bound = gen.log_likelihood_bound(ids, num_draws=4000, seed=0)
    assert torch.allclose(bound, exact, rtol=0.05), (bound, exact)


def test_sequences_longer_than_the_transformers_table_get_a_clear_error():
    """Without the check, indexing the position table fails deep inside the backbone with an IndexError."""
    gen = small_generator("transformer", length=12)
    with pytest.raises(ValueError, match="longer than this model's maximum of 12 tokens"):
        gen.sample([""], MaskedSamplingOptions(num_inference_steps=2, length=13))
    with pytest.raises(ValueError, match="longer than this model's maximum"):
        gen.log_likelihood_bound(torch.zeros(1, 20, dtype=torch.long))
    assert gen.sample([""], MaskedSamplingOptions(num_inference_steps=2, length=12)).outputs.shape == (1, 12)
