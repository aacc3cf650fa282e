"""The Markov world: its recipe still builds at a small size, and the committed world is decent but imperfect."""

import json
from pathlib import Path

import torch

from genalign.generators.masked import MaskedDiffusionGenerator
from genalign.worlds import build_gold
from genalign.worlds.build_markov import RECIPES, build_markov_world
from genalign.worlds.markov import MarkovGrammar

ASSETS = Path(__file__).resolve().parents[1] / "genalign" / "worlds" / "assets" / "markov"


def test_tiny_recipe_builds_every_part_and_loads_through_the_normal_paths(tmp_path):
    world = build_markov_world(tmp_path / "markov", RECIPES["tiny"], progress=False)
    assert set(world) == {"recipe", "report"} and not (tmp_path / ".tmp_markov").exists()
    generator = MaskedDiffusionGenerator.from_pretrained(tmp_path / "markov" / "model")
    ids = generator.sample([""] * 2, seeds=[0, 1], return_trajectory=False).outputs
    verdict = build_gold("markov", grammar=str(tmp_path / "markov"))(ids)
    assert verdict["log_likelihood_per_token"].shape == (2,)
    assert torch.allclose(verdict["log_likelihood_per_token"].double(),
                          MarkovGrammar.load(tmp_path / "markov" / "grammar.json").log_likelihood(ids) / ids.shape[1])


def test_committed_world_learned_the_grammar_but_not_perfectly():
    report = json.loads((ASSETS / "world.json").read_text())["report"]
    ll = report["log_likelihood_per_token"]
    # Between uniform (−2.12) and the grammar's own samples (−1.02): room for fine-tuning to cost naturalness.
    assert ll["uniform"] + 0.8 < ll["model"] < ll["grammar"] - 0.02
    assert report["kmer3_correlation"]["model"] > 0.95 > 0 > report["kmer3_correlation"]["uniform"]
    assert report["heldout_loss"][-1] < report["heldout_loss"][0] - 0.3
