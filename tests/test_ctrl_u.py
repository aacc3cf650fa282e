"""Ctrl-U: the uncertainty and weighted reward loss against hand computations for every condition type, the t_max
mask and the ramp, what trains, and the run's save/load."""

import math

import pytest
import torch
from safetensors.torch import load_file

from genalign.config import ConfigError, build_config
from genalign.control_data import ControlExamples
from genalign.generators.diffusion import DiffusionGenerator
from genalign.trainer import load_trained_weights
from pipelines.ctrl_u import CtrlUConfig, CtrlUPipeline, ctrl_u_loss, reward_ramp
from rewards.controllability import IGNORE_INDEX, ConditionReward, Depth, Edges, Segmentation

CLASSES = 3


class RandomControlData:
    """Seeded random examples: what matters here is the loss plumbing, not the content."""

    condition = "segmentation"

    def size(self, split):
        return 64 if split == "train" else 8

    def examples(self, indices, split):
        g = torch.Generator().manual_seed(sum(int(i) * 7919 for i in indices) + (0 if split == "train" else 1))
        n = len(indices)
        return ControlExamples(torch.rand(n, 3, 32, 32, generator=g), [f"example {int(i)}" for i in indices],
                               torch.rand(n, 3, 32, 32, generator=g), torch.randint(CLASSES, (n, 32, 32), generator=g))


def _segmenter(seed: int = 0) -> ConditionReward:
    torch.manual_seed(seed)
    return ConditionReward(torch.nn.Conv2d(3, CLASSES, 3, padding=1), "segmentation")


def _pipeline(model_dir, out_dir, **overrides) -> CtrlUPipeline:
    data = {
        "model": {"pretrained": str(model_dir), "controlnet": "unet"},
        "condition": "segmentation",
        "sampling": {"num_inference_steps": 2, "guidance_scale": 1.0, "batch_size": 8},
        "trainer": {"output_dir": str(out_dir), "learning_rate": 1e-3, "progress": False, "checkpoint_every": 1,
                    "lora": {"enabled": False}},
        "eval": {"every": 100},
        "epochs": 1, "batch_size": 4, "train_batch_size": 2, "eval_examples": 2,
        "max_reward_timestep": 999, "ramp_updates": 0, "reward_weight": 0.5, "uncertainty_weight": 0.3,
        "uncertainty_scale": 2.0,
    }
    for key, value in overrides.items():
        data[key] = value
    return CtrlUPipeline(build_config(CtrlUConfig, data), reward=_segmenter(), evaluation_reward=_segmenter(1),
                         data=RandomControlData())


# ----------------------------------------------------------------------------- exact loss, per condition type


def test_segmentation_uncertainty_and_weighted_loss_equal_a_hand_computation():
    """U = u_scale · Σ_c p2·log(p2/p1) per pixel; loss = mean over labelled pixels of exp(−U)·(−log p1[target]).
    Fails with the KL's direction swapped, a missing u_scale, unlabelled pixels counted, or exp(+U)."""
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(2, CLASSES, 2, 3, generator=g), torch.randn(2, CLASSES, 2, 3, generator=g)
    target = torch.randint(CLASSES, (2, 2, 3), generator=g)
    target[0, 0, 0] = IGNORE_INDEX
    loss, uncertainty = ctrl_u_loss(Segmentation(), first, second, target, use_uncertainty=True, uncertainty_scale=2.0)
    for b in range(2):
        total, count = 0.0, 0
        for y in range(2):
            for x in range(3):
                p1 = [math.exp(v) for v in first[b, :, y, x].tolist()]
                p2 = [math.exp(v) for v in second[b, :, y, x].tolist()]
                p1 = [v / sum(p1) for v in p1]
                p2 = [v / sum(p2) for v in p2]
                u = 2.0 * sum(q * math.log(q / p) for p, q in zip(p1, p2))
                assert uncertainty[b, y, x].item() == pytest.approx(u, rel=1e-5)
                if target[b, y, x] != IGNORE_INDEX:
                    total += math.exp(-u) * -math.log(p1[int(target[b, y, x])])
                    count += 1
        assert loss[b].item() == pytest.approx(total / count, rel=1e-5)
    plain, zero = ctrl_u_loss(Segmentation(), first, second, target, use_uncertainty=False, uncertainty_scale=2.0)
    assert torch.equal(zero, torch.zeros_like(zero))
    ce = torch.nn.functional.cross_entropy(first, target, ignore_index=IGNORE_INDEX, reduction="none")
    assert plain[1].item() == pytest.approx(ce[1].mean().item(), rel=1e-6)


