"""Build the DNA world from one seeded recipe: synthetic regulatory sequences with a known activity function, a
masked diffusion model pre-trained on them, two activity oracles on disjoint halves of the data, an
accessibility classifier, and a report of how good (and how imperfect) each part is.

Stages, all seeded by the recipe (`genalign/worlds/dna.py` has the regulatory code and the folder layout):

1. data: an order-2 background chain (`MarkovGrammar.random`), `num_sequences` samples of it with motifs
   planted, their exact activity and noisy measured labels (`world_dataset`; regenerated, not stored).
2. model: `pretrain_masked` trains the dilated-CNN masked diffusion model on all sequences.
3. oracles (in a second process while the model trains, when `parallel`): a random permutation splits the data
   into two disjoint halves; `oracle_reward` fits the measured [hepg2, k562] labels of the first, `oracle_eval`
   those of the second; the accessibility classifier fits the 0/1 rule on the second half.
4. report: each oracle on the other half, agreement of the two oracles, the classifier's accuracy, and the base
   model's samples against the data (3-mer correlation, motif rates, gold activity, accessibility).

The world is built in a temporary folder that replaces the old one only when complete. The full recipe takes
about 8 minutes on 2 quiet CPU cores (one thread per process; docs/worlds.md has the measured times).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from genalign.generators.masked import MaskedDiffusionConfig, MaskedSamplingOptions
from genalign.generators.masked_pretraining import pretrain_masked
from genalign.worlds import WORLD_FILE
from genalign.worlds.dna import (
    ACCESSIBILITY_DIR,
    ACCESSIBILITY_THRESHOLD,
    ALPHABET,
    BACKGROUND_FILE,
    EVAL_ORACLE_DIR,
    MODEL_DIR,
    REGULATORY_CODE,
    REWARD_ORACLE_DIR,
    SPLITS_FILE,
    TOP_SEQUENCES_FILE,
    RegulatoryCode,
    accessible,
    activity,
    decode_sequences,
    generate_sequences,
    motif_rates,
    world_dataset,
)
from genalign.worlds.markov import MarkovGrammar, kmer_correlation
from rewards.sequence import OBJECTIVES_FILE, SequenceOracle, train_oracle


@dataclass(frozen=True)
class DNARecipe:
    """Every number the build depends on. `full` is the committed world; `tiny` the test-sized one.

    Attributes (beyond the obvious):
        code: the regulatory code (motifs, weights, noise, accessibility rule); saved in world.json.
        background_seed: seed of the background chain's transition rows (seed 1 with concentration 1.0 gives a
            GC fraction near the accessibility threshold, so about half of the data is accessible).
        top_fraction: share of the data, by measured HepG2 label, written to top_sequences.txt.
        report_heldout: how many sequences of the other half each oracle and the classifier are scored on.
        ood_rate_scale: the out-of-distribution check plants motifs at this multiple of their data rates.
    """

    seed: int = 0
    code: RegulatoryCode = REGULATORY_CODE
    background_order: int = 2
    background_concentration: float = 1.0
    background_seed: int = 1
    length: int = 128
    num_sequences: int = 50_000
    # the masked diffusion model (dilated CNN)
    hidden_size: int = 48
    num_layers: int = 6
    kernel_size: int = 9
    dilation_cycle: int = 4
    steps: int = 1600
    batch_size: int = 64
    lr: float = 5e-3
    warmup_steps: int = 100
    heldout_fraction: float = 0.02
    # the oracles (rewards.sequence.SequenceOracle)
    oracle_hidden: int = 32
    oracle_layers: int = 4
    oracle_kernel: int = 5
    oracle_epochs: int = 4
    oracle_batch: int = 128
    oracle_lr: float = 3e-3
    oracle_val_fraction: float = 0.05
    accessibility_epochs: int = 4
    # the report
    top_fraction: float = 0.001
    report_samples: int = 256
    report_steps: int = 128
    report_heldout: int = 10_000
    fresh_sequences: int = 2000
    ood_rate_scale: float = 4.0


RECIPES: dict[str, DNARecipe] = {
    "full": DNARecipe(),
    "tiny": DNARecipe(length=32, num_sequences=400, hidden_size=16, num_layers=2, kernel_size=5, steps=5,
                      batch_size=16, warmup_steps=2, heldout_fraction=0.05, oracle_hidden=8, oracle_layers=2,
                      oracle_epochs=1, oracle_batch=32, oracle_val_fraction=0.1, accessibility_epochs=1,
                      report_samples=8, report_steps=8, report_heldout=100, fresh_sequences=64),
}


def build_dna_world(folder: str | os.PathLike, recipe: DNARecipe = RECIPES["full"], *, threads: int | None = 1,
                    parallel: bool | None = None, progress: bool = True) -> dict:
    """Build the world into `folder` (replacing it); returns the contents of world.json.

    Args:
        threads: torch CPU threads per process during the build (restored afterwards); None keeps torch's.
            One thread each is fastest on a shared 2-core machine.
        parallel: train the oracles in a second process while the model trains (default: for recipes with at
            least 10,000 sequences; a small build is faster in one process).
        progress: tqdm bars and stage lines.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".tmp_{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    parallel = recipe.num_sequences >= 10_000 if parallel is None else parallel
    say = print if progress else (lambda *args, **kwargs: None)
    timings: dict[str, float] = {}
    try:
        start = time.perf_counter()
        background = MarkovGrammar.random(ALPHABET, recipe.background_order,
                                          concentration=recipe.background_concentration,
                                          seed=recipe.background_seed)
        background.save(tmp / BACKGROUND_FILE)
        ids, measured = world_dataset(background, recipe.code, recipe.num_sequences, recipe.length,
                                      seed=recipe.seed)
        splits = data_splits(recipe)
        save_file({name: index.to(torch.int32).contiguous() for name, index in splits.items()},
                  str(tmp / SPLITS_FILE))
        top = top_indices(measured[:, 0], recipe.top_fraction)
        (tmp / TOP_SEQUENCES_FILE).write_text("".join(line + "\n" for line in decode_sequences(ids[top])))
        timings["data_s"] = time.perf_counter() - start
        say(f"data: {len(ids)} sequences of length {recipe.length} ({timings['data_s']:.1f} s)")

        pool = None
        if parallel:
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            oracles_future = pool.submit(train_world_oracles, str(tmp), asdict(recipe), threads, False)
        try:
            start = time.perf_counter()
            config = MaskedDiffusionConfig(alphabet=ALPHABET, length=recipe.length, backbone="cnn",
                                           hidden_size=recipe.hidden_size, num_layers=recipe.num_layers,
                                           kernel_size=recipe.kernel_size, dilation_cycle=recipe.dilation_cycle)
            result = pretrain_masked(decode_sequences(ids), tmp / MODEL_DIR, config=config, steps=recipe.steps,
                                     batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
                                     eval_every=max(1, recipe.steps // 4), heldout_fraction=recipe.heldout_fraction,
                                     seed=recipe.seed, progress=progress)
            timings["model_s"] = time.perf_counter() - start
            say(f"model: {recipe.steps} steps ({timings['model_s']:.0f} s)")

            start = time.perf_counter()
            samples = sample_base_model(result.generator, recipe)
            timings["sampling_s"] = time.perf_counter() - start
            say(f"sampling: {recipe.report_samples} sequences × {recipe.report_steps} steps "
                f"({timings['sampling_s']:.0f} s)")

            start = time.perf_counter()
            if pool is not None:
                oracle_metrics = oracles_future.result()
            else:
                oracle_metrics = train_world_oracles(str(tmp), asdict(recipe), None, progress)
            timings["oracles_s"] = oracle_metrics.pop("seconds")
            timings["oracles_wait_s"] = time.perf_counter() - start
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

        start = time.perf_counter()
        report = world_report(tmp, recipe, ids, measured, splits, samples, oracle_metrics)
        report["pretraining_heldout_loss"] = [entry["heldout_loss"] for entry in result.history]
        timings["report_s"] = time.perf_counter() - start
        report["timings"] = timings
        world = {"recipe": asdict(recipe), "report": report}
        (tmp / WORLD_FILE).write_text(json.dumps(world, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return world
    finally:
        torch.set_num_threads(previous_threads)


def data_splits(recipe: DNARecipe) -> dict[str, torch.Tensor]:
    """The two disjoint halves of the data (seeded permutation): {"reward": [N/2], "eval": [N − N/2]} sorted."""
    permutation = torch.randperm(recipe.num_sequences, generator=torch.Generator().manual_seed(recipe.seed + 10))
    half = recipe.num_sequences // 2
    return {"reward": permutation[:half].sort().values, "eval": permutation[half:].sort().values}


def top_indices(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ⌈fraction·N⌉ largest values (at least one), largest first."""
    count = max(1, math.ceil(fraction * len(values)))
    return values.topk(count).indices


def train_world_oracles(folder: str, recipe: dict, threads: int | None, progress: bool) -> dict:
    """Train and save oracle_reward/, oracle_eval/ and accessibility/ into `folder`; returns their training
    metrics and the seconds taken. Takes the recipe as a dict so it can run in a spawned process (it regenerates
    the data from the seed, which is exact)."""
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    recipe = _recipe_from_dict(recipe)
    folder_path = Path(folder)
    background = MarkovGrammar.load(folder_path / BACKGROUND_FILE)
    ids, measured = world_dataset(background, recipe.code, recipe.num_sequences, recipe.length, seed=recipe.seed)
    splits = data_splits(recipe)
    architecture = dict(alphabet_size=len(ALPHABET), batch_size=recipe.oracle_batch, lr=recipe.oracle_lr,
                        val_fraction=recipe.oracle_val_fraction, hidden=recipe.oracle_hidden,
                        layers=recipe.oracle_layers, kernel_size=recipe.oracle_kernel, progress=progress)
    metrics = {}
    jobs = (
        (REWARD_ORACLE_DIR, splits["reward"], measured.float(), recipe.oracle_epochs, list(recipe.code.cells), 20),
        (EVAL_ORACLE_DIR, splits["eval"], measured.float(), recipe.oracle_epochs, list(recipe.code.cells), 21),
        (ACCESSIBILITY_DIR, splits["eval"], accessible(ids, recipe.code).float(), recipe.accessibility_epochs,
         ["accessible"], 22),
    )
    for name, index, targets, epochs, objectives, seed_offset in jobs:
        oracle, result = train_oracle(ids[index], targets[index], epochs=epochs, seed=recipe.seed + seed_offset,
                                      **architecture)
        oracle.save(folder_path / name)
        (folder_path / name / OBJECTIVES_FILE).write_text(json.dumps(objectives) + "\n")
        metrics[name] = {key: result[key] for key in ("val_pearson_per_objective", "val_mse", "n_train", "n_val")}
        metrics[name]["val_pearson_per_epoch"] = [entry["val_pearson"] for entry in result["history"]]
    metrics["seconds"] = time.perf_counter() - start
    return metrics


def _recipe_from_dict(saved: dict) -> DNARecipe:
    values = dict(saved)
    values["code"] = RegulatoryCode.from_dict(saved["code"])
    return DNARecipe(**values)


@torch.no_grad()
def sample_base_model(generator, recipe: DNARecipe) -> torch.Tensor:
    """`report_samples` fixed-seed samples [n, L] long of the base model with `report_steps` steps."""
    n = recipe.report_samples
    options = MaskedSamplingOptions(num_inference_steps=recipe.report_steps)
    return generator.sample([""] * n, options, seeds=range(n), return_trajectory=False).outputs.cpu()


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson r of two equal-size tensors; None (JSON null) where one is constant."""
    r = float(torch.corrcoef(torch.stack([a.double().flatten(), b.double().flatten()]))[0, 1])
    return r if math.isfinite(r) else None


@torch.no_grad()
def _predict(oracle: SequenceOracle, ids: torch.Tensor, batch: int = 2000) -> torch.Tensor:
    return torch.cat([oracle(ids[start : start + batch]) for start in range(0, len(ids), batch)]).double()


def world_report(folder: Path, recipe: DNARecipe, ids: torch.Tensor, measured: torch.Tensor,
                 splits: dict[str, torch.Tensor], samples: torch.Tensor, oracle_metrics: dict) -> dict:
    """The numbers that say what the world's parts are worth (written to world.json's "report")."""
    code, cells = recipe.code, recipe.code.cells
    background = MarkovGrammar.load(folder / BACKGROUND_FILE)
    exact = activity(ids, code)
    oracles = {name: SequenceOracle.load(folder / name) for name in (REWARD_ORACLE_DIR, EVAL_ORACLE_DIR)}
    classifier = SequenceOracle.load(folder / ACCESSIBILITY_DIR)
    other_half = {REWARD_ORACLE_DIR: splits["eval"], EVAL_ORACLE_DIR: splits["reward"]}

    # Each activity oracle on (the first `report_heldout` of) the half it never saw: against the noisy labels and
    # against the exact activity.
    report: dict = {"oracles": {}}
    for name, oracle in oracles.items():
        held_out = other_half[name][: recipe.report_heldout]
        prediction = _predict(oracle, ids[held_out])
        report["oracles"][name] = {
            "training": oracle_metrics[name],
            "other_half_pearson_vs_measured": {cell: _pearson(prediction[:, c], measured[held_out, c])
                                               for c, cell in enumerate(cells)},
            "other_half_pearson_vs_gold": {cell: _pearson(prediction[:, c], exact[held_out, c])
                                           for c, cell in enumerate(cells)},
        }
    # The best any oracle can do against the noisy labels: the labels' own correlation with the exact activity.
    report["label_noise_ceiling_pearson"] = {cell: _pearson(measured[:, c], exact[:, c])
                                             for c, cell in enumerate(cells)}

    # Where the two oracles are compared: fresh world sequences, the base model's samples, and sequences with
    # motifs planted at several times their data rates (out of distribution, like fine-tuned samples).
    fresh = generate_sequences(background, recipe.fresh_sequences, recipe.length, code, seed=recipe.seed + 30)
    dense_code = replace(code, motifs=tuple(replace(m, rate=m.rate * recipe.ood_rate_scale) for m in code.motifs))
    dense = generate_sequences(background, recipe.fresh_sequences, recipe.length, dense_code, seed=recipe.seed + 40)
    comparisons = {}
    for label, sequences in (("fresh_sequences", fresh), ("base_model_samples", samples),
                             (f"motifs_at_{recipe.ood_rate_scale:g}x_rate", dense)):
        gold = activity(sequences, code)
        reward, evaluation = (_predict(oracles[name], sequences) for name in (REWARD_ORACLE_DIR, EVAL_ORACLE_DIR))
        comparisons[label] = {
            "n": len(sequences),
            **{cell: {"reward_vs_eval_pearson": _pearson(reward[:, c], evaluation[:, c]),
                      "reward_vs_gold_pearson": _pearson(reward[:, c], gold[:, c]),
                      "eval_vs_gold_pearson": _pearson(evaluation[:, c], gold[:, c]),
                      "mean_reward_oracle": float(reward[:, c].mean()),
                      "mean_eval_oracle": float(evaluation[:, c].mean()),
                      "mean_gold": float(gold[:, c].mean())}
               for c, cell in enumerate(cells)},
        }
    report["oracle_agreement"] = comparisons

    # The accessibility classifier against the rule, on the reward half (it was trained on the eval half).
    held_out = splits["reward"][: recipe.report_heldout]
    truth = accessible(ids[held_out], code)
    verdict = _predict(classifier, ids[held_out]) > ACCESSIBILITY_THRESHOLD
    sample_truth = accessible(samples, code)
    sample_verdict = _predict(classifier, samples) > ACCESSIBILITY_THRESHOLD
    report["accessibility"] = {
        "threshold": ACCESSIBILITY_THRESHOLD,
        "training": oracle_metrics[ACCESSIBILITY_DIR],
        "other_half_accuracy": float((verdict == truth).double().mean()),
        "other_half_accessible_fraction": float(truth.double().mean()),
        "base_model_accuracy": float((sample_verdict == sample_truth).double().mean()),
    }

    # The base model against the data.
    n = len(samples)
    reference = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(recipe.seed + 50))[:n]]
    uniform = torch.randint(len(ALPHABET), samples.shape, generator=torch.Generator().manual_seed(recipe.seed + 51))
    top_index = top_indices(measured[:, 0], recipe.top_fraction)
    top = ids[top_index]
    data_rates = motif_rates(ids, code)
    sample_gold, reference_gold = activity(samples, code), activity(reference, code)
    V = len(ALPHABET)
    report["base_model"] = {
        "n_samples": n,
        "sampling_steps": recipe.report_steps,
        "kmer3_correlation_with_data": {"model": kmer_correlation(samples, ids, 3, V),
                                        "data_sample": kmer_correlation(reference, ids, 3, V),
                                        "uniform": kmer_correlation(uniform, ids, 3, V)},
        "kmer3_correlation_with_top": {"model": kmer_correlation(samples, top, 3, V),
                                       "data_sample": kmer_correlation(reference, top, 3, V),
                                       "uniform": kmer_correlation(uniform, top, 3, V)},
        "motif_rate": {name: {"model": rate, "data": data_rates[name]}
                       for name, rate in motif_rates(samples, code).items()},
        "gold_activity_mean": {cell: {"model": float(sample_gold[:, c].mean()), "data": float(exact[:, c].mean()),
                                      "data_sample": float(reference_gold[:, c].mean()),
                                      "top_sequences": float(activity(top, code)[:, c].mean())}
                               for c, cell in enumerate(cells)},
        "accessible_fraction": {"model": float(sample_truth.double().mean()),
                                "data": float(accessible(ids, code).double().mean()),
                                "model_predicted": float(sample_verdict.double().mean())},
        "background_log_likelihood_per_base": {
            "model": float(background.log_likelihood(samples).mean() / recipe.length),
            "data_sample": float(background.log_likelihood(reference).mean() / recipe.length),
            "uniform": float(background.log_likelihood(uniform).mean() / recipe.length)},
    }
    report["top_sequences"] = {"count": len(top), "by": "measured hepg2 label (all data)",
                               "mean_measured_hepg2": float(measured[top_index, 0].mean())}
    return report
