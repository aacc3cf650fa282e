"""The whole shapes world: built at test size through the real recipe, loaded back through the normal paths,
resumed, and its committed full-size copy checked against what docs/worlds.md reports."""

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from genalign.engine import GoldConfig, build_gold, evaluate
from genalign.generators.diffusion import DiffusionGenerator, SamplingOptions
from genalign.worlds import shapes
from genalign.worlds.build_shapes import RECIPES, STAGES, ShapesRecipe, build_shapes_world, shapes_prompts
from genalign.worlds.shapes_clip import (
    shapes_clip_tokenizer,
    text_embeddings,
    tiny_clip_config,
    used_token_ids,
    zero_unused_token_embeddings,
)
from genalign.worlds.shapes_judge import ShapesGold, judge_images, judge_scenes
from genalign.worlds.shapes_t2i import min_snr_weights
from genalign.worlds.tiny import sd_scheduler

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "genalign" / "worlds" / "assets" / "shapes"


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worlds") / "shapes"
    build_shapes_world(folder, RECIPES["tiny"], progress=False)
    return folder


def test_tiny_build_writes_every_stage_and_loads_through_the_normal_paths(tiny_world):
    from diffusers import StableDiffusionPipeline

    from rewards import build_reward

    world = json.loads((tiny_world / "world.json").read_text())
    assert list(world["stages"]) == list(STAGES)
    assert world["recipe"]["unet_steps"] == RECIPES["tiny"].unet_steps
    # The VAE stage's folder is dropped once the T2I folder holds its copy.
    assert not (tiny_world / "vae").exists() and (tiny_world / "t2i" / "vae").is_dir()

    generator = DiffusionGenerator.from_pretrained(tiny_world / "t2i")
    prompts = ["a small red circle at the top left on a black background", "top: a big blue disc over grey"]
    rollout = generator.sample(prompts, SamplingOptions(num_inference_steps=2, guidance_scale=3.0), seeds=[0, 1])
    assert rollout.outputs.shape == (2, 3, 32, 32)
    assert rollout.trajectory.log_probs.shape == (2, 2)
    # A plain diffusers pipeline reads the same folder.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_world / "t2i", safety_checker=None)
    assert pipe.unet.config.sample_size == 8 and pipe.scheduler.config.prediction_type == "v_prediction"

    clip_score = build_reward("clip_score", model=str(tiny_world / "clip"))
    assert clip_score(rollout.outputs, prompts).rewards.shape == (2,)
    aesthetic = build_reward("clip_aesthetic", model=str(tiny_world / "clip"), head=str(tiny_world / "aesthetic"))
    assert torch.isfinite(aesthetic(rollout.outputs).rewards).all()
    verdicts = ShapesGold(tiny_world / "judge")(rollout.outputs, prompts)
    assert set(verdicts) == {"shape", "colour", "size", "position", "background", "all_correct"}
    assert all(v.shape == (2,) and ((v >= 0) & (v <= 1)).all() for v in verdicts.values())

    report = world["stages"]["report"]
    assert 0 <= report["gold_all_correct"] <= 1 and report["clip_score"] >= 0
    assert len((tiny_world / "report" / "prompts.txt").read_text().split("\n")) > RECIPES["tiny"].report_prompts


def test_build_resumes_and_refuses_another_recipe(tiny_world):
    before = {p: p.stat().st_mtime_ns for p in tiny_world.rglob("*") if p.is_file()}
    build_shapes_world(tiny_world, RECIPES["tiny"], progress=False)  # everything done: nothing is rewritten
    assert {p: p.stat().st_mtime_ns for p in tiny_world.rglob("*") if p.is_file()} == before
    with pytest.raises(ValueError, match="another recipe"):
        build_shapes_world(tiny_world, ShapesRecipe(seed=1), progress=False)
    with pytest.raises(ValueError, match="unknown stage"):
        build_shapes_world(tiny_world, RECIPES["tiny"], stages=["cilp"], progress=False)


