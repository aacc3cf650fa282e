"""The protein world: committed RFP data and oracles, its tiny recipe, and the gold evaluator."""

from __future__ import annotations

import pytest
import torch

from genalign.generators.proteinmpnn import PROTEIN_ALPHABET, encode_protein, parse_backbone
from genalign.worlds import build_gold
from genalign.worlds.build_protein import RECIPES, build_protein_world
from genalign.worlds.protein import DEFAULT_WORLD, ProteinGold, ProteinWorld, resolve_backbone
from rewards.sequence import OracleReward


def test_tiny_recipe_builds_every_part_and_loads_through_the_normal_paths(tmp_path):
    world = build_protein_world(tmp_path / "protein", RECIPES["tiny"], progress=False)
    loaded = ProteinWorld(tmp_path / "protein")
    assert sorted(loaded.backbones) == ["2vad_A", "2vae_D", "3e5v_A", "3ned_A", "5lk4_A", "6aa7_A"]
    for name, path in loaded.backbones.items():
        assert parse_backbone(path).sequence == loaded.natives[name] == ProteinWorld().natives[name]
    data = loaded.dataset()
    assert len(data["sequence"]) == 1563 and world["report"]["split_sizes"] == {"reward": 64, "eval": 64, "test": 32}
    reward = OracleReward(loaded.reward_oracle_dir)
    ids = torch.tensor([encode_protein(loaded.natives["2vad_A"])])
    assert reward(ids).rewards.shape == (1,)
    gold = ProteinGold(tmp_path / "protein")
    assert set(gold(ids, ["2vad_A"])) == {"stability", "recovery", "more_stable_than_native"}


def test_committed_world_has_disjoint_oracles_that_rank_held_out_stability():
    world = ProteinWorld()
    assert world.label == "foldx" and resolve_backbone("2vad_A") == world.backbones["2vad_A"]
    size = sum(f.stat().st_size for f in DEFAULT_WORLD.rglob("*") if f.is_file())
    assert size <= 1.5e6, size
    data = world.dataset()
    splits = {name: {s for s, k in zip(data["sequence"], data["split"]) if k == name}
              for name in ("reward", "eval", "test")}
    assert not (splits["reward"] & splits["eval"]) and not (splits["test"] & (splits["reward"] | splits["eval"]))
    assert set(world.natives.values()) - {world.natives["3e5v_A"]} <= splits["test"]  # natives: held out of both
    for name in ("oracle_reward", "oracle_eval"):
        report = world.report[name]
        assert report["on_test"]["spearman"] > 0.9  # mostly telling the RFP families apart
        assert report["on_test"]["spearman_within_family_mean"] > 0.0  # within a family: weak but positive
    assert world.report["rasp_vs_foldx"]["spearman_within_family_mean"] > 0.3  # RaSP has FoldX's sign


def test_gold_scores_natives_recovery_and_padded_batches():
    gold = build_gold("protein")
    world = gold.world
    names = ["2vad_A", "3ned_A", "2vad_A"]
    natives = [encode_protein(world.natives[n]) for n in names]
    L = max(map(len, natives))
    ids = torch.zeros(3, L, dtype=torch.long)
    for row, native in enumerate(natives):
        ids[row, : len(native)] = torch.tensor(native)
    ids[2, :50] = (ids[2, :50] + 1) % 20  # 50 mutations
    verdict = gold(ids, names)
    assert verdict["recovery"][:2].tolist() == [1.0, 1.0]
    assert verdict["recovery"][2] == pytest.approx(1 - 50 / len(natives[0]))
    assert verdict["more_stable_than_native"][:2].tolist() == [0.0, 0.0]  # the native itself is not above itself
    assert verdict["stability"][0] == pytest.approx(world.report["natives"]["2vad_A"]["oracle_eval"], abs=1e-3)
    one_hot = torch.nn.functional.one_hot(ids, len(PROTEIN_ALPHABET)).float()
    assert torch.equal(gold(one_hot, names)["stability"], verdict["stability"])
    with pytest.raises(ValueError, match="one condition text per sample"):
        gold(ids)