@pytest.mark.parametrize("condition", [Edges(), Depth()])
def test_map_uncertainty_and_weighted_loss_equal_a_hand_computation(condition):
    """Edges: U = |ê1 − ê2|, loss = mean exp(−U)·(ê1 − c)²; depth: the same on maps divided by each one's own
    maximum. Fails without depth's per-image normalisation, with a squared U, or with the target unnormalised."""
    g = torch.Generator().manual_seed(1)
    first, second, target = (torch.rand(2, 1, 2, 2, generator=g) + 0.1 for _ in range(3))
    loss, uncertainty = ctrl_u_loss(condition, first, second, target, use_uncertainty=True, uncertainty_scale=0.5)
    for b in range(2):
        def norm(m):
            values = m[b, 0].flatten().tolist()
            top = max(values) if isinstance(condition, Depth) else 1.0
            return [v / top for v in values]

        e1, e2, c = norm(first), norm(second), norm(target)
        u = [0.5 * abs(a - b_) for a, b_ in zip(e1, e2)]
        assert uncertainty[b].flatten().tolist() == pytest.approx(u, rel=1e-5)
        expected = sum(math.exp(-ui) * (a - ci) ** 2 for ui, a, ci in zip(u, e1, c)) / 4
        assert loss[b].item() == pytest.approx(expected, rel=1e-5)


def test_controllability_metrics_equal_hand_computations():
    """mIoU over the classes present; SSIM 1 for identical maps; depth −RMSE on the 0–255 scale of max-normalised
    maps. Fails with IoU averaged over absent classes, SSIM's data range wrong, or RMSE not on the 255 scale."""
    target = torch.tensor([[[0, 0], [1, 1]]])
    logits = torch.zeros(1, CLASSES, 2, 2)
    logits[0, 0, 0, :] = logits[0, 0, 1, 0] = logits[0, 1, 1, 1] = 5.0  # predicts [[0, 0], [0, 1]]
    # class 0: |pred ∩ target| = 2, |pred ∪ target| = 3; class 1: 1 / 2
    assert Segmentation().controllability(logits, target).item() == pytest.approx((2 / 3 + 1 / 2) / 2)
    edges = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    same = Edges().controllability(edges, edges)
    assert torch.allclose(same, torch.ones(2), atol=1e-5)
    assert (Edges().controllability((edges + 0.3).clamp(0, 1), edges) < 0.99).all()
    depth = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    guess = torch.tensor([[[[2.0, 2.0], [2.0, 2.0]]]])  # normalised: all 1; target normalised: .25 .5 .75 1
    rmse = math.sqrt(sum(((1 - v) * 255) ** 2 for v in (0.25, 0.5, 0.75, 1.0)) / 4)
    assert Depth().controllability(guess, depth).item() == pytest.approx(-rmse, rel=1e-6)


