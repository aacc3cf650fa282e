"""Best-of-N and SMC-style resampling on the masked generator: weights, resampling, and SMC's target on a toy
whose tilted distribution is known in closed form."""

import itertools

import pytest
import torch

from genalign.generators.masked import MaskedDiffusionConfig, MaskedDiffusionGenerator, MaskedSamplingOptions
from genalign.guided_sampling import (
    GuidedSamplingError,
    best_of_n,
    effective_sample_size,
    multinomial_resample,
    smc,
)

# Two independent positions over "abc" with fixed p_θ (the model ignores its input), so the pretrained
# distribution is p(x) = P0[0][x_0]·P0[1][x_1] and SMC's target p·exp(r/λ) is known exactly.
P0 = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]], dtype=torch.float64)
GAIN = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)  # r(x) = GAIN[x_0] + GAIN[x_1]


class FixedLogits(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.cat([P0.log(), torch.zeros(2, 1, dtype=torch.float64)], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table.expand(x.shape[0], -1, -1)


def toy() -> MaskedDiffusionGenerator:
    return MaskedDiffusionGenerator(FixedLogits(), MaskedDiffusionConfig(alphabet="abc", length=2))


def additive_reward(ids: torch.Tensor) -> torch.Tensor:
    return GAIN[ids.cpu()].sum(-1)


def test_effective_sample_size_and_resampling_follow_the_weights():
    log_w = torch.log(torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64))
    assert torch.allclose(effective_sample_size(log_w), torch.tensor([1 / 0.375, 4.0], dtype=torch.float64))
    one_hot = torch.log(torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64))
    assert multinomial_resample(one_hot).tolist() == [[2, 2, 2, 2]]
    counts = torch.bincount(multinomial_resample(torch.log(torch.tensor([[0.7, 0.3]] * 4000))).flatten(), minlength=2)
    assert abs(counts[0].item() / 8000 - 0.7) < 0.03


def test_smc_targets_the_reward_tilted_pretrained_distribution():
    """Exact answer: p(x)·exp(r(x)/λ)/Z factorises per position. A sampler that forgot the weights would give
    p's marginals (P0), one that did not telescope the potentials (adding r(x̂_0) each step) would over-tilt."""
    lam, T = 1.0, 4
    result = smc(toy(), [""], MaskedSamplingOptions(num_inference_steps=T), additive_reward,
                 num_particles=4000, lam=lam, ess_threshold=0.5, seed=3)
    # The sampler's own marginals: a position still masked at the last step (probability m_{1/T}/m_1 = 1/T)
    # takes p_θ's argmax; otherwise it was drawn from p_θ.
    pretrained = (1 - 1 / T) * P0 + (1 / T) * torch.nn.functional.one_hot(P0.argmax(-1), 3)
    target = pretrained * torch.exp(GAIN / lam)
    target = target / target.sum(-1, keepdim=True)
    ids = result.rollout.outputs
    for position in range(2):
        frequencies = torch.bincount(ids[:, position], minlength=3).double() / len(ids)
        assert torch.allclose(frequencies, target[position], atol=0.04), (position, frequencies, target[position])
    assert result.resample_steps, "a reward this informative must trigger resampling"
    assert result.reward_calls == 4000 * 5
    assert torch.equal(result.rewards, additive_reward(ids))


def test_smc_with_a_constant_reward_never_resamples_and_keeps_the_pretrained_draws():
    generator, options = toy(), MaskedSamplingOptions(num_inference_steps=3)
    result = smc(generator, ["x", "y"], options, lambda ids: torch.zeros(len(ids)), num_particles=8, seed=1)
    assert result.resample_steps == []
    plain = generator.sample(["x"] * 8 + ["y"] * 8, options, seeds=range(16), return_trajectory=False).outputs
    # The final resampling picks particles of the same condition only, among that condition's own draws.
    for group in range(2):
        drawn = {tuple(row) for row in plain[group * 8 : group * 8 + 8].tolist()}
        assert {tuple(row) for row in result.rollout.outputs[group * 8 : group * 8 + 8].tolist()} <= drawn
    assert result.rollout.texts == ["x"] * 8 + ["y"] * 8


def test_best_of_n_keeps_the_highest_scoring_of_each_conditions_draws():
    generator, options = toy(), MaskedSamplingOptions(num_inference_steps=3)
    result = best_of_n(generator, ["x", "y", "z"], options, additive_reward, n=5, seeds=range(15))
    plain = generator.sample([t for t in "xyz" for _ in range(5)], options, seeds=range(15)).outputs
    scores = additive_reward(plain).view(3, 5)
    assert torch.equal(result.rewards, scores.max(-1).values)
    for group in range(3):
        assert additive_reward(result.rollout.outputs[group : group + 1]).item() == scores[group].max().item()
    assert result.reward_calls == 15 and result.rollout.texts == ["x", "y", "z"]


@pytest.mark.parametrize("reward, message", [
    (lambda sequences: [s.count("a") for s in sequences], "accepts token ids"),
    (lambda ids: torch.zeros(len(ids), 2), "one score per sequence"),
    (lambda ids: torch.full((len(ids),), float("nan")), "NaN"),
])
def test_a_reward_that_does_not_score_token_sequences_gets_one_clear_error(reward, message):
    with pytest.raises(GuidedSamplingError, match=message):
        best_of_n(toy(), [""], MaskedSamplingOptions(num_inference_steps=2), reward, n=2)


def test_every_pair_of_toy_sequences_is_reachable():
    """Guards the toy itself: the fixed model puts mass on all 9 sequences, so the tilt test is not vacuous."""
    ids = toy().sample([""] * 400, MaskedSamplingOptions(num_inference_steps=3), seeds=range(400)).outputs
    assert {tuple(row) for row in ids.tolist()} == set(itertools.product(range(3), repeat=2))
