"""Trainer features: EMA, gradient checkpointing, mixed precision, loggers, atomic checkpoints."""

import json

import pytest
import torch

from genalign.config import ConfigError
from genalign.trainer import EMA, CheckpointError, Trainer, TrainerConfig, list_checkpoints
from tests.test_ddpo import CountingReward, tiny_config
from pipelines.ddpo import DDPOPipeline


def test_ema_follows_the_formula_and_swaps_back():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA({"w": p}, decay=0.9)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 4.0]))
    ema.update()
    assert torch.allclose(ema.shadow["w"], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 4]))
    with ema.swapped_in():
        assert torch.allclose(p, ema.shadow["w"])
    assert torch.allclose(p, torch.tensor([3.0, 4.0]))


def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd_dir, tmp_path):
    from genalign.generators.diffusion import DiffusionGenerator, SamplingOptions

    grads = {}
    for checkpointing in (False, True):
        gen = DiffusionGenerator.from_pretrained(tiny_sd_dir)
        trainer = Trainer(gen, TrainerConfig(output_dir=str(tmp_path / str(checkpointing)), progress=False,
                                             gradient_checkpointing=checkpointing))
        traj = gen.sample(["a red circle", "two green stars"], SamplingOptions(num_inference_steps=3), seeds=[1, 2]).trajectory
        gen.step_log_prob(traj, torch.tensor([0, 1])).sum().backward()
        grads[checkpointing] = [p.grad.clone() for p in trainer.parameters]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads[False], grads[True]))
    assert any(g.abs().sum() > 0 for g in grads[True])


def test_bf16_training_with_ema_and_tensorboard(tiny_sd_dir, tmp_path):
    config = tiny_config(
        tiny_sd_dir, tmp_path / "run", epochs=2,
        **{"trainer.mixed_precision": "bf16", "trainer.ema": True, "trainer.ema_decay": 0.5,
           "trainer.log_with": "[jsonl, tensorboard]", "sampling.log_prob_reduction": "mean"},
    )
    DDPOPipeline(config, reward=CountingReward()).train()
    log = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [-1, 0, 1]
    # Sampling and re-evaluation run under the same autocast, so the first ratio is still 1.
    assert all(r["ratio_first_max_deviation"] < 1e-5 for r in log[1:])
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    last = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert (last / "ema.safetensors").exists()


def test_interrupted_save_leaves_only_complete_checkpoints(tiny_sd_dir, tmp_path, monkeypatch):
    config = tiny_config(tiny_sd_dir, tmp_path / "run", epochs=2)
    calls = {"n": 0}
    original = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("disk full (simulated)")
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        DDPOPipeline(config, reward=CountingReward()).train()
    # The first checkpoint is complete; the failed one exists only as an ignored temp folder.
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_000000"]
    monkeypatch.setattr(torch, "save", original)
    resumed = tiny_config(tiny_sd_dir, tmp_path / "run", epochs=2, **{"trainer.resume": "latest"})
    DDPOPipeline(resumed, reward=CountingReward()).train()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_000000", "step_000001"]


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_file(run_dir, step, name):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / name))