def test_the_ramp():
    """min(1, updates / ramp_updates), and no ramp at 0. Fails with an off-by-one or a ramp that overshoots 1."""
    assert [reward_ramp(u, 4) for u in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert reward_ramp(0, 0) == 1.0


# ----------------------------------------------------------------------------- the pipeline's step


def test_the_step_loss_composes_the_terms_and_the_reward_term_is_zero_above_t_max(tiny_sd_dir, tmp_path):
    """The micro-batch loss equals L_diff + λ_rew·ramp·L_rew + λ_u·mean(U) recomputed independently from the
    generator and the reward model; with t_max = 0 no example is rewarded and the loss is L_diff alone, and the
    ControlNet++-style baseline drops the U terms. Fails if the copies do not share noise, t2 ≠ t + 1, the mask
    is ignored, or U leaks into the baseline."""
    pipe = _pipeline(tiny_sd_dir, tmp_path / "a")
    trainer, _, _ = pipe.start_training(accumulation_steps=1, total_updates=1)
    plan = pipe.epoch_plan(trainer, 0, 4, 1)
    rows = plan.local[:2]
    loss, stats = pipe.loss(trainer, plan, rows)
    assert stats["rewarded_fraction"] == 1.0

    examples = pipe.data.examples(plan.prompt_index[rows].tolist(), "train")
    seeds = [int(s) for s in plan.seeds[rows]]
    clean = pipe.generator.encode(examples.samples, seeds=seeds)
    draws = [torch.Generator().manual_seed(s + 1) for s in seeds]
    t = torch.cat([torch.randint(1000, (1,), generator=g) for g in draws])
    noise = torch.stack([torch.randn(clean.shape[1:], generator=g) for g in draws])
    at_t = pipe.generator.noised_prediction(clean, examples.conditions(), t, noise)
    at_t2 = pipe.generator.noised_prediction(clean, examples.conditions(), (t + 1).clamp(max=999), noise)
    first, second = pipe.reward.predict(at_t.outputs), pipe.reward.predict(at_t2.outputs)
    per_example, u = ctrl_u_loss(Segmentation(), first, second, examples.target, use_uncertainty=True,
                                 uncertainty_scale=2.0)
    expected = (torch.cat([at_t.loss, at_t2.loss]).mean() + 0.5 * per_example.mean() + 0.3 * u.mean())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["reward_loss"] == pytest.approx(per_example.mean().item(), rel=1e-5)

    pipe.config.max_reward_timestep = 0
    loss, stats = pipe.loss(trainer, plan, rows)
    assert stats["rewarded_fraction"] == 0.0 and stats["reward_loss"] == 0.0 and stats["uncertainty_mean"] == 0.0
    assert loss.item() == pytest.approx(stats["diffusion_loss"], rel=1e-6)

    pipe.config.max_reward_timestep, pipe.config.uncertainty = 999, False
    loss, stats = pipe.loss(trainer, plan, rows)
    plain, _ = ctrl_u_loss(Segmentation(), first, second, examples.target, use_uncertainty=False,
                           uncertainty_scale=2.0)
    assert stats["uncertainty_mean"] == 0.0
    assert loss.item() == pytest.approx(stats["diffusion_loss"] + 0.5 * plain.mean().item(), rel=1e-5)


def test_after_a_step_only_the_controlnet_changed_and_the_run_loads_back(tiny_sd_dir, tmp_path):
    """One update: the ControlNet's weights moved, the UNet, VAE and text encoder are bit-for-bit unchanged; the
    checkpoint loaded into a fresh generator samples what the trained one samples. Fails if the UNet were
    trainable (the engine's default for a diffusion model) or the ControlNet's weights were not saved."""
    pipe = _pipeline(tiny_sd_dir, tmp_path / "run")
    frozen = {name: {k: v.clone() for k, v in module.state_dict().items()}
              for name, module in (("unet", pipe.generator.denoiser), ("vae", pipe.generator.vae),
                                   ("text_encoder", pipe.generator.text_encoder))}
    control_before = {k: v.clone() for k, v in pipe.generator.controlnet.state_dict().items()}
    pipe.train()
    for name, module in (("unet", pipe.generator.denoiser), ("vae", pipe.generator.vae),
                         ("text_encoder", pipe.generator.text_encoder)):
        after = module.state_dict()
        assert all(torch.equal(after[k], v) for k, v in frozen[name].items()), name
    after = pipe.generator.controlnet.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in control_before.items())

    checkpoint = tmp_path / "run" / "checkpoints" / "step_000000"
    assert all(k.startswith("controlnet.") for k in load_file(str(checkpoint / "trainable.safetensors")))
    fresh = DiffusionGenerator.from_pretrained(tiny_sd_dir, controlnet="unet")
    load_trained_weights(fresh, pipe.config.trainer, checkpoint)
    examples = pipe.data.examples([0, 1], "eval")
    a = pipe.generator.sample(examples.conditions(), pipe.options, seeds=[1, 2]).outputs
    b = fresh.sample(examples.conditions(), pipe.options, seeds=[1, 2]).outputs
    assert torch.equal(a, b)


