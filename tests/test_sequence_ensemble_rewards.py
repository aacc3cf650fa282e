"""Behavioural tests for sequence rewards (rewards.sequence) and ensembles (rewards.ensemble)."""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from rewards import Reward, RewardError, build_reward
from rewards.ensemble import RewardEnsemble, stochastic_variance
from rewards.sequence import (
    DNA,
    KYTE_DOOLITTLE,
    PROTEIN,
    GCContent,
    Hydrophobicity,
    MotifCount,
    OracleReward,
    SequenceOracle,
    decode,
    encode,
    one_hot,
    train_oracle,
)


def _random_strings(n: int, length: int, alphabet: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(n)]


def _count_overlapping(seq: str, motif: str) -> int:
    return sum(seq[i : i + len(motif)] == motif for i in range(len(seq) - len(motif) + 1))


# ------------------------------------------------------------- encoding


def test_encode_one_hot_decode_round_trip() -> None:
    seqs = _random_strings(5, 17, DNA, seed=0)
    ids = encode(seqs, DNA)
    assert ids.dtype == torch.long and ids.shape == (5, 17)
    assert ids[0, 0].item() == DNA.index(seqs[0][0])
    x = one_hot(ids, 4)
    assert x.shape == (5, 17, 4) and x.dtype == torch.float32
    assert torch.equal(x.sum(-1), torch.ones(5, 17))
    assert torch.equal(x.argmax(-1), ids)
    assert decode(ids, DNA) == seqs
    assert decode(x, DNA) == seqs
    assert encode(["acgt"], DNA).tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize(
    ("seqs", "keywords"),
    [(["ACGN"], ["'N'", "position 3"]), (["ACG", "AC"], ["equal length"]), ([], ["empty"])],
)
def test_encode_rejects_bad_sequences(seqs: list[str], keywords: list[str]) -> None:
    with pytest.raises(RewardError) as info:
        encode(seqs, DNA)
    for word in keywords:
        assert word in str(info.value)


def test_one_hot_rejects_out_of_range_ids() -> None:
    with pytest.raises(RewardError, match="MASK"):
        one_hot(torch.tensor([[0, 4]]), 4)


# ---------------------------------------------------------- closed form