def _stop_and_resume(tiny_sd_dir, tmp_path, epochs, stop_call, **overrides):
    """A straight run and one stopped by the reward at `stop_call` then resumed; returns their folders."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    DDPOPipeline(tiny_config(tiny_sd_dir, straight, epochs=epochs, **overrides), reward=CountingReward()).train()
    with pytest.raises(KeyboardInterrupt):
        DDPOPipeline(tiny_config(tiny_sd_dir, resumed, epochs=epochs, **overrides),
                     reward=CountingReward(fail_on_call=stop_call)).train()
    DDPOPipeline(tiny_config(tiny_sd_dir, resumed, epochs=epochs, **overrides, **{"trainer.resume": "latest"}),
                 reward=CountingReward()).train()
    return straight, resumed


def test_fp16_resume_equals_uninterrupted_run(tiny_sd_dir, tmp_path):
    """fp16 with loss scaling: the first updates overflow at this initial scale (the GradScaler halves it and
    skips them), so a resumed run equals the straight one only if the scaler's state was checkpointed."""
    overrides = {"trainer.mixed_precision": "fp16", "trainer.fp16_initial_loss_scale": 3e6,
                 "trainer.keep_checkpoints": 0, "trainer.lr_schedule": "cosine"}
    straight, resumed = _stop_and_resume(tiny_sd_dir, tmp_path, epochs=3, stop_call=4, **overrides)
    log = _log(straight)
    assert log[-1]["skipped_updates"] == 1 and log[-1]["updates"] == 2  # an overflow, and training around it
    a, b = _checkpoint_file(straight, 2, "trainable.safetensors"), _checkpoint_file(resumed, 2, "trainable.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [(r["updates"], r["skipped_updates"], r["lr"]) for r in _log(resumed)[1:]] == \
        [(r["updates"], r["skipped_updates"], r["lr"]) for r in log[1:]]


def test_ema_resume_equals_uninterrupted_run_and_a_missing_ema_is_refused(tiny_sd_dir, tmp_path):
    overrides = {"trainer.ema": True, "trainer.ema_decay": 0.5, "trainer.keep_checkpoints": 0}
    straight, resumed = _stop_and_resume(tiny_sd_dir, tmp_path, epochs=4, stop_call=4, **overrides)
    a, b = _checkpoint_file(straight, 3, "ema.safetensors"), _checkpoint_file(resumed, 3, "ema.safetensors")
    raw = _checkpoint_file(straight, 3, "trainable.safetensors")
    assert a.keys() == raw.keys()
    assert any(not torch.equal(a[k], raw[k]) for k in a)  # the average lags the weights
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # A checkpoint without EMA state: resuming with EMA on would silently restart the average.
    (resumed / "checkpoints" / "step_000003" / "ema.safetensors").unlink()
    again = tiny_config(tiny_sd_dir, resumed, epochs=4, **overrides, **{"trainer.resume": "latest"})
    with pytest.raises(CheckpointError, match="no EMA state"):
        DDPOPipeline(again, reward=CountingReward()).train()


def test_resume_refuses_a_changed_config_and_a_fresh_run_refuses_a_used_folder(tiny_sd_dir, tmp_path):
    run = tmp_path / "run"
    DDPOPipeline(tiny_config(tiny_sd_dir, run, epochs=1), reward=CountingReward()).train()
    saved = (run / "config.yaml").read_text()
    changed = tiny_config(tiny_sd_dir, run, epochs=2, **{"trainer.resume": "latest", "trainer.learning_rate": 5e-4})
    with pytest.raises(ConfigError, match=r"trainer.learning_rate: 0.001 → 0.0005.*allow_config_change"):
        DDPOPipeline(changed, reward=CountingReward()).train()
    assert (run / "config.yaml").read_text() == saved  # refused before anything was written
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        DDPOPipeline(tiny_config(tiny_sd_dir, run, epochs=2), reward=CountingReward()).train()
    allowed = tiny_config(tiny_sd_dir, run, epochs=2, **{"trainer.resume": "latest", "trainer.learning_rate": 5e-4,
                                                         "trainer.allow_config_change": True})
    DDPOPipeline(allowed, reward=CountingReward()).train()
    assert "trainer.learning_rate: 0.001 → 0.0005" in (run / "warnings.log").read_text()
    assert [r["step"] for r in _log(run)] == [-1, 0, 1]


def test_resume_latest_without_a_checkpoint_says_it_starts_afresh(tiny_sd_dir, tmp_path):
    config = tiny_config(tiny_sd_dir, tmp_path / "run", epochs=1, **{"trainer.resume": "latest"})
    with pytest.warns(RuntimeWarning, match="holds no checkpoint yet; starting from scratch"):
        DDPOPipeline(config, reward=CountingReward()).train()


def test_replacing_a_checkpoint_keeps_a_complete_one_at_every_instant(tiny_sd_dir, tmp_path, monkeypatch):
    """Saving a step that already exists (a re-run epoch): a crash between the renames must not lose it."""
    import os

    from genalign.trainer import resolve_checkpoint

    from dataclasses import replace

    from genalign.generators.diffusion import DiffusionGenerator

    run = tmp_path / "run"
    config = tiny_config(tiny_sd_dir, run, epochs=1)
    DDPOPipeline(config, reward=CountingReward()).train()
    trainer = Trainer(DiffusionGenerator.from_pretrained(tiny_sd_dir), replace(config.trainer, resume="latest"))
    original = os.replace

    def crash_on_new_checkpoint(src, dst, *args, **kwargs):
        if str(src).endswith(".tmp_step_000000"):
            raise OSError("power cut (simulated)")
        return original(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", crash_on_new_checkpoint)
    with pytest.raises(OSError, match="power cut"):
        trainer.save_checkpoint(0, {})
    found = resolve_checkpoint("latest", run)
    assert found is not None and (found / "trainer_state.json").exists() and (found / "trainable.safetensors").exists()
    monkeypatch.setattr(os, "replace", original)
    assert trainer.save_checkpoint(0, {"again": 1}).name == "step_000000"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_000000"]
    assert json.loads((run / "checkpoints" / "step_000000" / "trainer_state.json").read_text())["pipeline_state"] == {"again": 1}


class _ToyGenerator:
    """The smallest thing a Trainer can train: one linear module (the protocol's training half)."""

    def __init__(self):
        torch.manual_seed(0)
        self.denoiser = torch.nn.Linear(3, 1)
        self.forward_module = self.denoiser

    def to(self, device=None, dtype=None):
        self.denoiser.to(device)
        return self

    def trainable_modules(self):
        return {"net": self.denoiser}

    def set_training_modules(self, modules):
        self.forward_module = modules["net"]


def test_non_finite_gradients_skip_the_update_and_stop_the_run_after_a_limit(tmp_path):
    from genalign.trainer import LoRAConfig

    gen = _ToyGenerator()
    trainer = Trainer(gen, TrainerConfig(output_dir=str(tmp_path), progress=False, lora=LoRAConfig(enabled=False),
                                         lr_schedule="linear", max_skipped_updates=3), total_updates=10)
    x = torch.ones(2, 3)

    def update(scale: float) -> bool:
        with trainer.accumulate():
            trainer.backward(gen.denoiser(x).sum() * scale)
            return trainer.optimizer_step()

    assert update(1.0)
    weights, lr = gen.denoiser.weight.detach().clone(), trainer.learning_rate
    assert not update(float("nan"))
    assert torch.equal(gen.denoiser.weight, weights) and trainer.learning_rate == lr  # nothing moved
    assert trainer.updates == 1 and trainer.skipped_updates == 1
    assert "gradient norm is nan; update skipped" in (tmp_path / "warnings.log").read_text()
    assert update(1.0) and trainer.updates == 2  # a finite update after a skipped one is applied
    assert not update(float("inf")) and not update(float("nan"))
    with pytest.raises(FloatingPointError, match="3 updates in a row had a non-finite gradient norm"):
        update(float("nan"))


def test_gradient_checkpointing_recomputes_the_blocks_in_backward(tiny_sd_dir, tmp_path):
    from genalign.generators.diffusion import DiffusionGenerator, SamplingOptions

    forward_calls = {}
    for checkpointing in (False, True):
        gen = DiffusionGenerator.from_pretrained(tiny_sd_dir)
        Trainer(gen, TrainerConfig(output_dir=str(tmp_path / str(checkpointing)), progress=False,
                                   gradient_checkpointing=checkpointing))
        traj = gen.sample(["a red circle"], SamplingOptions(num_inference_steps=2), seeds=[1]).trajectory
        block = gen.denoiser.down_blocks[1].attentions[0].transformer_blocks[0]  # holds LoRA layers
        calls = []
        block.register_forward_pre_hook(lambda *_: calls.append(1))
        gen.step_log_prob(traj, torch.tensor([0])).sum().backward()
        forward_calls[checkpointing] = len(calls)
    assert forward_calls == {False: 1, True: 2}  # the checkpointed block runs again during backward
