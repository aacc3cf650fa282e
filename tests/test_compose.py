"""Reward composition and transforms."""

import pytest
import torch

from rewards import Reward, RewardError, build_reward
from rewards.compose import Clipped, LogSigmoidTransformed, PerPromptNormalized, Stack, WeightedSum


class Mean(Reward):
    name = "mean_pixel"
    modality = "image"
    kind = "instance"
    differentiable = True

    def score(self, images, conditions=None):
        return images.mean(dim=(1, 2, 3))


class Red(Mean):
    name = "red"

    def score(self, images, conditions=None):
        return images[:, 0].mean(dim=(1, 2))


IMAGES = torch.rand(4, 3, 8, 8)
PROMPTS = ["a", "a", "b", "b"]


def test_weighted_sum_and_stack():
    mean, red = Mean()(IMAGES).rewards, Red()(IMAGES).rewards
    total = WeightedSum([Mean(), Red()])
    total.weights = [2.0, -1.0]
    out = total(IMAGES)
    assert torch.allclose(out.rewards, 2 * mean - red)
    assert set(out.metadata["components"]) == {"mean_pixel", "red"}
    stacked = Stack([Mean(), Red()])(IMAGES)
    assert stacked.rewards.shape == (4, 2)
    assert torch.allclose(stacked.rewards[:, 1], red)


def test_built_from_yaml_style_mappings():
    reward = build_reward(
        "weighted_sum",
        components=[{"name": "colorfulness", "weight": 0.5}, {"name": "jpeg_incompressibility", "weight": 1.0}],
    )
    assert not reward.differentiable  # JPEG is not
    expected = 0.5 * build_reward("colorfulness")(IMAGES).rewards + build_reward("jpeg_incompressibility")(IMAGES).rewards
    assert torch.allclose(reward(IMAGES).rewards, expected)
    with pytest.raises(RewardError, match="'name'"):
        build_reward("stack", components=[{"weight": 1.0}])


def test_a_label_names_a_component_so_one_reward_can_be_stacked_twice():
    """Two motif counts in one stack (Parrot's Markov config): without labels the names collide and the stack
    is refused with the fix; with labels each column is its own motif and is named after its label."""
    ids = torch.tensor([[0, 3, 0, 3, 0, 1, 1, 1], [1, 1, 1, 1, 2, 2, 2, 2]])  # ATATACCC, CCCCGGGG
    components = [{"name": "motif_count", "kwargs": {"motif": "ATA"}}, {"name": "motif_count", "kwargs": {"motif": "CCC"}}]
    with pytest.raises(RewardError, match="distinct names.*'label'"):
        build_reward("stack", components=components)
    labelled = [{**c, "label": c["kwargs"]["motif"]} for c in components]
    stacked = build_reward("stack", components=labelled)
    assert stacked.objectives == ("ATA", "CCC")
    assert stacked(ids).rewards.tolist() == [[2.0, 1.0], [0.0, 2.0]]
    summed = build_reward("weighted_sum", components=labelled)
    assert {k: v.tolist() for k, v in summed(ids).metadata["components"].items()} == {"ATA": [2.0, 0.0],
                                                                                      "CCC": [1.0, 2.0]}
    with pytest.raises(RewardError, match="distinct labels"):
        build_reward("weighted_sum", components=components)


def test_per_prompt_normalization_and_clipping():
    values = Mean()(IMAGES).rewards
    out = PerPromptNormalized(Mean())(IMAGES, PROMPTS).rewards
    for group in ([0, 1], [2, 3]):
        g = values[group]
        assert torch.allclose(out[group], (g - g.mean()) / (g.std(unbiased=False) + 1e-6), atol=1e-5)
    with pytest.raises(RewardError, match="needs the prompts"):
        PerPromptNormalized(Mean())(IMAGES)
    clipped = Clipped(Mean(), low=0.45, high=0.55)(IMAGES).rewards
    assert torch.allclose(clipped, values.clamp(0.45, 0.55))


def test_log_sigmoid_transform_saturates_above_reference():
    values = Mean()(IMAGES).rewards
    ref = {"a": 0.5, "b": 0.4}
    out = LogSigmoidTransformed(Mean(), reference=ref)(IMAGES, PROMPTS).rewards
    expected = torch.nn.functional.logsigmoid(values - torch.tensor([0.5, 0.5, 0.4, 0.4]))
    assert torch.allclose(out, expected)
    assert (out < 0).all()
    # Gradients flow, and are largest below the reference (saturation above it).
    images = IMAGES.clone().requires_grad_(True)
    LogSigmoidTransformed(Mean(), reference=0.0)(images).rewards.sum().backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(RewardError, match="no reference"):
        LogSigmoidTransformed(Mean(), reference={"a": 0.0})(IMAGES, PROMPTS)


def test_mixed_modalities_are_refused():
    class Text(Reward):
        name = "text_len"
        modality = "text"

        def score(self, texts, conditions=None):
            return torch.tensor([float(len(t)) for t in texts])

    with pytest.raises(RewardError, match="different modalities"):
        WeightedSum([Mean(), Text()])