def test_gc_content_matches_python_counting() -> None:
    seqs = _random_strings(16, 40, DNA, seed=1)
    expected = [sum(c in "GC" for c in s) / len(s) for s in seqs]
    reward = build_reward("gc_content")
    ids = encode(seqs, DNA)
    np.testing.assert_allclose(reward(ids).rewards.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(reward(one_hot(ids, 4)).rewards.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("motif", ["TATA", "AA", "GCG", "T"])
def test_motif_count_matches_python_counting_with_overlaps(motif: str) -> None:
    seqs = _random_strings(32, 60, DNA, seed=2) + ["AAAAAA", "TATATATA", "GCGCGCG"]
    seqs = [s.ljust(60, "C") for s in seqs]
    expected = [_count_overlapping(s, motif) for s in seqs]
    assert max(expected) >= 2, "the data must contain overlapping occurrences"
    got = MotifCount(motif)(encode(seqs, DNA)).rewards
    np.testing.assert_array_equal(got.numpy(), np.asarray(expected, dtype=np.float32))


def test_motif_count_soft_input_equals_hard_count_and_has_gradient() -> None:
    seqs = _random_strings(8, 30, DNA, seed=3)
    ids = encode(seqs, DNA)
    reward = build_reward("motif_count", motif="TATA")
    hard = reward(ids).rewards
    x = one_hot(ids, 4).requires_grad_(True)
    soft = reward(x).rewards
    torch.testing.assert_close(soft, hard)
    soft.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    # On genuine probabilities it is the expected count: all-uniform DNA of
    # length L has (L - m + 1) / 4**m expected occurrences of an m-mer.
    uniform = torch.full((1, 30, 4), 0.25, dtype=torch.float64)
    expected = (30 - 4 + 1) / 4**4
    assert reward(uniform).rewards.item() == pytest.approx(expected)
    assert MotifCount("TATA")(ids[:, :3]).rewards.eq(0).all(), "too-short sequences have no occurrences"


def test_hydrophobicity_matches_hand_computation() -> None:
    assert len(KYTE_DOOLITTLE) == 20 and set(PROTEIN) == set(KYTE_DOOLITTLE)
    seqs = ["IVLA", "RKDE", "GGGG"]
    # (4.5 + 4.2 + 3.8 + 1.8) / 4 = 3.575; (-4.5 - 3.9 - 3.5 - 3.5) / 4 = -3.85; G = -0.4.
    expected = [3.575, -3.85, -0.4]
    reward = build_reward("hydrophobicity")
    assert isinstance(reward, Hydrophobicity)
    np.testing.assert_allclose(reward(encode(seqs, PROTEIN)).rewards.numpy(), expected, rtol=1e-6)
    x = one_hot(encode(seqs, PROTEIN), 20).requires_grad_(True)
    reward(x).rewards.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_sequence_rewards_reject_wrong_alphabet_width() -> None:
    with pytest.raises(RewardError, match="MASK"):
        GCContent()(torch.rand(2, 10, 5))
    with pytest.raises(RewardError, match="not in the alphabet"):
        MotifCount("TAXA")
    with pytest.raises(RewardError, match="G and C"):
        GCContent(alphabet=PROTEIN.replace("G", "").replace("C", ""))


# --------------------------------------------------------------- oracle


@pytest.fixture(scope="module")
def trained_oracle() -> tuple[SequenceOracle, dict]:
    """An oracle fit to TATA count + 0.5 * GC fraction on 3,000 random 50-bp sequences (a few seconds)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (3000, 50), generator=generator)
    targets = MotifCount("TATA")(ids).rewards + 0.5 * GCContent()(ids).rewards
    return train_oracle(
        ids, targets, alphabet_size=4, epochs=10, batch_size=128, lr=3e-3, val_fraction=0.2,
        seed=0, progress=False, hidden=32, layers=3, dropout=0.1,
    )  # fmt: skip


def test_train_oracle_reaches_high_validation_pearson(trained_oracle: tuple[SequenceOracle, dict]) -> None:
    oracle, metrics = trained_oracle
    assert metrics["val_pearson"] > 0.8, metrics["history"]
    assert metrics["n_val"] == 600 and metrics["n_train"] == 2400
    assert len(metrics["history"]) == 10
    assert metrics["history"][-1]["val_pearson"] == metrics["val_pearson"]
    assert not oracle.training


def test_train_oracle_is_deterministic_given_seed() -> None:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 4, (64, 12), generator=generator)
    targets = torch.randn(64, 2, generator=generator)
    kwargs = {"alphabet_size": 4, "epochs": 2, "batch_size": 16, "lr": 1e-3, "val_fraction": 0.25, "hidden": 8, "layers": 2}
    before = torch.random.get_rng_state()
    a, metrics_a = train_oracle(ids, targets, seed=5, progress=False, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), before), "training must not consume the caller's RNG"
    b, metrics_b = train_oracle(ids, targets, seed=5, progress=False, **kwargs)
    assert metrics_a == metrics_b
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert a(ids[:3]).shape == (3, 2)


def test_oracle_save_load_identical(tmp_path, trained_oracle: tuple[SequenceOracle, dict]) -> None:
    oracle, _ = trained_oracle
    oracle.save(tmp_path / "oracle")
    assert sorted(p.name for p in (tmp_path / "oracle").iterdir()) == ["config.json", "oracle.safetensors"]
    loaded = SequenceOracle.load(tmp_path / "oracle")
    ids = torch.randint(0, 4, (6, 50), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(oracle(ids), loaded(ids))
    from_path = build_reward("sequence_oracle", oracle=str(tmp_path / "oracle"))
    assert torch.equal(from_path(ids).rewards, OracleReward(oracle)(ids).rewards)
    with pytest.raises(RewardError, match="config.json"):
        SequenceOracle.load(tmp_path / "missing")


def test_oracle_reward_is_differentiable_in_one_hot(trained_oracle: tuple[SequenceOracle, dict]) -> None:
    oracle, _ = trained_oracle
    reward = OracleReward(copy.deepcopy(oracle).double())
    assert reward.differentiable and reward.describe()["modality"] == "sequence"
    assert not any(p.requires_grad for p in reward.parameters()), "the oracle is frozen"
    ids = torch.randint(0, 4, (1, 20), generator=torch.Generator().manual_seed(5))
    x = one_hot(ids, 4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda inp: reward(inp).rewards, (x,), eps=1e-6, atol=1e-5)
    reward(x).rewards.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Ids and their one-hot encoding score the same.
    torch.testing.assert_close(reward(ids).rewards, reward(x.detach()).rewards)


# ------------------------------------------------------------- ensemble


class _Fixed(Reward):
    """Returns preset scores; lets the ensemble tests control member outputs exactly."""

    modality = "sequence"
    differentiable = True

    def __init__(self, values: Sequence[float], name: str = "fixed", higher_is_better: bool = True) -> None:
        self.name = name
        super().__init__()
        self.higher_is_better = higher_is_better
        self.values = torch.tensor(values, dtype=torch.float64)

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        return self.values.to(outputs.device)


MEMBER_SCORES = np.array([[1.0, 4.0, -2.0], [0.5, 0.5, 0.5], [3.0, -1.0, 2.0], [0.0, 10.0, 5.0]])  # [B=4, M=3]


def _ensemble(aggregate: str, lam: float = 1.0, higher_is_better: bool = True) -> RewardEnsemble:
    members = [_Fixed(MEMBER_SCORES[:, m], f"m{m}", higher_is_better) for m in range(MEMBER_SCORES.shape[1])]
    return RewardEnsemble(members, aggregate=aggregate, lam=lam)


@pytest.mark.parametrize(
    ("aggregate", "expected"),
    [
        ("mean", MEMBER_SCORES.mean(axis=1)),
        ("std", MEMBER_SCORES.std(axis=1)),
        ("min", MEMBER_SCORES.min(axis=1)),
        ("uncertainty_weighted", MEMBER_SCORES.mean(axis=1) - 0.7 * MEMBER_SCORES.std(axis=1)),
    ],
)
def test_ensemble_aggregates_match_numpy(aggregate: str, expected: np.ndarray) -> None:
    out = _ensemble(aggregate, lam=0.7)(torch.zeros(4, 6, dtype=torch.long))
    np.testing.assert_allclose(out.rewards.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(out.metadata["member_scores"].numpy(), MEMBER_SCORES)
    np.testing.assert_allclose(out.metadata["mean"].numpy(), MEMBER_SCORES.mean(axis=1))
    np.testing.assert_allclose(out.metadata["std"].numpy(), MEMBER_SCORES.std(axis=1))
    assert out.metadata["members"] == ["m0", "m1", "m2"]


def test_ensemble_pessimism_follows_lower_is_better_members() -> None:
    ids = torch.zeros(4, 6, dtype=torch.long)
    worst = _ensemble("min", higher_is_better=False)(ids).rewards.numpy()
    np.testing.assert_allclose(worst, MEMBER_SCORES.max(axis=1))
    cautious = _ensemble("uncertainty_weighted", lam=2.0, higher_is_better=False)(ids).rewards.numpy()
    np.testing.assert_allclose(cautious, MEMBER_SCORES.mean(axis=1) + 2.0 * MEMBER_SCORES.std(axis=1))


def test_ensemble_of_real_rewards_and_oracles_is_differentiable() -> None:
    oracle = SequenceOracle(4, hidden=8, layers=2)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 4, 1))  # [B, 16, 4] -> [B, 1]
    members = [GCContent(), MotifCount("GC"), oracle, linear]
    ensemble = RewardEnsemble(members, aggregate="uncertainty_weighted", lam=0.5, modality="sequence")
    assert ensemble.differentiable and ensemble.modality == "sequence"
    assert isinstance(ensemble.members[2], OracleReward)
    x = one_hot(torch.randint(0, 4, (3, 16), generator=torch.Generator().manual_seed(6)), 4).requires_grad_(True)
    out = ensemble(x)
    assert out.rewards.shape == (3,) and out.metadata["member_scores"].shape == (3, 4)
    assert out.metadata["members"] == ["gc_content", "motif_count", "sequence_oracle", "Sequential_3"]
    out.rewards.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_ensemble_refuses_mixed_modality_naming_members() -> None:
    with pytest.raises(RewardError) as info:
        RewardEnsemble([GCContent(), build_reward("colorfulness")])
    message = str(info.value)
    assert "modality" in message and "gc_content" in message and "colorfulness" in message
    with pytest.raises(RewardError, match="aggregate"):
        RewardEnsemble([GCContent()], aggregate="median")
    with pytest.raises(RewardError, match="modality="):
        RewardEnsemble([torch.nn.Linear(4, 1)])


# ------------------------------------------------ stochastic variance


def test_stochastic_variance_zero_for_deterministic_reward() -> None:
    ids = encode(_random_strings(5, 20, DNA, seed=7), DNA)
    reward = GCContent()
    mean, variance = stochastic_variance(reward, ids, passes=4)
    torch.testing.assert_close(mean, reward(ids).rewards)
    assert variance.shape == (5,) and torch.all(variance == 0)


def test_stochastic_variance_with_dropout_restores_modes() -> None:
    torch.manual_seed(0)
    oracle = SequenceOracle(4, hidden=16, layers=2, dropout=0.3)
    reward = OracleReward(oracle)
    modes = {name: module.training for name, module in reward.named_modules()}
    assert not oracle.training, "OracleReward scores in eval mode"
    ids = encode(_random_strings(5, 20, DNA, seed=8), DNA)
    deterministic = reward(ids).rewards
    mean, variance = stochastic_variance(reward, ids, passes=8)
    assert mean.shape == variance.shape == (5,)
    assert torch.all(variance > 0)
    assert {name: module.training for name, module in reward.named_modules()} == modes
    torch.testing.assert_close(reward(ids).rewards, deterministic)


def test_stochastic_variance_with_perturbation() -> None:
    reward = GCContent()
    x = one_hot(encode(_random_strings(4, 20, DNA, seed=9), DNA), 4)
    generator = torch.Generator().manual_seed(10)

    def perturb(probs: torch.Tensor) -> torch.Tensor:
        noisy = probs + 0.3 * torch.rand(probs.shape, generator=generator)
        return noisy / noisy.sum(-1, keepdim=True)

    mean, variance = stochastic_variance(reward, x, passes=6, perturb=perturb)
    assert torch.all(variance > 0)
    assert torch.all((mean > 0) & (mean < 1)), "the mean of GC fractions is a GC fraction"
    with pytest.raises(RewardError, match="passes >= 2"):
        stochastic_variance(reward, x, passes=1)
