"""Behavioural tests for the reward contract (rewards.base) and image rewards."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from rewards import (
    Reward,
    RewardError,
    RewardOutput,
    available_rewards,
    build_reward,
    register_reward,
)
from rewards.base import REWARDS


def _grey(b: int = 2, size: int = 32, level: float = 0.5) -> torch.Tensor:
    return torch.full((b, 3, size, size), level)


def _noise(b: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g)


# ---------------------------------------------------------------- JPEG


def test_jpeg_grey_compresses_better_than_noise() -> None:
    images = torch.cat([_grey(1), _noise(1)])
    inc = build_reward("jpeg_incompressibility")(images).rewards
    comp = build_reward("jpeg_compressibility")(images).rewards
    assert inc.shape == (2,)
    assert inc[0] < inc[1], "flat grey must produce a smaller JPEG than noise"
    assert comp[0] > comp[1], "compressibility must prefer the flat grey image"


def test_jpeg_compressibility_is_negated_incompressibility() -> None:
    images = _noise(3, size=24, seed=1)
    inc = build_reward("jpeg_incompressibility", quality=80)(images).rewards
    comp = build_reward("jpeg_compressibility", quality=80)(images).rewards
    torch.testing.assert_close(comp, -inc)
    assert torch.all(inc > 0)


def test_jpeg_size_matches_independent_pil() -> None:
    image = _noise(1, size=40, seed=2)
    array = (image[0].numpy().transpose(1, 2, 0) * 255).round().clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    expected_kb = len(buffer.getvalue()) / 1000
    got = build_reward("jpeg_incompressibility")(image).rewards
    assert got.item() == pytest.approx(expected_kb, abs=1e-6)


def test_jpeg_quality_changes_size_and_bad_quality_rejected() -> None:
    images = _noise(1, seed=3)
    low = build_reward("jpeg_incompressibility", quality=10)(images).rewards
    high = build_reward("jpeg_incompressibility", quality=95)(images).rewards
    assert low.item() < high.item()
    with pytest.raises(RewardError, match="1..100"):
        build_reward("jpeg_incompressibility", quality=0)


def test_jpeg_runs_without_grad_even_for_grad_inputs() -> None:
    images = _noise(2).requires_grad_(True)
    out = build_reward("jpeg_compressibility")(images)
    assert not out.rewards.requires_grad


# ---------------------------------------------------------- colourfulness


def _numpy_colorfulness(images: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Reference: loop over images, float64, np.var (population by default)."""
    scores = []
    for img in images.astype(np.float64):
        r, g, b = img[0].ravel(), img[1].ravel(), img[2].ravel()
        rg = r - g
        yb = (r + g) / 2 - b
        sigma = np.sqrt(np.var(rg) + np.var(yb) + eps)
        mu = np.sqrt(np.mean(rg) ** 2 + np.mean(yb) ** 2 + eps)
        scores.append(sigma + 0.3 * mu)
    return np.array(scores)


def test_colorfulness_matches_numpy_reference() -> None:
    images = _noise(4, size=16, seed=4)
    got = build_reward("colorfulness")(images).rewards
    expected = _numpy_colorfulness(images.numpy())
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, rtol=0)


def test_colorfulness_grey_near_zero_and_saturated_higher() -> None:
    grey = _grey(1)
    red_green = torch.zeros(1, 3, 32, 32)
    red_green[:, 0, :, :16] = 1.0  # left half pure red
    red_green[:, 1, :, 16:] = 1.0  # right half pure green
    scores = build_reward("colorfulness")(torch.cat([grey, red_green])).rewards
    assert scores[0].item() < 1e-3
    assert scores[1].item() > 0.5
    assert scores[1] > scores[0]


def test_colorfulness_gradcheck() -> None:
    reward = build_reward("colorfulness")
    g = torch.Generator().manual_seed(5)
    x = (0.2 + 0.6 * torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: reward(t).rewards, (x,), eps=1e-6, atol=1e-5)


def test_colorfulness_gradient_ascent_increases_score() -> None:
    reward = build_reward("colorfulness")
    g = torch.Generator().manual_seed(6)
    x = (0.5 + 0.02 * torch.randn(1, 3, 8, 8, generator=g)).clamp(0, 1)
    start = reward(x).rewards.item()
    for _ in range(5):
        x = x.detach().requires_grad_(True)
        reward(x).rewards.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        x = (x + 0.05 * x.grad / (x.grad.norm() + 1e-12)).clamp(0, 1)
    end = reward(x.detach()).rewards.item()
    assert end > start + 1e-3


