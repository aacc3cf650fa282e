import dataclasses
import json

import numpy as np
import pytest
import torch

from genalign.worlds.shapes import COLOURS, Scene, ShapeSpec, render, sample_scenes
from genalign.worlds.shapes_judge import (
    IGNORE_INDEX,
    AttributeClassifier,
    judge_scenes,
    load_judge,
    save_judge,
    scene_targets,
    train_attribute_classifier,
)

# About 20 s on 2 CPU cores; measured held-out accuracies at this budget are 1.0 on every attribute.
TRAIN_STEPS = 500
TRAIN_BATCH = 64


@pytest.fixture(scope="module")
def trained():
    return train_attribute_classifier(steps=TRAIN_STEPS, batch_size=TRAIN_BATCH, size=32, max_shapes=3, seed=0)


@pytest.fixture(scope="module")
def held_out():
    """Scenes no training step or the built-in held-out set used (different seed), with their images."""
    scenes = sample_scenes(300, rng=np.random.default_rng(1234), max_shapes=3)
    return scenes, render(scenes, size=32).images


def test_scene_targets_on_hand_built_scenes():
    scenes = [
        Scene(
            shapes=(
                ShapeSpec("star", "blue", "large", "top left"),
                ShapeSpec("ring", "white", "small", "bottom right"),
            ),
            background="grey",
        ),
        Scene(shapes=(ShapeSpec("circle", "red", "small", "centre"),), background="dark blue"),
    ]
    targets = scene_targets(scenes)
    ignore = IGNORE_INDEX
    # Cell order is POSITIONS: top left, top, top right, left, centre, right, bottom left, bottom, bottom right.
    assert targets["shape"].tolist() == [[4, 0, 0, 0, 0, 0, 0, 0, 5], [0, 0, 0, 0, 1, 0, 0, 0, 0]]
    assert targets["colour"].tolist() == [
        [2, ignore, ignore, ignore, ignore, ignore, ignore, ignore, 6],
        [ignore, ignore, ignore, ignore, 0, ignore, ignore, ignore, ignore],
    ]
    assert targets["size"].tolist() == [
        [1, ignore, ignore, ignore, ignore, ignore, ignore, ignore, 0],
        [ignore, ignore, ignore, ignore, 0, ignore, ignore, ignore, ignore],
    ]
    assert targets["background"].tolist() == [2, 3]
    assert all(t.dtype == torch.long for t in targets.values())

    clash = Scene(
        shapes=(ShapeSpec("star", "blue", "large", "top"), ShapeSpec("ring", "red", "small", "top")), background="black"
    )
    with pytest.raises(ValueError, match="two shapes"):
        scene_targets([clash])


@pytest.mark.parametrize("size", [16, 32, 64])
def test_forward_shapes_at_every_input_size(size):
    model = AttributeClassifier()
    logits = model(torch.rand(2, 3, size, size))
    assert logits["shape"].shape == (2, 9, 6)
    assert logits["colour"].shape == (2, 9, 8)
    assert logits["size"].shape == (2, 9, 2)
    assert logits["background"].shape == (2, 4)
    predicted = model.predict(torch.rand(2, 3, size, size))
    assert predicted["shape"].shape == (2, 9) and predicted["background"].shape == (2,)
    assert all(p.dtype == torch.long for p in predicted.values())


def test_short_training_reaches_high_held_out_accuracy(trained):
    _, metrics = trained
    print("judge held-out metrics:", metrics)
    # Chance: shape 1/6, colour 1/8, size 1/2, background 1/4; thresholds leave margin below the measured 1.0.
    assert metrics["shape"] > 0.95
    assert metrics["colour"] > 0.97
    assert metrics["size"] > 0.97
    assert metrics["position"] > 0.98
    assert metrics["background"] > 0.99
    assert metrics["all_correct"] > 0.9


def test_judge_separates_prompt_following_from_not(trained, held_out):
    model, _ = trained
    scenes, images = held_out

    faithful = judge_scenes(model, images, scenes)
    assert faithful["all_correct"].shape == (len(scenes),) and faithful["all_correct"].dtype == torch.bool
    assert faithful["all_correct"].float().mean() > 0.9
    assert faithful["colour"] > 0.97

    def recolour(spec: ShapeSpec, background: str) -> ShapeSpec:
        # Next colour in the list that is neither the intended one nor the background (which would hide it).
        options = [c for c in COLOURS if c not in (spec.colour, background)]
        return dataclasses.replace(spec, colour=options[COLOURS.index(spec.colour) % len(options)])

    wrong = [Scene(tuple(recolour(s, scene.background) for s in scene.shapes), scene.background) for scene in scenes]
    miscoloured = judge_scenes(model, render(wrong, size=32).images, scenes)
    assert miscoloured["colour"] < 0.05
    assert miscoloured["all_correct"].float().mean() < 0.05
    # Everything else about those images still follows the prompt, and the judge says so.
    assert miscoloured["shape"] > 0.95 and miscoloured["position"] > 0.98 and miscoloured["background"] > 0.99

    # An unrequested extra shape in an empty cell fails all_correct although every requested shape is right.
    scene = Scene(shapes=(ShapeSpec("square", "red", "large", "centre"),), background="black")
    extra = Scene(shapes=(*scene.shapes, ShapeSpec("circle", "green", "large", "top left")), background="black")
    result = judge_scenes(model, render([scene, extra], size=32).images, [scene, scene])
    assert result["shape"] == 1.0 and result["colour"] == 1.0 and result["size"] == 1.0
    assert result["all_correct"].tolist() == [True, False]

    # A blank image holds none of the requested shapes.
    blank = judge_scenes(model, render([Scene((), "black")], size=32).images, [scene])
    assert blank["position"] == 0.0 and not blank["all_correct"].any()


