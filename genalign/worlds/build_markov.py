"""Build the Markov world from one seeded recipe: a known grammar, a masked diffusion model pre-trained on its
sequences, and a report of how well the model learned it.

The world folder holds `grammar.json` (the chain: the gold evaluator `MarkovGold` reads it), `model/` (the masked
diffusion model, `MaskedDiffusionGenerator.from_pretrained`) and `world.json` (the recipe and the report). It is
built in a temporary folder that replaces the old one only when complete. The full recipe takes ~2 minutes on 2
CPU cores; the base model is decent but imperfect (its samples' log-likelihood under the grammar is below the
grammar's own samples'), so fine-tuning toward a motif has room and naturalness has something to lose.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from genalign.generators.masked import MaskedDiffusionConfig, MaskedSamplingOptions
from genalign.generators.masked_pretraining import pretrain_masked
from genalign.worlds import WORLD_FILE
from genalign.worlds.markov import MarkovGrammar, kmer_correlation, kmer_frequencies, kmer_total_variation



@dataclass(frozen=True)
class MarkovRecipe:
    """Every number the build depends on. `full` is the committed world; `tiny` the test-sized one."""

    seed: int = 0
    alphabet: str = "ACGT"
    order: int = 1
    concentration: float = 0.3
    length: int = 32
    num_sequences: int = 8000
    hidden_size: int = 64
    num_layers: int = 4
    kernel_size: int = 5
    dilation_cycle: int = 3
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    report_samples: int = 256
    report_steps: int = 32
    report_motifs: tuple[str, ...] = ("ATA", "CAG", "GAT")


RECIPES: dict[str, MarkovRecipe] = {
    "full": MarkovRecipe(),
    "tiny": MarkovRecipe(num_sequences=128, hidden_size=16, num_layers=2, steps=10, report_samples=8, report_steps=4),
}


def motif_rate(ids: torch.Tensor, motif: str, alphabet: str) -> float:
    """Mean number of (overlapping) occurrences of `motif` per sequence of ids [N, L]."""
    pattern = torch.tensor([alphabet.index(c) for c in motif])
    windows = ids.cpu().unfold(1, len(motif), 1)
    return float((windows == pattern).all(-1).sum(-1).double().mean())


def build_markov_world(folder: str | os.PathLike, recipe: MarkovRecipe = RECIPES["full"], *,
                       progress: bool = True) -> dict:
    """Build the world into `folder` (replacing it); returns the contents of world.json."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp_{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    grammar = MarkovGrammar.random(recipe.alphabet, recipe.order, concentration=recipe.concentration,
                                   seed=recipe.seed)
    grammar.save(tmp / "grammar.json")
    data = grammar.sample(recipe.num_sequences, recipe.length, seed=recipe.seed + 1)
    config = MaskedDiffusionConfig(alphabet=recipe.alphabet, length=recipe.length, backbone="cnn",
                                   hidden_size=recipe.hidden_size, num_layers=recipe.num_layers,
                                   kernel_size=recipe.kernel_size, dilation_cycle=recipe.dilation_cycle)
    result = pretrain_masked(grammar.decode(data), tmp / "model", config=config, steps=recipe.steps,
                             batch_size=recipe.batch_size, lr=recipe.lr, eval_every=max(1, recipe.steps // 5),
                             seed=recipe.seed, progress=progress)
    report = _report(result.generator, grammar, recipe)
    report["heldout_loss"] = [entry["heldout_loss"] for entry in result.history]
    world = {"recipe": asdict(recipe), "report": report}
    (tmp / WORLD_FILE).write_text(json.dumps(world, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return world


@torch.no_grad()
def _report(generator, grammar: MarkovGrammar, recipe: MarkovRecipe) -> dict:
    """The base model's samples against the grammar's own and against uniform random sequences."""
    n, V = recipe.report_samples, grammar.vocab_size
    options = MaskedSamplingOptions(num_inference_steps=recipe.report_steps)
    model = generator.sample([""] * n, options, seeds=range(n), return_trajectory=False).outputs.cpu()
    truth = grammar.sample(n, recipe.length, seed=recipe.seed + 2)
    uniform = torch.randint(V, (n, recipe.length), generator=torch.Generator().manual_seed(recipe.seed + 3))
    per_token = lambda ids: float(grammar.log_likelihood(ids).mean() / recipe.length)  # noqa: E731
    return {
        "log_likelihood_per_token": {"model": per_token(model), "grammar": per_token(truth),
                                     "uniform": per_token(uniform)},
        "kmer3_total_variation": {"model": kmer_total_variation(model, truth, 3, V),
                                  "uniform": kmer_total_variation(uniform, truth, 3, V)},
        "kmer3_correlation": {"model": kmer_correlation(model, truth, 3, V),
                              "uniform": kmer_correlation(uniform, truth, 3, V)},
        "motif_rate": {motif: {"model": motif_rate(model, motif, recipe.alphabet),
                               "grammar": motif_rate(truth, motif, recipe.alphabet)}
                       for motif in recipe.report_motifs},
        "kmer1_model": kmer_frequencies(model, 1, V).tolist(),
    }
