"""Scaling out: every pipeline on 2 gloo processes ends like 1 process on the same global batch (the pipelines
without such a test in their own file are here), and a checkpoint written with N processes resumes with M.

Runs go through `tests/helpers/config_worker.py` (plain for 1 process, torchrun for 2), from a YAML config
the test writes; float64 models, so that Adam cannot amplify float32 reduction-order noise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genalign.config import save_yaml
from genalign.generators.masked import MaskedDiffusionConfig, MaskedDiffusionGenerator

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "helpers" / "config_worker.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def masked_model_dir(tmp_path_factory) -> Path:
    """A small masked CNN over ACGT whose output layer is random (not zero), so predictions depend on x_t."""
    torch.manual_seed(0)
    generator = MaskedDiffusionGenerator.from_config(
        MaskedDiffusionConfig(length=10, hidden_size=16, num_layers=2, kernel_size=3))
    torch.nn.init.normal_(generator.backbone.to_logits.weight, std=1.0)
    return generator.save_pretrained(tmp_path_factory.mktemp("models") / "masked")


def launch(config: Path, out: Path, processes: int, torchrun, *overrides: str, stop_after: int | None = None) -> None:
    args = [config, *(["--stop-after", str(stop_after)] if stop_after is not None else []),
            f"trainer.output_dir={out}", *overrides]
    if processes == 1:
        result = subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=ENV, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-6000:]
    else:
        torchrun([WORKER, *args], env=ENV)


def weights(run: Path, epoch: int, name: str = "trainable.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{epoch:06d}" / name))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and a
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert gap < atol, gap


# ------------------------------------------------------------------------------- 2 processes = 1 process


def drakes_config(path: Path, model: Path) -> Path:
    save_yaml({
        "pipeline": "drakes",
        "model": {"pretrained": str(model), "dtype": "float64"},
        "prompts": {"unconditional": True},
        "reward": {"name": "motif_count", "kwargs": {"motif": "AC"}},
        "sampling": {"num_inference_steps": 7, "temperature": 1.0},
        "trainer": {"learning_rate": 0.05, "progress": False, "checkpoint_every": 0, "lr_schedule": "cosine",
                    "lora": {"rank": 2, "alpha": 2, "target_modules": ["dilated_conv", "pointwise_conv", "to_logits"]}},
        "eval": {"every": 1, "samples_per_prompt": 3},
        "epochs": 3, "batch_size": 4, "train_batch_size": 2, "grad_steps": 2, "tau": 0.7, "alpha": 0.3,
        "kl_chunk_steps": 2,
    }, path)
    return path


def test_drakes_on_two_processes_ends_like_one(masked_model_dir, tmp_path, torchrun, accelerate_launch):
    """Each process samples its share of the relaxed batch with its samples' own seeds; the hard-step KL chunks and
    the reward's backward are accumulated, and DDP (or FSDP, with the shipped config) averages. Fails if a sample's
    Gumbel noise depends on the process, if the loss is scaled by the local instead of the global micro-batch
    count, if the held-out evaluation (3 samples: 2 + 1 over the processes) or the reward log is not gathered, or
    if the reference passes (LoRA off on the sharded module) fall out of step between processes, or, under
    DeepSpeed ZeRO-2 (float32 master weights: a float32 bound), if the engine steps before an update's last
    chunk."""
    import json

    config = drakes_config(tmp_path / "drakes.yaml", masked_model_dir)
    launch(config, tmp_path / "one", 1, torchrun, "train_batch_size=4")
    launch(config, tmp_path / "two", 2, torchrun)
    accelerate_launch([WORKER, config, f"trainer.output_dir={tmp_path / 'sharded'}"], env=ENV)
    accelerate_launch([WORKER, config, f"trainer.output_dir={tmp_path / 'zero2'}"], env=ENV, config="deepspeed_zero2")
    for run, bound in (("two", 1e-9), ("sharded", 1e-9), ("zero2", 1e-6)):
        assert_same_weights(weights(tmp_path / "one", 2), weights(tmp_path / run, 2), atol=bound)
        logs = [(tmp_path / name / "metrics.jsonl").read_text().splitlines() for name in ("one", run)]
        for a, b in zip(*[[json.loads(line) for line in log] for log in logs]):
            for key in ("reward_mean", "reward_std", "kl", "eval_reward_mean", "lr"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=bound, abs=1e-12), (run, key)


def test_rtb_on_two_processes_ends_like_one(masked_model_dir, tmp_path, torchrun):
    """RTB with prior rows (drawn under reference()), log Z started at the first global batch's minimiser and
    learned in its own parameter group. Fails if log Z's start or gradient is a per-process mean, if prior rows
    are chosen per process, or if the chunked backward scales by the local batch."""
    config = tmp_path / "rtb.yaml"
    save_yaml({
        "pipeline": "rtb",
        "model": {"pretrained": str(masked_model_dir), "dtype": "float64"},
        "prompts": {"unconditional": True},
        "reward": {"name": "gc_content"},
        "sampling": {"num_inference_steps": 10, "final_step": "sample"},
        "trainer": {"learning_rate": 0.05, "progress": False, "checkpoint_every": 0, "weight_decay": 0.0,
                    "lora": {"enabled": False}},
        "eval": {"every": 1000, "samples_per_prompt": 2},
        "epochs": 3, "batch_size": 8, "train_batch_size": 2, "beta": 3.0, "prior_fraction": 0.25,
        "log_z_learning_rate": 0.1, "chunk_steps": 4,
    }, config)
    launch(config, tmp_path / "one", 1, torchrun, "train_batch_size=4")
    launch(config, tmp_path / "two", 2, torchrun)
    one, two = weights(tmp_path / "one", 2), weights(tmp_path / "two", 2)
    assert any(k.startswith("extra.log_z") for k in one)
    assert_same_weights(one, two, atol=1e-9)


# ------------------------------------------------------------------------------- N processes → M processes
# One DDPO run of 4 epochs, trained uninterrupted on 1 process, against the same run moved between process counts
# and strategies. DDPO carries per-prompt reward statistics in its pipeline state; the run has LoRA, EMA, a warm-up
# + cosine schedule, clipping that bites (norms 0.2–0.7 against 0.05) and inner epochs whose reshuffled updates
# gather trajectories across processes; 12 samples an epoch in 2 updates split over 1, 2 or 3 processes.
DDPO_SETTINGS = {
    "pipeline": "ddpo",
    "prompts": {"prompts": ["a red circle", "a blue square", "two green stars", "a yellow sun"]},
    "sampling": {"num_inference_steps": 3, "guidance_scale": 2.0, "batch_size": 8, "log_prob_reduction": "mean"},
    "trainer": {"learning_rate": 1e-3, "progress": False, "checkpoint_every": 1, "keep_checkpoints": 0,
                "ema": True, "ema_decay": 0.5, "lr_schedule": "cosine", "lr_warmup_steps": 1, "max_grad_norm": 0.05},
    "eval": {"every": 1, "samples_per_prompt": 1},
    "epochs": 4, "prompts_per_epoch": 6, "samples_per_prompt": 2, "updates_per_epoch": 2, "inner_epochs": 2,
    "timestep_fraction": 0.67, "stat_min_count": 2, "train_batch_size": 1,
}


@pytest.fixture(scope="module")
def straight_ddpo(tiny_sd_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(the DDPO config, its uninterrupted 1-process run folder)."""
    folder = tmp_path_factory.mktemp("ddpo")
    config = folder / "ddpo.yaml"
    save_yaml({**DDPO_SETTINGS, "model": {"pretrained": str(tiny_sd_dir), "dtype": "float64"}}, config)
    launch(config, folder / "straight", 1, None)
    return config, folder / "straight"


