"""DRaFT learning, LoRA adapters that plain diffusers loads, and the `genalign` command end to end."""

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline

from genalign.cli import load_run_generator, main
from genalign.config import build_config
from genalign.generators.diffusion import SamplingOptions
from pipelines.draft import DRaFTConfig, DRaFTPipeline, truncation_steps

PROMPTS = ["a red circle", "a blue square", "two green stars", "a yellow sun"]


def draft_config(model_dir, out_dir, **overrides) -> DRaFTConfig:
    data = {
        "model": {"pretrained": str(model_dir)},
        "prompts": {"prompts": PROMPTS},
        "sampling": {"num_inference_steps": 5, "guidance_scale": 1.0, "eta": 0.0},
        "trainer": {"output_dir": str(out_dir), "learning_rate": 1e-2, "progress": False, "checkpoint_every": 0},
        "eval": {"every": 100, "samples_per_prompt": 4},
        "epochs": 10,
        "batch_size": 8,
        "train_batch_size": 4,
    }
    return build_config(DRaFTConfig, data, [f"{k}={v}" for k, v in overrides.items()])


def _log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_draft1_raises_differentiable_reward(tiny_sd_dir, tmp_path):
    config = draft_config(tiny_sd_dir, tmp_path / "run")
    DRaFTPipeline(config).train()
    log = _log(tmp_path / "run")
    before, after = log[0]["eval_reward_mean"], log[-1]["eval_reward_mean"]
    spread = log[0]["eval_reward_std"]
    # Held-out prompts and seeds: colourfulness rises by several sample standard deviations.
    assert after - before > 3 * spread, (before, after, spread)
    train = [r["reward_mean"] for r in log[1:]]
    assert np.mean(train[-3:]) > np.mean(train[:3])


def test_alignprop_random_truncation_draws_k_in_range(tiny_sd_dir, tmp_path):
    config = draft_config(tiny_sd_dir, tmp_path, grad_steps=4, random_truncation=True, min_grad_steps=2)
    ks = {truncation_steps(config, 0, epoch) for epoch in range(50)}
    assert ks == {2, 3, 4}


def test_draft_refuses_non_differentiable_reward(tiny_sd_dir, tmp_path):
    from genalign.config import ConfigError

    with pytest.raises(ConfigError, match="not differentiable"):
        DRaFTPipeline(draft_config(tiny_sd_dir, tmp_path, **{"reward.name": "jpeg_incompressibility"}))


