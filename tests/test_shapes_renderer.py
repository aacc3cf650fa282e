import itertools
import math
import time

import numpy as np
import pytest
import torch

from genalign.worlds.shapes import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    Scene,
    ShapeSpec,
    caption,
    make_dataset,
    parse_caption,
    render,
    sample_scenes,
)


def _single(shape="circle", colour="red", size="large", position="centre", background="black") -> Scene:
    return Scene(shapes=(ShapeSpec(shape, colour, size, position),), background=background)


def test_same_seed_same_data_and_different_seeds_differ():
    images_a, captions_a, scenes_a = make_dataset(64, seed=3, max_shapes=3)
    images_b, captions_b, scenes_b = make_dataset(64, seed=3, max_shapes=3)
    images_c, captions_c, _ = make_dataset(64, seed=4, max_shapes=3)
    assert torch.equal(images_a, images_b)
    assert captions_a == captions_b and scenes_a == scenes_b
    assert not torch.equal(images_a, images_c)
    assert captions_a != captions_c


@pytest.mark.parametrize("size", [16, 32, 64])
def test_output_shapes_and_ranges(size):
    scenes = sample_scenes(20, rng=np.random.default_rng(size), max_shapes=4)
    out = render(scenes, size=size)
    assert out.images.shape == (20, 3, size, size) and out.images.dtype == torch.float32
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert out.masks.shape == (20, size, size) and out.masks.dtype == torch.long
    for b, scene in enumerate(scenes):
        labels = set(out.masks[b].unique().tolist())
        # Shapes sit in distinct cells, so at every size each one stays visible.
        assert labels == set(range(len(scene.shapes) + 1))
    assert out.edges.shape == (20, 1, size, size)
    assert set(out.edges.unique().tolist()) <= {0.0, 1.0}
    assert out.depth.shape == (20, 1, size, size)
    assert out.depth.min() >= 0 and out.depth.max() <= 1


def test_sampling_is_valid():
    scenes = sample_scenes(500, rng=np.random.default_rng(0), max_shapes=5)
    counts = {len(s.shapes) for s in scenes}
    assert counts == {1, 2, 3, 4, 5}
    for scene in scenes:
        assert scene.background in BACKGROUNDS
        positions = [spec.position for spec in scene.shapes]
        assert len(set(positions)) == len(positions)
        for spec in scene.shapes:
            assert spec.colour != scene.background
            assert spec.shape in SHAPES and spec.colour in COLOURS and spec.size in SIZES
    attrs = scenes[0].attributes()
    assert attrs["background"] == scenes[0].background and attrs["n_shapes"] == len(scenes[0].shapes)
    assert attrs["shapes"][0] == {
        "shape": scenes[0].shapes[0].shape,
        "colour": scenes[0].shapes[0].colour,
        "size": scenes[0].shapes[0].size,
        "position": scenes[0].shapes[0].position,
    }


def test_pixels_show_colour_background_and_position():
    scenes = sample_scenes(200, rng=np.random.default_rng(1))
    size = 64
    out = render(scenes, size=size)
    cell = size / 3
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    for b, scene in enumerate(scenes):
        spec = scene.shapes[0]
        inside = out.masks[b] == 1
        core = inside & (out.edges[b, 0] == 0)  # away from the anti-aliased outline
        outside = ~inside & (out.edges[b, 0] == 0)
        rgb = torch.tensor(COLOUR_RGB[spec.colour])
        background_rgb = out.images[b][:, outside].mean(dim=1)
        assert torch.allclose(out.images[b][:, core].mean(dim=1), rgb, atol=0.06)
        assert torch.allclose(out.images[b][:, inside].median(dim=1).values, rgb, atol=0.01)
        assert torch.allclose(background_rgb, torch.tensor(BACKGROUND_RGB[scene.background]), atol=0.01)
        row, column = divmod(POSITIONS.index(spec.position), 3)
        assert row * cell <= ys[inside].mean() < (row + 1) * cell
        assert column * cell <= xs[inside].mean() < (column + 1) * cell


@pytest.mark.parametrize("size", [32, 64])
def test_large_shapes_cover_more_pixels(size):
    for shape in SHAPES:
        small, large = render([_single(shape, size="small"), _single(shape, size="large")], size=size).masks
        assert large.sum() > 1.5 * small.sum()