def test_interrupted_stage_leaves_finished_ones_and_is_redone(tmp_path, monkeypatch):
    from genalign.worlds import build_shapes

    def crash(*args):
        raise RuntimeError("power cut")

    monkeypatch.setitem(build_shapes._STAGE_FUNCTIONS, "judge", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        build_shapes_world(tmp_path, RECIPES["tiny"], stages=["clip", "judge"], progress=False)
    world = json.loads((tmp_path / "world.json").read_text())
    assert list(world["stages"]) == ["clip"] and not (tmp_path / "judge").exists()
    monkeypatch.undo()
    clip_weights = (tmp_path / "clip" / "model.safetensors").stat().st_mtime_ns
    build_shapes_world(tmp_path, RECIPES["tiny"], stages=["clip", "judge"], progress=False)
    assert (tmp_path / "judge" / "judge.json").exists()
    assert (tmp_path / "clip" / "model.safetensors").stat().st_mtime_ns == clip_weights


def test_engine_evaluation_reports_gold_next_to_reward(tiny_world):
    from rewards import build_reward

    generator = DiffusionGenerator.from_pretrained(tiny_world / "t2i")
    gold = build_gold(GoldConfig(name="shapes", kwargs={"judge": str(tiny_world / "judge")}))
    prompts = shapes_prompts(3, seed=0)
    metrics = evaluate(
        generator, build_reward("clip_score", model=str(tiny_world / "clip")), prompts,
        SamplingOptions(num_inference_steps=2), samples_per_prompt=2, seed=0, batch_size=4, gold=gold,
    )
    rollout = generator.sample(
        [p for p in prompts for _ in range(2)], SamplingOptions(num_inference_steps=2), seeds=list(range(6)),
        return_trajectory=False,
    )
    expected = gold(rollout.outputs, rollout.texts)
    for name, verdict in expected.items():
        assert metrics[f"eval_gold_{name}"] == pytest.approx(float(verdict.mean()))
    assert "eval_reward_mean" in metrics


def test_gold_config_errors_name_the_fix(tmp_path):
    from genalign.config import ConfigError

    with pytest.raises(ConfigError, match="no shapes judge"):
        build_gold(GoldConfig(name="shapes", kwargs={"judge": str(tmp_path)}))
    with pytest.raises(ConfigError, match="unknown gold evaluator"):
        build_gold(GoldConfig(name="sculptures"))
    with pytest.raises(ConfigError, match="missing 1 required .* 'judge'; set the arguments under eval.gold.kwargs"):
        build_gold(GoldConfig(name="tones"))
    assert build_gold(GoldConfig()) is None


def test_per_image_verdicts_agree_with_scene_means_and_reject_foreign_prompts(tiny_world):
    gold = ShapesGold(tiny_world / "judge")
    images, captions, scenes = shapes.make_dataset(12, seed=3, max_shapes=1)
    per_image = judge_images(gold.model, images, scenes)
    pooled = judge_scenes(gold.model, images, scenes)
    for name in ("shape", "colour", "size", "position", "background"):
        assert float(per_image[name].mean()) == pytest.approx(pooled[name])  # one shape per image
    assert torch.equal(per_image["all_correct"].bool(), pooled["all_correct"])
    for name, value in gold(images, captions).items():
        assert torch.equal(value, per_image[name]), name
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        gold(images[:1], ["an astronaut riding a horse"])


def test_zeroing_unused_token_rows_changes_no_world_caption():
    tokenizer = shapes_clip_tokenizer()
    torch.manual_seed(0)
    from transformers import CLIPModel

    model = CLIPModel(tiny_clip_config(tokenizer, hidden=32)).eval()
    _, captions, _ = shapes.make_dataset(64, seed=5, max_shapes=3)
    with torch.no_grad():
        before = text_embeddings(model, tokenizer, captions)
    zeroed = zero_unused_token_embeddings(model, used_token_ids(tokenizer))
    assert zeroed > 49_000
    with torch.no_grad():
        after = text_embeddings(model, tokenizer, captions)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_min_snr_weights_match_a_hand_computation():
    abar = sd_scheduler().alphas_cumprod
    t = torch.tensor([0, 500, 999])
    snr = np.array([abar[i].item() / (1 - abar[i].item()) for i in t.tolist()])
    expected = np.minimum(snr, 5.0) / (snr + 1)
    torch.testing.assert_close(min_snr_weights(t, abar), torch.tensor(expected, dtype=abar.dtype))


def test_prompt_sets_are_captions_and_disjoint():
    train = (ROOT / "configs" / "prompts" / "shapes_train.txt").read_text().splitlines()
    held_out = (ROOT / "configs" / "prompts" / "shapes_eval.txt").read_text().splitlines()
    assert len(set(train)) == len(train) >= 2000 and len(set(held_out)) == len(held_out) >= 256
    assert not set(train) & set(held_out)
    assert all(shapes.parse_caption(p) is not None for p in train + held_out)
    assert train == shapes_prompts(len(train), seed=100)  # the committed files are the recipe's


@pytest.mark.skipif(not COMMITTED.exists(), reason="the committed shapes world is not in this checkout")
def test_committed_world_is_the_full_recipe_and_beats_chance():
    world = json.loads((COMMITTED / "world.json").read_text())
    assert world["recipe"] == json.loads(json.dumps(RECIPES["full"].__dict__))
    report = world["stages"]["report"]
    for attribute in ("shape", "colour", "size", "position", "background"):
        accuracy, chance = report[f"gold_{attribute}"], report[f"chance_{attribute}"]
        assert (accuracy - chance) / (1 - chance) > 0.2, attribute  # a fifth of the way from chance to perfect
    assert report["gold_all_correct"] < 0.9  # room left for fine-tuning
    pen = world["stages"]["pen"]  # Parrot's prompt-expansion network, on short prompts it never saw
    assert pen["faithful_sampled_all"] >= 0.9 and pen["faithful_greedy_all"] >= 0.95
    assert sum(p.stat().st_size for p in (COMMITTED / "pen").rglob("*") if p.is_file()) < 2e6
    # Counted as git stores files (zlib-compressed): the CLIP vocabulary's never-used rows are zeros.
    stored = sum(len(zlib.compress(p.read_bytes())) for p in COMMITTED.rglob("*") if p.is_file())
    # 35 MB since Ctrl-U's parts landed: three base ControlNets (13.4 MB) and nine condition predictors (5.3 MB).
    assert stored < 40e6, f"committed shapes world takes {stored / 1e6:.1f} MB in git"
    for kind in ("segmentation", "edges", "depth"):  # Ctrl-U's parts, decent but imperfect
        parts = world["stages"]["condition"][kind]
        metric = {"segmentation": "miou", "edges": "ssim", "depth": "rmse"}[kind]
        reward, evaluation, noisy = (parts[role][f"held_out_vae_{metric}"] for role in ("reward", "evaluation",
                                                                                       "reward_noisy"))
        if kind != "depth":  # the few-scene model is worse; for depth 128 scenes were enough (docs/worlds.md)
            assert noisy < reward, kind
        base = world["stages"]["controlnet"][kind]["controllability_evaluation"]
        # The base ControlNet is below what the evaluation model reads from the renders themselves.
        assert base < (evaluation if kind != "depth" else -evaluation), kind


def test_demo_config_runs_on_a_world_and_the_gallery_shows_gold_verdicts(tiny_world, tmp_path, capsys):
    """configs/demo.yaml pointed at the tiny world: training logs gold next to reward, the gallery labels
    every sample with its verdict and reports gold before/after."""
    from genalign.cli import main

    overrides = [
        f"model.pretrained={tiny_world / 't2i'}",
        f"reward.kwargs.model={tiny_world / 'clip'}",
        f"eval.gold.kwargs.judge={tiny_world / 'judge'}",
        f"trainer.output_dir={tmp_path / 'run'}",
        "trainer.progress=false", "epochs=1", "eval.every=1", "sampling.num_inference_steps=2",
        "prompts_per_epoch=2", "samples_per_prompt=2", "train_batch_size=2", "probe_prompts=1",
    ]
    eval_prompts = tmp_path / "eval.txt"
    eval_prompts.write_text("\n".join(shapes_prompts(3, seed=9)) + "\n")
    overrides.append(f"prompts.eval_file={eval_prompts}")
    assert main(["finetune", "--config", str(ROOT / "configs" / "demo.yaml"), *overrides]) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["step"] == -1 and log[-1]["step"] == 0
    for record in (log[0], log[-1]):
        assert 0 <= record["eval_gold_all_correct"] <= 1 and "eval_reward_mean" in record
    assert main(["gallery", "--run", str(tmp_path / "run"), "--n", "2"]) == 0
    page = (tmp_path / "run" / "gallery" / "index.html").read_text()
    assert page.count("gold: ") == 2 * 3 * 2  # before and after, 3 prompts, 2 samples each
    assert "gold all_correct before" in page and "gold all_correct after" in page