def test_colorfulness_grey_gradient_is_finite() -> None:
    x = _grey(1, size=4).requires_grad_(True)
    build_reward("colorfulness")(x).rewards.sum().backward()
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("bad", "keywords"),
    [
        (torch.rand(4, 64, 64), ["[B, 3, H, W]", "(4, 64, 64)", "decode latents"]),
        (torch.rand(2, 1, 8, 8), ["(2, 1, 8, 8)", "1 channels", "expand"]),
        (torch.rand(2, 8, 8, 3), ["channels-last", "permute"]),
        (torch.rand(2, 3, 8, 8) * 255, ["[0, 1]", "divide by 255"]),
        (torch.rand(2, 3, 8, 8) * 2 - 1, ["[0, 1]", "(images + 1) / 2"]),
        ((torch.rand(2, 3, 8, 8) * 255).to(torch.uint8), ["torch.uint8", "/ 255"]),
        ([torch.rand(3, 8, 8), torch.rand(3, 8, 8)], ["got a list", "torch.stack"]),
    ],
)
def test_bad_image_inputs_raise_helpful_errors(bad: object, keywords: list[str]) -> None:
    reward = build_reward("jpeg_incompressibility")
    with pytest.raises(RewardError) as info:
        reward(bad)  # type: ignore[arg-type]
    message = str(info.value)
    assert "jpeg_incompressibility" in message
    for word in keywords:
        assert word in message, f"{word!r} missing from: {message}"


def test_small_overshoot_is_tolerated() -> None:
    x = _grey(1).clone()
    x[0, 0, 0, 0] = 1.0005
    x[0, 1, 0, 0] = -0.0005
    assert build_reward("colorfulness")(x).rewards.shape == (1,)


def test_nan_input_rejected() -> None:
    x = _noise(3)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(RewardError, match="NaN/inf pixel values in 1 of 3"):
        build_reward("colorfulness")(x)


def test_conditions_length_must_match_batch() -> None:
    reward = build_reward("colorfulness")
    images = _noise(3)
    assert reward(images, ["a", "b", "c"]).rewards.shape == (3,)
    with pytest.raises(RewardError, match=r"2 conditions for a batch of 3.*one condition"):
        reward(images, ["a", "b"])
    with pytest.raises(RewardError, match="single string"):
        reward(images, "a cat")


class _NaNReward(Reward):
    name = "test_nan"
    differentiable = True

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        scores = outputs.mean(dim=(1, 2, 3)).clone()
        scores[:2] = float("nan")
        return scores


class _TwoObjective(Reward):
    name = "test_two_objective"
    differentiable = True
    objectives = ("brightness", "redness")

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        return torch.stack([outputs.mean(dim=(1, 2, 3)), outputs[:, 0].mean(dim=(1, 2))], dim=1)


class _WrongShape(Reward):
    name = "test_wrong_shape"

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        return outputs.mean(dim=(1, 2, 3))[:, None]


def test_nan_reward_raises_with_count() -> None:
    with pytest.raises(RewardError) as info:
        _NaNReward()(_noise(8, size=4))
    message = str(info.value)
    assert "test_nan" in message and "NaN" in message and "2 of 8" in message


def test_wrong_output_shape_rejected() -> None:
    with pytest.raises(RewardError, match=r"\(2, 1\).*squeeze"):
        _WrongShape()(_noise(2, size=4))


def test_two_objective_output_shape_and_describe() -> None:
    reward = _TwoObjective()
    out = reward(_noise(5, size=4))
    assert isinstance(out, RewardOutput)
    assert out.rewards.shape == (5, 2)
    assert out.num_objectives == 2
    assert reward.describe()["objectives"] == ("brightness", "redness")


def test_single_objective_defaults_and_describe() -> None:
    reward = build_reward("jpeg_compressibility")
    out = reward(_noise(2, size=8))
    assert out.num_objectives == 1 and out.metadata == {}
    assert reward.describe() == {
        "name": "jpeg_compressibility",
        "modality": "image",
        "kind": "instance",
        "differentiable": False,
        "higher_is_better": True,
        "objectives": ("jpeg_compressibility",),
    }


# ---------------------------------------------------------------- registry


def test_registry_lists_image_rewards() -> None:
    assert {"jpeg_compressibility", "jpeg_incompressibility", "colorfulness"} <= set(
        available_rewards()
    )


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(RewardError) as info:
        build_reward("jpeg_incompresibility")
    message = str(info.value)
    assert "did you mean 'jpeg_incompressibility'" in message
    assert "colorfulness" in message  # lists every valid name


def test_bad_kwargs_listed() -> None:
    with pytest.raises(RewardError, match=r"qualty.*quality"):
        build_reward("jpeg_compressibility", qualty=90)


def test_register_reward_roundtrip_and_clash() -> None:
    try:

        @register_reward("test_registered_constant")
        class _Constant(Reward):
            def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
                return torch.ones(outputs.shape[0], device=outputs.device)

        reward = build_reward("test_registered_constant")
        assert reward.name == "test_registered_constant"
        assert reward(_noise(2, size=4)).rewards.tolist() == [1.0, 1.0]

        with pytest.raises(RewardError, match="already registered"):

            @register_reward("test_registered_constant")
            class _Other(Reward):
                pass

    finally:
        REWARDS.pop("test_registered_constant", None)
