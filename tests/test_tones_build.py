"""The tones world's build recipe still works at a tiny size, resumes, and yields loadable parts."""

import dataclasses
import json

import pytest
import torch

from genalign.audio_io import read_wav
from genalign.generators import detect_family
from genalign.generators.audio import AudioDiffusionGenerator, AudioSamplingOptions
from genalign.worlds.build_tones import RECIPES, STAGES, build_tones_world
from genalign.worlds.tones import EXEMPLAR_DEFINITION, SAMPLE_RATE, parse_caption
from genalign.worlds.tones_gold import TonesGold
from rewards.audio import ClapScore


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tones")
    build_tones_world(folder, RECIPES["tiny"], progress=False)
    return folder


def test_tiny_build_writes_every_stage_and_loadable_parts(tiny_world):
    """Fails if a stage's output is missing or unloadable: the T2A folder through our loader (audio family,
    2 s clips at 16 kHz), the CLAP through ClapScore, the judge through TonesGold."""
    world = json.loads((tiny_world / "world.json").read_text())
    assert set(world["stages"]) == set(STAGES)
    assert detect_family(str(tiny_world / "t2a")) == "audio"
    generator = AudioDiffusionGenerator.from_pretrained(tiny_world / "t2a")
    prompt = "a fast rising melody on a loud flute in a high register"
    clips = generator.sample([prompt], AudioSamplingOptions(num_inference_steps=2, audio_length_in_s=2.0), seeds=[0])
    assert generator.sample_rate == SAMPLE_RATE and clips.outputs.shape == (1, 2 * SAMPLE_RATE)
    score = ClapScore(model=tiny_world / "clap", sampling_rate=SAMPLE_RATE)(clips.outputs, [prompt]).rewards
    assert score.shape == (1,) and torch.isfinite(score).all()
    assert set(TonesGold(tiny_world / "gold")(clips.outputs, [prompt])) >= {"instrument", "all_correct"}
    # The UNet is conditioned on exactly the CLAP's text embedding width.
    assert generator.denoiser.config.projection_class_embeddings_input_dim == generator.encode_prompts([prompt]).embeds.shape[1]


def test_exemplar_halves_are_disjoint_wavs_of_the_definition(tiny_world):
    """Fails if the reward and eval exemplar halves shared a clip, had the wrong rate, or broke the definition."""
    listing = json.loads((tiny_world / "exemplars" / "exemplars.json").read_text())
    halves = {half: [read_wav(tiny_world / "exemplars" / item["file"]) for item in listing[half]] for half in ("reward", "eval")}
    assert len(halves["reward"]) == len(halves["eval"]) == RECIPES["tiny"].exemplars_per_half
    assert all(rate == SAMPLE_RATE for half in halves.values() for _, rate in half)
    for a, _ in halves["reward"]:
        assert not any(a.shape == b.shape and torch.equal(a, b) for b, _ in halves["eval"])
    for item in listing["reward"] + listing["eval"]:
        assert all(item[name] == value for name, value in EXEMPLAR_DEFINITION.items())


def test_a_finished_build_is_skipped_and_another_recipe_refused(tiny_world):
    """Fails if re-running a finished build retrained a stage (resume would waste the hour), or if a different
    recipe silently mixed into the folder."""
    stamp = (tiny_world / "t2a" / "model_index.json").stat().st_mtime_ns
    build_tones_world(tiny_world, RECIPES["tiny"], progress=False)
    assert (tiny_world / "t2a" / "model_index.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="another recipe"):
        build_tones_world(tiny_world, RECIPES["full"], progress=False)


def test_report_prompts_are_world_captions(tiny_world):
    """Fails if the base-model report judged prompts the gold judge cannot parse."""
    prompts = (tiny_world / "report" / "prompts.txt").read_text().split("\n")
    assert all(parse_caption(p) is not None for p in prompts if p)


def test_the_committed_world_is_the_full_recipe_and_loads_in_both_samplers():
    """Fails if the committed tones world was built with another recipe than the code's ``full`` one (so a rebuild
    would not give it back), misses a stage, or no longer loads into our generator and diffusers' pipeline."""
    from pathlib import Path

    from diffusers import AudioLDMPipeline

    import genalign.generators.griffin_lim  # noqa: F401  (diffusers loads the vocoder only from an imported module)
    from genalign.worlds import read_world_file

    folder = Path(__file__).resolve().parents[1] / "genalign" / "worlds" / "assets" / "tones"
    world = read_world_file(folder, "tones")
    full = json.loads(json.dumps(dataclasses.asdict(RECIPES["full"])))
    assert world["recipe"] == full
    assert list(world["stages"]) == list(STAGES) and "unfinished" not in world
    generator = AudioDiffusionGenerator.from_pretrained(folder / "t2a")
    assert generator.sample_rate == SAMPLE_RATE
    options = AudioSamplingOptions(num_inference_steps=2, guidance_scale=3.0, audio_length_in_s=2.0)
    audio = generator.sample(["a fast rising melody on a loud flute in a high register"], options, seeds=[0],
                             return_trajectory=False, progress=False).outputs
    assert audio.shape == (1, 2 * SAMPLE_RATE) and float(audio.abs().max()) > 0.01
    assert isinstance(AudioLDMPipeline.from_pretrained(folder / "t2a"), AudioLDMPipeline)