def assert_moved_run_ends_straight(straight: Path, moved: Path, atol: float) -> None:
    for name in ("trainable.safetensors", "ema.safetensors"):
        assert_same_weights(weights(straight, 3, name), weights(moved, 3, name), atol=atol)


def test_a_checkpoint_moves_between_process_counts(straight_ddpo, tmp_path, torchrun):
    """The DDPO run on 2 processes, stopped after epoch 0, continued on 1 process to epoch 1, then on 2 to the end,
    ends with the weights and EMA of the uninterrupted run. Fails if resuming reads per-process state that the new
    process count lacks (a missing rank's RNG file, a per-process optimiser shard), if tensors cannot be loaded on
    a multi-process CPU run, or if the schedule, EMA or statistics restart."""
    config, straight = straight_ddpo
    moved = tmp_path / "moved"
    launch(config, moved, 2, torchrun, stop_after=0)
    launch(config, moved, 1, torchrun, "trainer.resume=latest", stop_after=1)
    assert not (moved / "checkpoints" / "step_000002").exists()
    launch(config, moved, 2, torchrun, "trainer.resume=latest")
    assert_moved_run_ends_straight(straight, moved, atol=1e-9)


def test_a_gflownet_checkpoint_with_replay_resumes_on_one_process(tmp_path, torchrun):
    """MOGFN-PC with a replay buffer (tensors in pipeline_state.safetensors) and log Z (an extra parameter group):
    2 processes stopped after 2 of 4 updates, resumed on 1, end like an uninterrupted 1-process run. Fails if the
    buffer or log Z is per process, or if the pipeline's tensors cannot be loaded on the new process count."""
    from tests.test_gflownets import grid_config

    config = tmp_path / "gflownet.yaml"
    save_yaml(grid_config(tmp_path, **{"objective": "tb", "epochs": 4, "trainer.checkpoint_every": 1,
                                       "trainer.keep_checkpoints": 0, "replay_capacity": 32, "replay_batch": 8,
                                       "task.kwargs.reward": "branin_currin", "batch_size": 8,
                                       "eval.samples_per_preference": 4}), config)
    launch(config, tmp_path / "straight", 1, torchrun)
    launch(config, tmp_path / "moved", 2, torchrun, stop_after=1)
    launch(config, tmp_path / "moved", 1, torchrun, "trainer.resume=latest")
    straight, moved = weights(tmp_path / "straight", 3), weights(tmp_path / "moved", 3)
    assert any(k.startswith("extra.") for k in straight)
    assert_same_weights(straight, moved, atol=1e-5)  # float32 policy: reduction order differs between counts
    buffers = [load_file(str(tmp_path / run / "checkpoints" / "step_000003" / "pipeline_state.safetensors"))
               for run in ("straight", "moved")]
    assert buffers[0].keys() == buffers[1].keys() and buffers[0]
    for key in buffers[0]:
        assert torch.equal(buffers[0][key], buffers[1][key]), key