def test_save_load_round_trip(trained, held_out, tmp_path):
    model, _ = trained
    _, images = held_out
    folder = save_judge(model, tmp_path / "judge")
    assert sorted(p.name for p in folder.iterdir()) == ["judge.json", "judge.safetensors"]
    loaded = load_judge(folder)
    before, after = model.predict(images), loaded.predict(images)
    for name in before:
        assert torch.equal(before[name], after[name])

    config = json.loads((folder / "judge.json").read_text())
    config["vocabularies"]["colour"] = list(reversed(config["vocabularies"]["colour"]))
    (folder / "judge.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="different shapes world"):
        load_judge(folder)


def test_training_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    model_a, metrics_a = train_attribute_classifier(steps=3, batch_size=8, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    model_b, metrics_b = train_attribute_classifier(steps=3, batch_size=8, seed=5)
    model_c, _ = train_attribute_classifier(steps=3, batch_size=8, seed=6)
    weights_a, weights_b, weights_c = model_a.state_dict(), model_b.state_dict(), model_c.state_dict()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)
    assert {k: v for k, v in metrics_a.items() if k != "train_seconds"} == {
        k: v for k, v in metrics_b.items() if k != "train_seconds"
    }


def test_short_prompts_judge_only_what_they_specify(trained, held_out):
    from genalign.worlds.shapes import caption
    from genalign.worlds.shapes_expansion import short_caption
    from genalign.worlds.shapes_judge import judge_images, scenes_from_prompts

    model, _ = trained
    rng = np.random.default_rng(7)
    scenes = sample_scenes(200, rng=rng, max_shapes=1)  # random sizes and backgrounds
    images = render(scenes, size=32).images
    short = [short_caption(scene.shapes[0], rng) for scene in scenes]
    asked = scenes_from_prompts(short)
    assert all(s.background is None and s.shapes[0].size is None for s in asked)
    targets = scene_targets(asked)
    assert (targets["background"] == IGNORE_INDEX).all() and (targets["size"] == IGNORE_INDEX).all()

    verdict = judge_images(model, images, asked)
    assert verdict["all_correct"].mean() > 0.9 and verdict["colour"].mean() > 0.97
    # Unspecified attributes are not judged, so they never fail.
    assert torch.equal(verdict["size"], torch.ones(200)) and torch.equal(verdict["background"], torch.ones(200))

    # A wrong size fails the full caption but not the short prompt.
    def resize(scene: Scene) -> Scene:
        spec = scene.shapes[0]
        flipped = dataclasses.replace(spec, size="small" if spec.size == "large" else "large")
        return Scene((flipped,), scene.background)

    resized = render([resize(s) for s in scenes], size=32).images
    full = [caption(scene, rng=rng) for scene in scenes]
    assert judge_images(model, resized, scenes_from_prompts(full))["all_correct"].mean() < 0.05
    assert judge_images(model, resized, asked)["all_correct"].mean() > 0.9

    # Another colour in the short prompt fails it.
    def recolour(scene: Scene) -> Scene:
        spec = scene.shapes[0]
        options = [c for c in COLOURS if c not in (spec.colour, scene.background)]
        return Scene((dataclasses.replace(spec, colour=options[0]),), scene.background)

    wrong = [short_caption(recolour(scene).shapes[0], rng) for scene in scenes]
    miscoloured = judge_images(model, images, scenes_from_prompts(wrong))
    assert miscoloured["all_correct"].mean() < 0.05 and miscoloured["colour"].mean() < 0.05

    # An extra shape in a cell the short prompt leaves empty fails it.
    scene = Scene((ShapeSpec("square", "red", "large", "centre"),), "black")
    extra = Scene((*scene.shapes, ShapeSpec("circle", "green", "small", "top left")), "black")
    asked_twice = scenes_from_prompts(["red square, centre"] * 2)
    result = judge_images(model, render([scene, extra], size=32).images, asked_twice)
    assert result["all_correct"].tolist() == [1.0, 0.0]