def test_each_shape_has_a_distinct_fill_fraction():
    masks = render([_single(shape) for shape in SHAPES], size=64).masks
    fill = {}
    for shape, mask in zip(SHAPES, masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fill[shape] = (mask.sum() / box).item()
    assert fill["square"] > 0.97
    assert abs(fill["circle"] - math.pi / 4) < 0.06
    assert abs(fill["triangle"] - 0.5) < 0.06
    assert fill["ring"] < fill["circle"] - 0.1
    assert fill["star"] < fill["circle"] - 0.2
    values = sorted(fill.values())
    assert min(b - a for a, b in itertools.pairwise(values)) > 0.05, fill


def test_edges_are_the_mask_boundary_and_depth_is_nearer_on_shapes():
    out = render(sample_scenes(50, rng=np.random.default_rng(2), max_shapes=4), size=32)
    masks = out.masks.numpy()
    # Reference: pad by repeating the border so out-of-image neighbours never count as different.
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)), mode="edge")
    centre = padded[:, 1:-1, 1:-1]
    expected = (
        (centre != padded[:, :-2, 1:-1])
        | (centre != padded[:, 2:, 1:-1])
        | (centre != padded[:, 1:-1, :-2])
        | (centre != padded[:, 1:-1, 2:])
    )
    assert np.array_equal(out.edges[:, 0].numpy().astype(bool), expected)
    depth = out.depth[:, 0]
    on_shapes = out.masks > 0
    assert depth[on_shapes].min() > depth[~on_shapes].max()
    assert depth[~on_shapes].min() == pytest.approx(0.0, abs=0.01)
    # The background gradient runs top (far) to bottom (nearer).
    assert (depth[:, -1, :][~on_shapes[:, -1, :]] > depth[:, 0, :][~on_shapes[:, 0, :]].max()).all()


def test_later_shapes_are_drawn_over_earlier_ones():
    # Same cell on purpose (sample_scenes never does this) to check the drawing order.
    scene = Scene(
        shapes=(ShapeSpec("square", "red", "large", "centre"), ShapeSpec("circle", "blue", "small", "centre")),
        background="black",
    )
    out = render([scene], size=32)
    assert out.masks[0, 16, 16] == 2
    assert torch.allclose(out.images[0, :, 16, 16], torch.tensor(COLOUR_RGB["blue"]))
    assert (out.masks[0] == 1).any()
    assert out.depth[0, 0, 16, 16] > out.depth[0, 0][out.masks[0] == 1].max()
    small, large = render([_single(size="small"), _single(size="large")], size=32).depth[:, 0, 16, 16]
    assert large > small


@pytest.mark.parametrize("max_shapes", [1, 4])
def test_every_template_round_trips(max_shapes):
    rng = np.random.default_rng(max_shapes)
    scenes = sample_scenes(200, rng=rng, max_shapes=max_shapes)
    for scene in scenes:
        for template in range(len(TEMPLATES)):
            text = caption(scene, rng=rng, template=template)
            assert parse_caption(text) == scene, text
            assert parse_caption(text.upper() + ".") == scene


def test_captions_vary_and_read_naturally():
    rng = np.random.default_rng(0)
    scene = _single("circle", "orange", "small", "top left", "black")
    texts = {caption(scene, rng=rng) for _ in range(200)}
    assert len(texts) >= 6
    assert "a small orange circle at the top left on a black background" in texts
    assert "top left: a little orange disc over black" in texts
    assert "an orange circle, small, in the top left corner, black background" in texts
    assert not any(" a orange" in t or t.startswith("a orange") for t in texts)
    two = Scene(shapes=scene.shapes + (ShapeSpec("star", "white", "large", "bottom"),), background="black")
    assert " and " in caption(two, rng=rng, template=0)


def test_parse_caption_rejects_unknown_text():
    assert parse_caption("a photo of a cat") is None
    assert parse_caption("a small pink circle at the top left on a black background") is None
    assert parse_caption("") is None


def test_render_speed():
    scenes = sample_scenes(1000, rng=np.random.default_rng(0))
    render(scenes[:10])  # warm-up
    start = time.perf_counter()
    render(scenes, size=32)
    assert time.perf_counter() - start < 10  # loose on purpose; the measured rate is in the module docstring