# ------------------------------------------------------------------------------- FSDP on CPU processes


def test_fsdp_trains_like_one_process_and_its_checkpoints_move_between_process_counts(straight_ddpo, tmp_path,
                                                                                       torchrun, accelerate_launch):
    """The DDPO run under the shipped FSDP config (FSDP2 on gloo CPU processes), in four pieces — FSDP on 2
    processes, then 1 process without FSDP, then FSDP on 3, then FSDP on 2 — ends with the weights and EMA of the
    uninterrupted 1-process run, and `genalign export` writes the adapter an unsharded run has. Fails if the
    optimiser, the parameters or the EMA are saved from one process's shards only, if a sharded checkpoint cannot
    be re-sharded for another process count (or read without FSDP), if a whole checkpoint cannot be sharded, if
    sampling under FSDP deadlocks or draws differently, or if clipping sees only local shards."""
    config, straight = straight_ddpo
    moved = tmp_path / "moved"
    fsdp = lambda processes, *args: accelerate_launch(  # noqa: E731
        [WORKER, config, *args, f"trainer.output_dir={moved}"], env=ENV, processes=processes)
    fsdp(2, "--stop-after", 0)
    assert (moved / "checkpoints" / "step_000000" / "sharded").is_dir()
    launch(config, moved, 1, torchrun, "trainer.resume=latest", stop_after=1)
    fsdp(3, "--stop-after", 2, "trainer.resume=latest")
    fsdp(2, "trainer.resume=latest")
    assert_moved_run_ends_straight(straight, moved, atol=1e-9)
    # A sharded checkpoint has no diffusers adapter folder; `genalign export` writes the one an unsharded run has.
    assert not (moved / "checkpoints" / "step_000003" / "lora").exists()
    from genalign.cli import main

    assert main(["export", "--run", str(moved), "--out", str(tmp_path / "exported")]) == 0
    name = "pytorch_lora_weights.safetensors"
    assert_same_weights(load_file(str(straight / "checkpoints" / "step_000003" / "lora" / name)),
                        load_file(str(tmp_path / "exported" / name)), atol=1e-6)


def test_deepspeed_zero2_trains_like_one_process_and_resumes_on_its_process_count(straight_ddpo, tmp_path,
                                                                                 accelerate_launch):
    """The DDPO run under the shipped DeepSpeed ZeRO-2 config on 2 CPU processes, stopped after 2 of 4 epochs and
    resumed on 2, ends with the weights and EMA of the uninterrupted 1-process run (to float32's bound: ZeRO keeps
    float32 master weights). Resuming its checkpoint on 1 process is refused with what to do (DeepSpeed cannot
    re-partition ZeRO state), before anything is trained. Fails if the engine's checkpoint misses the optimiser
    partitions, if the engine steps twice per update or clips with another norm, or if a process-count change
    slips through."""
    config, straight = straight_ddpo
    moved = tmp_path / "moved"
    zero2 = lambda *args, processes=2, check=True: accelerate_launch(  # noqa: E731
        [WORKER, config, *args, f"trainer.output_dir={moved}"], env=ENV, config="deepspeed_zero2",
        processes=processes, check=check)
    zero2("--stop-after", 1)
    assert (moved / "checkpoints" / "step_000001" / "sharded" / "state").is_dir()
    refused = zero2("trainer.resume=latest", processes=1, check=False)
    assert refused.returncode != 0 and "cannot re-partition" in refused.stderr
    assert not (moved / "checkpoints" / "step_000002").exists()
    zero2("trainer.resume=latest")
    assert_moved_run_ends_straight(straight, moved, atol=1e-6)
