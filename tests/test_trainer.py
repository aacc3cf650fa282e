"""Trainer features: EMA, gradient checkpointing, mixed precision, loggers, atomic checkpoints."""

import json

import pytest
import torch

from genalign.trainer import EMA, Trainer, TrainerConfig, list_checkpoints
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