def test_bad_setups_are_refused_with_the_fix(tiny_sd_dir, tmp_path):
    """No ControlNet, a reward model of another condition type, and prompts given to a data-driven pipeline."""
    with pytest.raises(ConfigError, match="model.controlnet=unet"):
        CtrlUPipeline(build_config(CtrlUConfig, {"model": {"pretrained": str(tiny_sd_dir)},
                                                 "trainer": {"output_dir": str(tmp_path / "x")}}),
                      reward=_segmenter(), data=RandomControlData())
    with pytest.raises(ConfigError, match="predicts edges but condition is segmentation"):
        CtrlUPipeline(build_config(CtrlUConfig, {"model": {"pretrained": str(tiny_sd_dir), "controlnet": "unet"},
                                                 "trainer": {"output_dir": str(tmp_path / "y")}}),
                      reward=ConditionReward(torch.nn.Conv2d(3, 1, 1), "edges"), data=RandomControlData())
    with pytest.raises(ConfigError, match="trains on its data's captions"):
        CtrlUPipeline(build_config(CtrlUConfig, {"model": {"pretrained": str(tiny_sd_dir), "controlnet": "unet"},
                                                 "prompts": {"prompts": ["a red circle"]},
                                                 "trainer": {"output_dir": str(tmp_path / "z")}}),
                      reward=_segmenter(), data=RandomControlData())


# ----------------------------------------------------------------------------- gallery


