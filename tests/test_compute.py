"""The trainer's speed options — channels-last, torch.compile, TF32, bitsandbytes' 8-bit AdamW — and reward
placement (a reward's own device, bounded reward batches): each computes what the plain path computes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from genalign.config import ConfigError
from genalign.engine import RewardConfig, build_reward
from pipelines.ddpo import DDPOPipeline
from rewards import Reward, RewardError
from rewards.placement import Placed
from tests.test_ddpo import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(run, epoch: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{epoch:06d}" / "trainable.safetensors"))


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and a
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert gap <= atol, gap


def test_channels_last_and_compile_train_like_the_plain_path(tiny_sd_dir, tmp_path):
    """DDPO on the tiny SD model with the UNet in channels-last memory format and its forward compiled (torch.compile
    with the aot_eager backend: dynamo's trace and AOT autograd, without generating kernels, which would take
    minutes on this CPU) ends with the weights of the plain run. Fails if a compiled module's parameters are not
    the trained ones (a copy, or `_orig_mod.`-prefixed checkpoint keys), if sampling bypasses the compiled forward,
    if channels-last is not applied, or if either changes what is computed beyond kernel round-off."""
    # float64: Adam's per-coordinate normalisation would amplify float32 kernel round-off to ~1e-4.
    plain = DDPOPipeline(tiny_config(tiny_sd_dir, tmp_path / "plain", epochs=2, **{"model.dtype": "float64"}))
    plain.train()
    fast = DDPOPipeline(tiny_config(tiny_sd_dir, tmp_path / "fast", epochs=2, **{
        "model.dtype": "float64", "trainer.channels_last": True, "trainer.compile": True,
        "trainer.compile_backend": "aot_eager"}))
    fast.train()
    forward = fast.generator._denoiser_forward()
    assert isinstance(forward, torch._dynamo.eval_frame.OptimizedModule)
    convolutions = [p for p in fast.generator.denoiser.parameters() if p.ndim == 4]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    a, b = trained(tmp_path / "plain", 1), trained(tmp_path / "fast", 1)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 0  # training moved the adapters
    assert_close_weights(a, b, atol=1e-9)


def test_tf32_setting_reaches_torch(tiny_sd_dir, tmp_path):
    """trainer.tf32 sets torch's TF32 switches for matmuls and cuDNN (they act on CUDA only). Fails if the option
    is ignored or sticks after a run that turned it off."""
    from genalign.trainer import Trainer

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for enabled in (True, False):
            config = tiny_config(tiny_sd_dir, tmp_path / str(enabled), **{"trainer.tf32": enabled})
            Trainer(DDPOPipeline(config).generator, config.trainer)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (enabled, enabled)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_8bit_adamw_trains_and_resumes_exactly(tiny_sd_dir, tmp_path):
    """trainer.optimizer=adamw_8bit under full fine-tuning: bitsandbytes' AdamW8bit keeps quantised (uint8) moments
    for the UNet's large tensors, moves the weights, and a run stopped after its first epoch and resumed ends with
    the weights of an uninterrupted one. Fails if the option silently falls back to AdamW, or if the 8-bit state
    (codes, block maxima) is lost or changed by the checkpoint."""
    pytest.importorskip("bitsandbytes")
    settings = {"epochs": 2, "trainer.optimizer": "adamw_8bit", "trainer.lora.enabled": False,
                "trainer.learning_rate": 1e-4, "trainer.keep_checkpoints": 0}
    straight = DDPOPipeline(tiny_config(tiny_sd_dir, tmp_path / "straight", **settings))
    straight.train()
    DDPOPipeline(tiny_config(tiny_sd_dir, tmp_path / "resumed", **{**settings, "epochs": 1})).train()
    resumed = DDPOPipeline(tiny_config(tiny_sd_dir, tmp_path / "resumed", **{
        **settings, "trainer.resume": "latest", "trainer.allow_config_change": True}))
    resumed.train()

    def tensors(state):  # bitsandbytes nests its quantisation state in a dict of its own
        for value in state.values():
            yield from tensors(value) if isinstance(value, dict) else [value] if torch.is_tensor(value) else []

    for run in ("straight", "resumed"):
        optimizer = torch.load(tmp_path / run / "checkpoints" / "step_000001" / "optimizer.pt", weights_only=True)
        assert any(value.dtype == torch.uint8 for value in tensors(optimizer["state"])), run
    base = DDPOPipeline(tiny_config(tiny_sd_dir, tmp_path / "unused")).generator.denoiser.state_dict()
    a, b = trained(tmp_path / "straight", 1), trained(tmp_path / "resumed", 1)
    assert max(float((a[k] - base[k.removeprefix("denoiser.")]).abs().max()) for k in a) > 0
    assert_close_weights(a, b, atol=0)


def test_8bit_adamw_without_bitsandbytes_is_a_clear_error(monkeypatch):
    """Fails if a missing bitsandbytes surfaces as an ImportError deep in the trainer instead of the fix."""
    import importlib.util

    from genalign.compute import build_optimizer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install genalign\\[bnb\\]"):
        build_optimizer("adamw_8bit", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], lr=1e-3,
                        betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


# ------------------------------------------------------------------------------- reward placement


class Brightness(Reward):
    """Differentiable mean brightness that records the size and device of every call."""

    name = "brightness"
    modality = "image"
    differentiable = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, torch.device]] = []

    def score(self, outputs, conditions=None):
        self.calls.append((len(outputs), outputs.device))
        return outputs.mean(dim=(1, 2, 3)) * (1.0 if conditions is None else torch.tensor(
            [len(c) for c in conditions], dtype=outputs.dtype, device=outputs.device))


def test_batched_reward_calls_score_what_one_call_scores():
    """reward.batch_size splits a batch into calls of at most that size, with each call's own conditions, and
    returns the rewards of one call, in order, with their gradient. Fails if a chunk is paired with the wrong
    prompts, if the order or the gradient is lost, or if a call exceeds the bound."""
    images = torch.rand(7, 3, 8, 8, requires_grad=True)
    prompts = [f"prompt {'x' * i}" for i in range(7)]
    whole = Brightness()(images, prompts).rewards
    inner = Brightness()
    placed = Placed(inner, batch_size=3)
    chunked = placed(images, prompts).rewards
    assert [size for size, _ in inner.calls] == [3, 3, 1]
    torch.testing.assert_close(chunked, whole)
    (grad_whole,) = torch.autograd.grad(whole.sum(), images)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), images)
    torch.testing.assert_close(grad_chunked, grad_whole)
    assert placed.name == "brightness" and placed.differentiable and placed.objectives == ("brightness",)


def test_reward_placement_from_a_config_and_its_errors():
    """A config's reward.device / reward.batch_size wrap the reward (scoring on that device, rewards back on the
    outputs'); a set-level reward is refused, since batches would score other sets. Fails if the settings are
    ignored or a distributional reward is silently split."""
    placed = build_reward(RewardConfig(name="colorfulness", device="cpu", batch_size=2))
    assert isinstance(placed, Placed) and placed.target == torch.device("cpu") and placed.batch_size == 2
    images = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(placed(images).rewards, build_reward(RewardConfig(name="colorfulness"))(images).rewards)
    assert not isinstance(build_reward(RewardConfig(name="colorfulness")), Placed)

    class SetReward(Brightness):
        kind = "distribution_to_distribution"

    with pytest.raises(RewardError, match="scores a set"):
        Placed(SetReward(), batch_size=4)
    with pytest.raises(RewardError, match="≥ 1"):
        Placed(Brightness(), batch_size=0)