def test_lora_adapter_loads_into_plain_diffusers(tiny_sd_dir, tmp_path):
    pipeline = DRaFTPipeline(draft_config(tiny_sd_dir, tmp_path / "run", epochs=2))
    pipeline.train()
    ours, config = load_run_generator(tmp_path / "run")
    options = SamplingOptions(num_inference_steps=5, guidance_scale=1.0, eta=0.0)
    seeds = [1, 2]
    trained = ours.sample(PROMPTS[:2], options, seeds=seeds, return_trajectory=False).outputs

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    base = pipe(PROMPTS[:2], num_inference_steps=5, guidance_scale=1.0, output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    lora_dir = next((tmp_path / "run" / "checkpoints").iterdir()) / "lora"
    pipe.load_lora_weights(str(lora_dir))
    adapted = pipe(PROMPTS[:2], num_inference_steps=5, guidance_scale=1.0, output_type="pt",
                   generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert (base - trained).abs().max() > 1e-3  # training changed the model
    assert torch.allclose(pipeline.sample(PROMPTS[:2], seeds=seeds).outputs, trained, atol=1e-5)
    assert torch.allclose(adapted, trained, atol=1e-5)


def _write_config(tmp_path, model_dir, **extra):
    config = {
        "pipeline": "ddpo",
        "model": {"pretrained": str(model_dir)},
        "prompts": {"prompts": PROMPTS},
        "sampling": {"num_inference_steps": 3, "guidance_scale": 2.0},
        "trainer": {"output_dir": str(tmp_path / "run"), "progress": False},
        "eval": {"every": 100, "samples_per_prompt": 1},
        "epochs": 2,
        "prompts_per_epoch": 2,
        "samples_per_prompt": 2,
        "train_batch_size": 4,
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_cli_finetune_sample_gallery(tiny_sd_dir, tmp_path, prompt_file, capsys):
    config = _write_config(tmp_path, tiny_sd_dir)
    assert main(["finetune", "--config", str(config), "trainer.learning_rate=1e-3"]) == 0
    assert main(["sample", "--run", str(tmp_path / "run"), "--prompts", str(prompt_file), "--n", "2",
                 "--out", str(tmp_path / "samples")]) == 0
    records = [json.loads(l) for l in (tmp_path / "samples" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all((tmp_path / "samples" / r["file"]).exists() for r in records)
    assert main(["gallery", "--run", str(tmp_path / "run"), "--n", "2"]) == 0
    index = tmp_path / "run" / "gallery" / "index.html"
    parser = _Images()
    parser.feed(index.read_text())
    assert len(parser.srcs) == 1 + 2 * 2 * len(PROMPTS)  # curves + before/after grids
    assert all((index.parent / src).exists() for src in parser.srcs)
    assert "mean reward after" in index.read_text()


def test_cli_errors_are_one_line(tiny_sd_dir, tmp_path, capsys):
    config = _write_config(tmp_path, tiny_sd_dir)
    assert main(["finetune", "--config", str(config), "trainer.learnig_rate=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'trainer.learning_rate'" in err and "Traceback" not in err

    missing = _write_config(tmp_path, tmp_path / "no-such-model")
    assert main(["finetune", "--config", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with_empty = _write_config(tmp_path, tiny_sd_dir, prompts={"file": str(empty)})
    assert main(["finetune", "--config", str(with_empty)]) == 2
    assert "has no prompts" in capsys.readouterr().err

    assert main(["finetune", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("variant", [
    {"grad_steps": 3},                                                # DRaFT-K with K > 1
    {"grad_steps": 3, "random_truncation": True, "min_grad_steps": 1},  # AlignProp
    {"lv_rounds": 2},                                                 # DRaFT-LV
], ids=["draft-3", "alignprop", "draft-lv"])
def test_draft_variants_raise_the_reward(tiny_sd_dir, tmp_path, variant):
    config = draft_config(tiny_sd_dir, tmp_path / "run", epochs=6, **variant)
    DRaFTPipeline(config).train()
    log = _log(tmp_path / "run")
    before, after, spread = log[0]["eval_reward_mean"], log[-1]["eval_reward_mean"], log[0]["eval_reward_std"]
    assert after - before > 2 * spread, (before, after, spread)
    ks = [r["grad_steps"] for r in log[1:]]
    if variant.get("random_truncation"):
        assert len(set(ks)) > 1 and set(ks) <= {1, 2, 3}  # K was redrawn between epochs
    else:
        assert set(ks) == {variant.get("grad_steps", 1)}


def test_draft_two_processes_end_with_the_same_weights_as_one(tiny_sd_dir, tmp_path, torchrun, accelerate_launch):
    """1 process, 2 DDP processes, 2 FSDP processes and 2 DeepSpeed ZeRO-2 processes (the shipped configs) of the
    same global batch end alike (ZeRO keeps float32 master weights: its bound is float32's). Fails if a sample's
    noise or truncation K depends on the process, if the reward gradient is averaged per process, under FSDP if
    the differentiable sampler's sharded forwards do not match across processes, under DeepSpeed if the engine
    steps or clips other than once per update."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    worker = root / "tests" / "helpers" / "pipeline_worker.py"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    overrides = ["model.dtype=float64", "epochs=3", "batch_size=4", "grad_steps=2", "random_truncation=true",
                 "reward.name=colorfulness", "sampling.eta=0.0", "trainer.lr_schedule=cosine", "trainer.learning_rate=1e-2"]
    subprocess.run([sys.executable, str(worker), "draft", str(tiny_sd_dir), str(tmp_path / "one"), "train_batch_size=2",
                    *overrides], check=True, env=env, capture_output=True, timeout=600)
    torchrun([worker, "draft", tiny_sd_dir, tmp_path / "two", "train_batch_size=1", *overrides], env=env)
    accelerate_launch([worker, "draft", tiny_sd_dir, tmp_path / "sharded", "train_batch_size=1", *overrides], env=env)
    accelerate_launch([worker, "draft", tiny_sd_dir, tmp_path / "zero2", "train_batch_size=1", *overrides], env=env,
                      config="deepspeed_zero2")
    weights = [load_file(str(tmp_path / run / "checkpoints" / "step_000002" / "trainable.safetensors"))
               for run in ("one", "two", "sharded", "zero2")]
    assert max(float(v.abs().max()) for k, v in weights[0].items() if "lora_B" in k) > 0  # training moved B
    for other in weights[1:]:
        for key in weights[0]:
            assert torch.allclose(weights[0][key], other[key], atol=1e-6), key
    for run in ("two", "sharded", "zero2"):
        for a, b in zip(_log(tmp_path / "one"), _log(tmp_path / run)):
            for key in ("reward_mean", "grad_steps", "lr", "eval_reward_mean"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], abs=1e-6), (run, key)


def test_sample_gallery_and_exported_lora_use_the_ema_weights_when_ema_is_on(tiny_sd_dir, tmp_path, prompt_file):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    DRaFTPipeline(draft_config(tiny_sd_dir, run, epochs=3, **{"trainer.ema": True, "trainer.ema_decay": 0.5})).train()
    checkpoint = next((run / "checkpoints").iterdir())
    ema, raw = load_file(str(checkpoint / "ema.safetensors")), load_file(str(checkpoint / "trainable.safetensors"))
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    for use_ema, expected in ((True, ema), (False, raw)):
        generator, _ = load_run_generator(run, use_ema=use_ema)
        params = {f"denoiser.{k}": v for k, v in generator.denoiser.named_parameters()}
        assert all(torch.equal(params[k].detach(), expected[k]) for k in expected)

    options = SamplingOptions(num_inference_steps=5, guidance_scale=1.0, eta=0.0)
    with_ema = load_run_generator(run)[0].sample(PROMPTS, options, seeds=[0, 1, 2, 3], return_trajectory=False).outputs
    for flags, expected_ema in (([], True), (["--raw-weights"], False)):
        out = tmp_path / f"samples{len(flags)}"
        assert main(["sample", "--run", str(run), "--prompts", str(prompt_file), "--n", "1", "--out", str(out), *flags]) == 0
        from PIL import Image
        import numpy as np

        first = torch.from_numpy(np.asarray(Image.open(out / "00000.png"))).permute(2, 0, 1).float() / 255
        reference = (with_ema[0] * 255).round() / 255
        assert (first - reference).abs().max() < 1.5 / 255 if expected_ema else (first - reference).abs().max() > 2 / 255
    # The exported adapters: lora/ holds the EMA weights, lora_raw/ the trained ones.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.load_lora_weights(str(checkpoint / "lora"))
    adapted = pipe(PROMPTS, num_inference_steps=5, guidance_scale=1.0, output_type="pt",
                   generator=[torch.Generator().manual_seed(s) for s in [0, 1, 2, 3]]).images
    assert torch.allclose(adapted, with_ema, atol=1e-5)
    assert (checkpoint / "lora_raw" / "pytorch_lora_weights.safetensors").exists()
    assert main(["gallery", "--run", str(run), "--n", "1", "--max-prompts", "1"]) == 0


@pytest.mark.parametrize("override, key", [
    ("eval.every=0", "eval.every"),
    ("sampling.num_inference_steps=0", "sampling.num_inference_steps"),
    ("train_batch_size=0", "train_batch_size"),
    ("prompts_per_epoch=-2", "prompts_per_epoch"),
    ("sampling.batch_size=0", "sampling.batch_size"),
])
def test_bad_numbers_are_one_line_errors_that_leave_no_run_folder(tiny_sd_dir, tmp_path, capsys, override, key):
    config = _write_config(tmp_path, tiny_sd_dir)
    assert main(["finetune", "--config", str(config), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and key in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_nan_reward_on_one_of_two_processes_stops_both_with_one_line_and_a_resumable_run(tiny_sd_dir, tmp_path, torchrun):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    worker = root / "tests" / "helpers" / "cli_worker.py"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    config = _write_config(tmp_path, tiny_sd_dir, epochs=3, train_batch_size=2, reward={"name": "test_nan_on_last_process",
                                                                    "kwargs": {"nan_on_call": 3}})
    # Reward calls on each process: 1 = base evaluation, 2 = epoch 0, 3 = epoch 1 (NaN on the last process).
    result = torchrun([worker, "finetune", "--config", config, "trainer.checkpoint_every=1"], env=env, check=False)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("genalign finetune: error:")]
    assert len(ours) == 1 and "NaN for 1 of" in ours[0], result.stderr[-3000:]
    assert "genalign/" not in "\n".join(l for l in result.stderr.splitlines() if l.lstrip().startswith("File "))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_000000"]
    # The run folder is intact: a resume (here with a working reward) finishes it.
    resumed = subprocess.run(
        [sys.executable, str(worker), "finetune", "--config", str(config), "trainer.checkpoint_every=1",
         "trainer.resume=latest", "reward.kwargs.nan_on_call=1000"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert "reward.kwargs.nan_on_call: 3 → 1000" in resumed.stderr  # refused: the reward config changed…
    resumed = subprocess.run(
        [sys.executable, str(worker), "finetune", "--config", str(config), "trainer.checkpoint_every=1",
         "trainer.resume=latest", "reward.kwargs.nan_on_call=1000", "trainer.allow_config_change=true"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # …and accepted when asked
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())[-1] == "step_000002"