def test_uncertainty_maps_and_the_control_gallery(tiny_sd_dir, tmp_path):
    """U for the gallery is the training step's U (the example noised at t and t + 1 with one noise, read by the
    reward model), and the gallery shows the control, every model's samples in order with their
    controllability by the judge, and the last model's U. Fails if the two copies got different noise or
    timesteps, the judge were swapped for the reward model, or a model's grid were dropped."""
    from genalign.gallery import _fmt
    from pipelines.ctrl_u import uncertainty_maps, write_control_gallery

    pipe = _pipeline(tiny_sd_dir, tmp_path / "run")
    tuned = pipe.generator
    with torch.no_grad():
        for parameter in tuned.controlnet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    base = DiffusionGenerator.from_pretrained(tiny_sd_dir, controlnet="unet")
    reward, judge = _segmenter(), _segmenter(1)

    examples = pipe.data.examples([0, 0, 1, 1], "eval")
    seeds = [5, 6, 7, 8]
    u = uncertainty_maps(tuned, reward, examples, seeds, 200, scale=2.0)
    clean = tuned.encode(examples.samples, seeds=seeds)
    noise = torch.stack([torch.randn(clean.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        at_t = tuned.noised_prediction(clean, examples.conditions(), torch.full((4,), 200), noise).outputs
        at_t2 = tuned.noised_prediction(clean, examples.conditions(), torch.full((4,), 201), noise).outputs
        expected = 2.0 * Segmentation().uncertainty(reward.predict(at_t), reward.predict(at_t2))
    assert u.shape == (4, 32, 32) and u.abs().sum() > 0
    torch.testing.assert_close(u, expected, rtol=1e-4, atol=1e-6)

    index = write_control_gallery(tmp_path / "gallery", {"base": base, "fine_tuned": tuned}, pipe.data, reward,
                                  judge, pipe.options, examples=2, samples=2, seed=5, uncertainty_scale=2.0)
    html = index.read_text()
    for name in ("p000_figure_00", "p000_base_00", "p000_fine_tuned_01", "p001_uncertainty_fine_tuned_01"):
        assert (tmp_path / "gallery" / "images" / f"{name}.png").is_file(), name
    for name, generator in (("base", base), ("fine_tuned", tuned)):
        outputs = generator.sample(examples.conditions(), pipe.options, seeds=seeds, return_trajectory=False).outputs
        expected_mean = float(judge(outputs, list(examples.target)).rewards.mean())
        assert f"<th>controllability {name}</th><td>{_fmt(expected_mean)}</td>" in html
    assert html.index("base") < html.index("fine_tuned") < html.index("uncertainty_fine_tuned")


def test_the_reward_model_reads_half_and_double_precision_decodes():
    """A float16 generator (model.dtype: float16) decodes x̂_0 in half precision and a float64 one in double; the
    float32 predictor must read both, with gradients back to the decode. Fails with a dtype mismatch in the
    predictor's first convolution if the images are not cast to its dtype."""
    reward = _segmenter()
    images = torch.rand(2, 3, 8, 8)
    expected = reward.predict(images)
    for dtype, tolerance in ((torch.float16, 2e-3), (torch.float64, 1e-6)):
        decoded = images.to(dtype).requires_grad_(True)
        prediction = reward.predict(decoded)
        assert prediction.dtype == torch.float32
        torch.testing.assert_close(prediction, expected, atol=tolerance, rtol=0)
        prediction.sum().backward()
        assert decoded.grad is not None and decoded.grad.dtype == dtype
    scores = reward(images.double(), list(torch.randint(CLASSES, (2, 8, 8)))).rewards
    assert scores.shape == (2,)


def test_two_processes_end_with_the_same_weights_as_one(tiny_sd_dir, tmp_path, torchrun, accelerate_launch):
    """Same global batch and seed, 1 vs 2 gloo processes, in float64 (Adam amplifies float32 reduction-order
    noise), on the shapes world's control data with its segmentation reward model: each process noises and
    scores its own share of the examples, and the sharded held-out evaluation is gathered in order. Fails if
    the examples, timesteps or noise depend on the process count, or the reward loss is averaged per process
    instead of over the global batch — with DDP, under the shipped FSDP config (the ControlNet sharded, the
    uneven evaluation shards on gathered weights) and under DeepSpeed ZeRO-2 (float32 master weights: a float32
    bound)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    worker = root / "tests" / "helpers" / "pipeline_worker.py"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    predictor = root / "genalign" / "worlds" / "assets" / "shapes" / "condition" / "segmentation"
    overrides = ["model.controlnet=unet", "model.dtype=float64", "prompts.prompts=[]", "epochs=2", "batch_size=4",
                 f"reward.kwargs.predictor={predictor / 'reward'}", "reward.kwargs.dtype=float64",
                 "evaluation={name: controllability, kwargs: {predictor: " + str(predictor / "evaluation") + "}}",
                 "max_reward_timestep=999", "ramp_updates=0", "reward_weight=1.0", "eval_examples=3",
                 "trainer.checkpoint_every=1", "eval.every=1", "trainer.lora.enabled=false"]
    subprocess.run([sys.executable, str(worker), "ctrl_u", str(tiny_sd_dir), str(tmp_path / "one"),
                    "train_batch_size=4", *overrides], check=True, env=env, capture_output=True, timeout=600)
    torchrun([worker, "ctrl_u", tiny_sd_dir, tmp_path / "two", "train_batch_size=2", *overrides], env=env)
    accelerate_launch([worker, "ctrl_u", tiny_sd_dir, tmp_path / "sharded", "train_batch_size=2", *overrides], env=env)
    accelerate_launch([worker, "ctrl_u", tiny_sd_dir, tmp_path / "zero2", "train_batch_size=2", *overrides], env=env,
                      config="deepspeed_zero2")
    one = load_file(str(tmp_path / "one" / "checkpoints" / "step_000001" / "trainable.safetensors"))
    assert all(k.startswith("controlnet.") for k in one)
    for run, bound in (("two", 1e-7), ("sharded", 1e-7), ("zero2", 1e-6)):
        other = load_file(str(tmp_path / run / "checkpoints" / "step_000001" / "trainable.safetensors"))
        assert one.keys() == other.keys()
        for key in one:
            torch.testing.assert_close(one[key], other[key], atol=bound, rtol=0)

    def log(folder):
        import json

        return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]

    log_one = log(tmp_path / "one")
    for run in ("two", "sharded", "zero2"):
        log_other = log(tmp_path / run)
        assert len(log_one) == len(log_other) == 3
        for a, b in zip(log_one, log_other):
            for key in ("loss", "diffusion_loss", "reward_loss", "uncertainty_mean", "eval_reward_mean",
                        "eval_controllability"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], abs=1e-6), (run, key)  # the losses are float32


def test_the_shipped_sd15_path_fp16_ema_warmup_and_resume(tiny_sd_dir, tmp_path):
    """configs/ctrl_u_sd15_ade20k.yaml's training path on the tiny model: fp16 autocast, EMA, a warm-up schedule,
    and a run stopped and resumed equal to one that never stopped (weights, EMA, logged losses). Fails if an fp16
    update is skipped (non-finite gradients through the decode and the reward model), if the schedule steps per
    micro-batch instead of per update, if EMA does not cover the ControlNet, or if the resumed run redraws other
    examples, timesteps or noise."""
    import json

    settings = dict(epochs=4, train_batch_size=2, **{
        "trainer.mixed_precision": "fp16", "trainer.ema": True, "trainer.ema_decay": 0.5,
        "trainer.lr_schedule": "constant_with_warmup", "trainer.lr_warmup_steps": 2, "trainer.keep_checkpoints": 0})

    def pipeline(folder, **more):
        pipe = _pipeline(tiny_sd_dir, folder)
        data = {**settings, **more}
        for key, value in data.items():
            target = pipe.config
            *path, last = key.split(".")
            for part in path:
                target = getattr(target, part)
            setattr(target, last, value)
        return pipe

    straight = tmp_path / "straight"
    pipeline(straight).train()
    assert not (straight / "warnings.log").exists(), (straight / "warnings.log").read_text()
    checkpoints = straight / "checkpoints"
    start, raw = (load_file(str(checkpoints / f"step_00000{i}" / "trainable.safetensors")) for i in (0, 3))
    ema = load_file(str(checkpoints / "step_000003" / "ema.safetensors"))
    assert ema.keys() == raw.keys() and all(k.startswith("controlnet.") for k in raw)
    assert any(not torch.equal(start[k], raw[k]) for k in raw)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    # Two micro-batches per update; warm-up over 2 updates: after the first update the rate is half.
    groups = torch.load(checkpoints / "step_000000" / "optimizer.pt", weights_only=True)["param_groups"]
    assert groups[0]["lr"] == pytest.approx(0.5e-3, rel=1e-9)

    resumed = tmp_path / "resumed"
    pipeline(resumed, epochs=2).train()
    # Only the length changes, which a constant-after-warm-up schedule does not depend on.
    pipeline(resumed, **{"trainer.resume": "latest", "trainer.allow_config_change": True}).train()
    for name in ("trainable.safetensors", "ema.safetensors"):
        a = load_file(str(checkpoints / "step_000003" / name))
        b = load_file(str(resumed / "checkpoints" / "step_000003" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name

    def losses(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["diffusion_loss"], r["reward_loss"]) for r in rows if "diffusion_loss" in r}

    assert losses(resumed) == losses(straight)
