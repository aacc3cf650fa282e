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
    trained = ours.sample(PROMPTS[:2], options, seeds=seeds, return_trajectory=False).images

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    base = pipe(PROMPTS[:2], num_inference_steps=5, guidance_scale=1.0, output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    lora_dir = next((tmp_path / "run" / "checkpoints").iterdir()) / "lora"
    pipe.load_lora_weights(str(lora_dir))
    adapted = pipe(PROMPTS[:2], num_inference_steps=5, guidance_scale=1.0, output_type="pt",
                   generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert (base - trained).abs().max() > 1e-3  # training changed the model
    assert torch.allclose(pipeline.sample(PROMPTS[:2], seeds=seeds).images, trained, atol=1e-5)
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
