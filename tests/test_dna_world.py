"""The DNA world: the known regulatory code on hand-written sequences, the recipe at a small size, the committed
world (its oracles, splits and base model), and the `output` selection of OracleReward that its configs use."""

import contextlib
import json
import math
from dataclasses import asdict

import pytest
import torch

from genalign.generators.masked import MaskedDiffusionGenerator, MaskedSamplingOptions
from genalign.worlds import build_gold
from genalign.worlds.build_dna import RECIPES, build_dna_world, top_indices
from genalign.worlds.dna import (
    ASSETS,
    REGULATORY_CODE,
    DNAWorld,
    accessible,
    activity,
    count_occurrences,
    encode_sequences,
    gc_content,
    measured_activity,
    motif_counts,
    plant_motifs,
    reverse_complement,
)
from rewards import RewardError, build_reward
from rewards.sequence import OBJECTIVES_FILE, OracleReward, SequenceOracle, one_hot

MOTIF = {m.name: m.sequence for m in REGULATORY_CODE.motifs}
FILL = "A" * 12  # no motif starts, ends or lies within a run of A's joined to these motifs (checked by counts)


def ids_of(*sequences: str) -> torch.Tensor:
    return encode_sequences(sequences)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


@contextlib.contextmanager
def one_thread():
    """Small models sample faster on one thread, and much faster when other jobs share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------- the regulatory code


def test_motif_counts_read_both_strands_and_count_palindromes_once():
    assert reverse_complement("TGACTCA") == "TGAGTCA" and reverse_complement("CACGTG") == "CACGTG"
    x = ids_of(FILL + MOTIF["AP1"] + FILL + reverse_complement(MOTIF["AP1"]) + FILL + MOTIF["EBOX"] + FILL)
    counts = dict(zip(MOTIF, motif_counts(x)[0].tolist()))
    assert counts == {"AP1": 2, "EBOX": 1, "GATA": 0, "HNF4": 0, "CEBP": 0, "ETS": 0, "OCT": 0}
    # Overlapping copies count; one-hots give the ids' answer.
    assert count_occurrences(ids_of("CACGTGCACGTG"), "CACGTG").tolist() == [2]
    assert count_occurrences(one_hot(x, 4), MOTIF["AP1"]).tolist() == [2]
    assert count_occurrences(ids_of("TGACTC"), MOTIF["AP1"]).tolist() == [0]  # shorter than the motif


def test_activity_saturates_and_pairs_cooperate():
    rho = REGULATORY_CODE.saturation
    cases = {
        # one HNF4 + one CEBP: 1.3 + 0.8 + the HNF4–CEBP bonus 1.0 in HepG2; −0.2 + 0 in K562
        FILL + MOTIF["HNF4"] + FILL + MOTIF["CEBP"] + FILL: (1.3 + 0.8 + 1.0, -0.2),
        # HNF4 alone: no bonus
        FILL + MOTIF["HNF4"] + FILL + FILL: (1.3, -0.2),
        # three AP1 (one on the reverse strand): sat(3) = 1 + ρ + ρ²
        FILL + MOTIF["AP1"] + FILL + MOTIF["AP1"] + FILL + reverse_complement(MOTIF["AP1"]) + FILL:
            ((1 + rho + rho**2) * 1.0, (1 + rho + rho**2) * 0.3),
        # GATA + EBOX: the K562 pair (−0.5 + 0.2 in HepG2; 1.2 + 0.9 + 1.0 in K562)
        FILL + reverse_complement(MOTIF["GATA"]) + FILL + MOTIF["EBOX"] + FILL: (-0.5 + 0.2, 1.2 + 0.9 + 1.0),
        # the silencer has no activity weight, and nothing is zero
        FILL + MOTIF["OCT"] + FILL: (0.0, 0.0),
        FILL * 3: (0.0, 0.0),
    }
    length = max(len(s) for s in cases)
    x = ids_of(*(s.ljust(length, "A") for s in cases))
    expected = torch.tensor(list(cases.values()), dtype=torch.float64)
    torch.testing.assert_close(activity(x), expected)
    torch.testing.assert_close(activity(one_hot(x, 4)), expected)
    # Labels are the activity plus seeded Gaussian noise of the code's σ.
    many = x[torch.zeros(4000, dtype=torch.long)]
    noise = measured_activity(many, seed=5) - activity(many)
    assert abs(float(noise.std()) - REGULATORY_CODE.label_noise) < 0.01 and abs(float(noise.mean())) < 0.02
    assert torch.equal(measured_activity(many, seed=5), measured_activity(many, seed=5))


def test_accessibility_is_gc_above_threshold_without_the_silencer():
    half_gc = "GC" * 8 + "AT" * 8  # GC 0.5: at the threshold, accessible
    below = "GC" * 7 + "AT" * 9  # 0.4375
    silenced = "GC" * 6 + "GG" + MOTIF["OCT"] + "GCGCGC"  # GC ≥ 0.5 but the silencer occurs
    silenced_rc = "GC" * 6 + "GG" + reverse_complement(MOTIF["OCT"]) + "GCGCGC"
    x = ids_of(half_gc, below, silenced.ljust(32, "G")[:32], silenced_rc.ljust(32, "G")[:32])
    assert gc_content(x)[:2].tolist() == [0.5, 0.4375] and float(gc_content(x)[2]) >= 0.5
    assert accessible(x).tolist() == [True, False, False, False]
    assert accessible(one_hot(x, 4)).tolist() == [True, False, False, False]


def test_planting_puts_motifs_at_their_rates():
    planted = plant_motifs(torch.zeros(4000, 128, dtype=torch.long), seed=1)  # all-A background, world length
    means = motif_counts(planted).double().mean(0)
    rates = torch.tensor([m.rate for m in REGULATORY_CODE.motifs], dtype=torch.float64)
    # The last motif planted is overwritten only by its own overlapping copies: its rate is the Poisson mean.
    assert abs(float(means[-1] - rates[-1])) < 0.03
    # Earlier ones can be overwritten by later copies, so they come out below their rates, the first most.
    assert ((means > 0.6 * rates) & (means < rates + 0.03)).all(), means
    assert float(means[0] / rates[0]) < float(means[-1] / rates[-1])


# ----------------------------------------------------------------------------------- the recipe, small


def test_tiny_recipe_builds_a_loadable_world(tmp_path):
    world_dir = tmp_path / "dna"
    saved = build_dna_world(world_dir, RECIPES["tiny"], progress=False)
    assert set(saved) == {"recipe", "report"} and not (tmp_path / ".tmp_dna").exists()
    world = DNAWorld(world_dir)
    generator = MaskedDiffusionGenerator.from_pretrained(world.model_dir)
    ids = generator.sample([""] * 3, MaskedSamplingOptions(num_inference_steps=4), seeds=[0, 1, 2],
                           return_trajectory=False).outputs
    assert ids.shape == (3, RECIPES["tiny"].length)
    for folder in (world.reward_oracle_dir, world.eval_oracle_dir):
        assert SequenceOracle.load(folder)(ids).shape == (3, 2)
        assert build_reward("sequence_oracle", oracle=str(folder), output="hepg2")(ids).rewards.shape == (3,)
    assert SequenceOracle.load(world.accessibility_dir)(ids).shape == (3,)
    verdict = build_gold("dna", world=str(world_dir))(ids)
    assert set(verdict) == {"activity_hepg2", "activity_k562", "accessible"}
    torch.testing.assert_close(verdict["activity_k562"], activity(ids)[:, 1].float())
    # The splits are disjoint halves, and the data regenerates to what the build used.
    splits = world.splits()
    assert len(set(splits["reward"].tolist()) | set(splits["eval"].tolist())) == RECIPES["tiny"].num_sequences
    data, labels = world.dataset()
    assert torch.equal(world.top_sequences(), data[top_indices(labels[:, 0], RECIPES["tiny"].top_fraction)])


# ----------------------------------------------------------------------------------- the committed world


@pytest.fixture(scope="module")
def committed():
    return DNAWorld(ASSETS)


def test_committed_world_is_the_full_recipe_with_disjoint_oracle_data(committed):
    full = json.loads(json.dumps(asdict(RECIPES["full"])))
    assert committed.recipe == full
    splits = committed.splits()
    reward, evaluation = set(splits["reward"].tolist()), set(splits["eval"].tolist())
    assert not reward & evaluation and len(reward) + len(evaluation) == full["num_sequences"]
    assert abs(len(reward) - len(evaluation)) <= 1
    # The two oracles differ (different data and seeds), and the committed folder stays small.
    a, b = committed.load_oracle("reward").state_dict(), committed.load_oracle("eval").state_dict()
    assert any(not torch.equal(a[key], b[key]) for key in a)
    size = sum(path.stat().st_size for path in ASSETS.rglob("*") if path.is_file())
    assert size < 4e6, size
    top = committed.top_sequences()
    assert top.shape == (math.ceil(full["top_fraction"] * full["num_sequences"]), full["length"])


def test_committed_oracles_predict_gold_on_the_other_half_and_on_base_samples(committed):
    report = committed.report
    for name in ("oracle_reward", "oracle_eval"):
        for cell in ("hepg2", "k562"):
            assert report["oracles"][name]["other_half_pearson_vs_gold"][cell] > 0.9
    assert report["accessibility"]["other_half_accuracy"] > 0.95
    # Fresh samples of the committed base model (fewer steps than the report's, to stay quick).
    generator = committed.load_generator()
    n = 96
    with one_thread():
        ids = generator.sample([""] * n, MaskedSamplingOptions(num_inference_steps=32),
                               seeds=range(1000, 1000 + n), return_trajectory=False).outputs
    gold = build_gold("dna", world=str(ASSETS))(ids)
    reward = build_reward("sequence_oracle", oracle=str(committed.reward_oracle_dir), output="hepg2")
    with torch.no_grad():
        predicted = reward(ids).rewards
        evaluated = committed.load_oracle("eval")(ids)[:, 0]
    # Measured 0.925 and 0.974 on these 96 samples (0.911 and 0.971 in the report's 256 with 128 steps).
    assert pearson(predicted, gold["activity_hepg2"]) > 0.85
    assert pearson(predicted, evaluated) > 0.9


def test_committed_base_model_is_decent_but_imperfect(committed):
    base = committed.report["base_model"]
    # It learned the background's k-mer statistics (a sample of the data itself reaches 0.998, uniform 0.14) ...
    assert 0.95 < base["kmer3_correlation_with_data"]["model"] < base["kmer3_correlation_with_data"]["data_sample"]
    # ... and plants every motif, but less often than the data (60% in all), so its gold activity is lower.
    rates = base["motif_rate"]
    assert all(0.0 < rates[m]["model"] < rates[m]["data"] for m in rates)
    share = sum(r["model"] for r in rates.values()) / sum(r["data"] for r in rates.values())
    assert 0.4 < share < 0.9, share
    for cell in ("hepg2", "k562"):
        activity_mean = base["gold_activity_mean"][cell]
        assert 0.2 < activity_mean["model"] < activity_mean["data"] - 0.3


# ----------------------------------------------------------------------------------- OracleReward output


def test_oracle_reward_selects_one_output_by_index_or_name(tmp_path):
    torch.manual_seed(0)
    oracle = SequenceOracle(4, hidden=8, layers=2, outputs=2).eval()
    oracle.save(tmp_path / "named")
    (tmp_path / "named" / OBJECTIVES_FILE).write_text(json.dumps(["hepg2", "k562"]))
    oracle.save(tmp_path / "unnamed")
    ids = torch.randint(4, (5, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both = oracle(ids)

    full = build_reward("sequence_oracle", oracle=str(tmp_path / "named"))
    assert full.objectives == ("hepg2", "k562") and full(ids).rewards.shape == (5, 2)
    for output, column in (("k562", 1), (0, 0), (1, 1)):
        reward = build_reward("sequence_oracle", oracle=str(tmp_path / "named"), output=output)
        assert reward.objectives == (("hepg2", "k562")[column],)
        torch.testing.assert_close(reward(ids).rewards, both[:, column])
    unnamed = OracleReward(str(tmp_path / "unnamed"), output="sequence_oracle_1")
    torch.testing.assert_close(unnamed(ids).rewards, both[:, 1])

    # Still differentiable in one-hot inputs, through the selected column only.
    x = one_hot(ids, 4).requires_grad_(True)
    (selected,) = torch.autograd.grad(OracleReward(oracle, objectives=["a", "b"], output="b")(x).rewards.sum(), x)
    (column,) = torch.autograd.grad(oracle(x)[:, 1].sum(), x)
    assert selected.abs().sum() > 0
    torch.testing.assert_close(selected, column)

    for bad, message in (("sknsh", "no output named 'sknsh'"), (2, r"index 0\.\.1"), (-1, r"index 0\.\.1"),
                         (True, r"index 0\.\.1"), (1.0, r"index 0\.\.1")):
        with pytest.raises(RewardError, match=message):
            build_reward("sequence_oracle", oracle=str(tmp_path / "named"), output=bad)
