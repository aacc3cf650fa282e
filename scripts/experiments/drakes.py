"""DRAKES against the pretrained model, best-of-N and SMC-style resampling, and DRAKES without its KL term, on the
DNA world and the protein world, several seeds.

    python scripts/experiments/drakes.py run --world dna --out runs/experiments/drakes --seeds 0,1,2 --jobs 2
    python scripts/experiments/drakes.py run --world protein --out runs/experiments/drakes --seeds 0
    python scripts/experiments/drakes.py report --out runs/experiments/drakes

`run` starts one process per (world, method, seed), `--jobs` at a time; each writes
<out>/<world>_<method>_<seed>/result.json and is skipped when that file exists. DRAKES runs go through
`genalign finetune` with configs/drakes_<world>.yaml (and `alpha=0` for the ablation), then sample from the
trained model. Every method is scored on the same number of samples with the same sampling steps, by the
held-out evaluation oracle (which no method saw), the gold evaluator and the naturalness metrics:

* DNA: evaluation-oracle HepG2 activity (median), gold HepG2 activity (the known function), accessibility
  (the classifier and the exact rule), 3-mer correlation with the top 0.1 % training sequences, and the ELBO
  under the pretrained model (nats per sequence; higher = more natural).
* Protein (per backbone, then averaged): evaluation-oracle stability, fraction predicted more stable than the
  native sequence, recovery of the native sequence, ELBO under ProteinMPNN, and diversity (mean pairwise
  Hamming distance / length).

`reward_calls` counts the sequences the training reward scored: best-of-N n per sample, SMC N particles × (T + 1)
per N samples, DRAKES batch size × updates (with gradients) and nothing at sampling time.
`report` prints a markdown table (mean ± std over seeds) and writes <out>/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

METHODS = ("pretrained", "best_of_n", "smc", "drakes", "drakes_no_kl")

# Per world: sampling steps, evaluation samples (per backbone for proteins), best-of-N's n, SMC's particles and λ,
# and the DRAKES overrides (on top of configs/drakes_<world>.yaml) that fit the CPU budget.
SETTINGS = {
    "dna": {"steps": 32, "samples": 128, "n": 8, "particles": 8, "lam": 0.1, "drakes": ["eval.every=30"]},
    "protein": {"steps": 10, "samples": 8, "n": 4, "particles": 4, "lam": 0.1,
                "drakes": ["epochs=6", "eval.every=6", "eval.samples_per_prompt=2"]},
}


def _world(name: str):
    if name == "dna":
        from genalign.worlds.dna import ASSETS, DNAWorld

        return DNAWorld(ASSETS)
    from genalign.worlds.protein import ProteinWorld

    return ProteinWorld()


def _pretrained(world_name: str, world):
    from genalign.generators.masked import MaskedDiffusionGenerator

    if world_name == "dna":
        return MaskedDiffusionGenerator.from_pretrained(world.model_dir)
    return MaskedDiffusionGenerator.from_pretrained("proteinmpnn:v_48_020")


def _conditions(world_name: str, world, samples: int) -> list[str]:
    if world_name == "dna":
        return [""] * samples
    return [name for name in _backbones(world) for _ in range(samples)]


def _backbones(world) -> list[str]:
    """The backbones configs/drakes_protein.yaml trains on."""
    from genalign.config import load_yaml

    return list(load_yaml(ROOT / "configs" / "drakes_protein.yaml")["prompts"]["prompts"])


def _reward(world_name: str, world):
    from rewards import build_reward

    if world_name == "dna":
        return build_reward("sequence_oracle", oracle=str(world.reward_oracle_dir), output="hepg2")
    return build_reward("sequence_oracle", oracle=str(world.reward_oracle_dir))


def _options(generator, steps: int):
    options = generator.default_options()
    options.num_inference_steps = steps
    if generator.config.backbone == "proteinmpnn":
        options.temperature = 0.1  # the DRAKES paper's logit temperature for ProteinMPNN
    return options


def _drakes(world_name: str, seed: int, alpha_zero: bool, folder: Path):
    """Fine-tune with the shipped config in a subprocess; returns (trained generator, reward calls)."""
    from genalign.cli import load_run_config, load_run_generator

    run_dir = folder / "run"
    overrides = [f"trainer.output_dir={run_dir}", f"trainer.seed={seed}", "trainer.progress=false",
                 *SETTINGS[world_name]["drakes"], *(["alpha=0"] if alpha_zero else [])]
    if not (run_dir / "metrics.jsonl").exists() or not list((run_dir / "checkpoints").glob("step_*")):
        cmd = [sys.executable, "-m", "genalign.cli", "finetune", "--config", f"configs/drakes_{world_name}.yaml",
               *overrides]
        with open(folder / "finetune.log", "w") as log:
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    generator, _ = load_run_generator(run_dir)
    config = load_run_config(run_dir)
    return generator, config.batch_size * config.epochs


def _diversity(ids: torch.Tensor) -> float:
    """Mean pairwise Hamming distance / length over ids [N, L]."""
    different = (ids[:, None, :] != ids[None, :, :]).float().mean(-1)
    n = len(ids)
    return float(different.sum() / max(n * (n - 1), 1))


def evaluate(world_name: str, world, pretrained, ids: torch.Tensor, conditions: list[str]) -> dict[str, float]:
    from rewards.sequence import SequenceOracle

    metrics: dict[str, float] = {}
    elbo = torch.cat([pretrained.log_likelihood_bound(ids[i : i + 32], conditions[i : i + 32], num_draws=8)
                      for i in range(0, len(ids), 32)])
    metrics["log_likelihood_bound"] = float(elbo.mean())
    with torch.no_grad():
        if world_name == "dna":
            from genalign.worlds.dna import DNAGold

            evaluation = SequenceOracle.load(world.eval_oracle_dir)(ids)[:, 0]
            training = SequenceOracle.load(world.reward_oracle_dir)(ids)[:, 0]
            accessibility = SequenceOracle.load(world.accessibility_dir)(ids)
            gold = DNAGold(world.folder)(ids)
            metrics.update({
                "eval_oracle_median": float(evaluation.median()), "eval_oracle_mean": float(evaluation.mean()),
                "reward_oracle_mean": float(training.mean()),
                "gold_activity_mean": float(gold["activity_hepg2"].mean()),
                "gold_activity_median": float(gold["activity_hepg2"].median()),
                "accessible_classifier": float((accessibility >= 0.5).float().mean()),
                "accessible_gold": float(gold["accessible"].float().mean()),
                "kmer3_correlation_top": world.top_kmer_correlation(ids, 3),
            })
        else:
            from genalign.worlds.protein import ProteinGold

            gold = ProteinGold(world.folder)(ids, conditions)
            training = SequenceOracle.load(world.reward_oracle_dir)
            per_backbone = []
            for name in dict.fromkeys(conditions):
                rows = [i for i, c in enumerate(conditions) if c == name]
                length = len(world.natives[name])
                per_backbone.append({
                    "eval_oracle_mean": float(gold["stability"][rows].mean()),
                    "more_stable_than_native": float(gold["more_stable_than_native"][rows].mean()),
                    "recovery": float(gold["recovery"][rows].mean()),
                    "reward_oracle_mean": float(training(ids[rows, :length]).mean()),
                    "diversity": _diversity(ids[rows, :length]),
                })
                metrics.update({f"{name}/{k}": v for k, v in per_backbone[-1].items()})
            for key in per_backbone[0]:
                metrics[key] = float(np.mean([b[key] for b in per_backbone]))
    return metrics


def one(world_name: str, method: str, seed: int, out: Path) -> None:
    from genalign.guided_sampling import best_of_n, smc

    torch.set_num_threads(1)
    folder = out / f"{world_name}_{method}_{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    settings = SETTINGS[world_name]
    world = _world(world_name)
    pretrained = _pretrained(world_name, world)
    options = _options(pretrained, settings["steps"])
    conditions = _conditions(world_name, world, settings["samples"])
    seeds = [10_000 * (seed + 1) + i for i in range(len(conditions))]
    reward = _reward(world_name, world)
    tic = time.time()
    if method == "pretrained":
        ids, calls = pretrained.sample(conditions, options, seeds=seeds, batch_size=32).outputs, 0
    elif method == "best_of_n":
        n = settings["n"]
        drawn = [10_000_000 * (seed + 1) + i for i in range(len(conditions) * n)]
        result = best_of_n(pretrained, conditions, options, reward, n=n, seeds=drawn, batch_size=32)
        ids, calls = result.rollout.outputs, result.reward_calls
    elif method == "smc":
        particles = settings["particles"]
        groups = conditions[::particles]
        result = smc(pretrained, groups, options, reward, num_particles=particles, lam=settings["lam"], seed=seed)
        ids, calls = result.rollout.outputs, result.reward_calls
    else:
        tuned, calls = _drakes(world_name, seed, method == "drakes_no_kl", folder)
        ids = tuned.sample(conditions, _options(tuned, settings["steps"]), seeds=seeds, batch_size=32).outputs
    seconds = time.time() - tic
    metrics = evaluate(world_name, world, pretrained, ids.cpu(), conditions)
    result = {"world": world_name, "method": method, "seed": seed, "reward_calls": calls, "seconds": seconds,
              "steps": settings["steps"], "samples": len(conditions), **metrics}
    (folder / "samples.txt").write_text("\n".join(f"{c}\t{s}" for c, s in zip(conditions, pretrained.decode(ids))))
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def run(args) -> None:
    out = Path(args.out)
    jobs = [(world, method, seed) for world in args.world.split(",") for seed in map(int, args.seeds.split(","))
            for method in args.methods.split(",")]
    todo = [job for job in jobs if not (out / f"{job[0]}_{job[1]}_{job[2]}" / "result.json").exists()]
    print(f"{len(todo)} of {len(jobs)} runs to do", flush=True)

    def launch(job) -> int:
        world, method, seed = job
        (out / f"{world}_{method}_{seed}").mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "one", "--world", world, "--method", method, "--seed", str(seed),
               "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(out / f"{world}_{method}_{seed}" / "log.txt", "w") as log:
            code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        print(f"{world} {method} seed {seed}: {'done' if code == 0 else f'failed ({code})'}", flush=True)
        return code

    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(launch, todo))
    if any(codes):
        sys.exit(1)


COLUMNS = {
    "dna": ["eval_oracle_median", "reward_oracle_mean", "gold_activity_mean", "accessible_classifier",
            "accessible_gold", "kmer3_correlation_top", "log_likelihood_bound", "reward_calls"],
    "protein": ["eval_oracle_mean", "more_stable_than_native", "recovery", "reward_oracle_mean",
                "log_likelihood_bound", "diversity", "reward_calls"],
}


def report(args) -> None:
    out = Path(args.out)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    summary = {}
    for world in COLUMNS:
        rows = [r for r in results if r["world"] == world]
        if not rows:
            continue
        print(f"\n### {world}\n")
        print("| method | seeds | " + " | ".join(COLUMNS[world]) + " |")
        print("|---|---|" + "---|" * len(COLUMNS[world]))
        for method in METHODS:
            mine = [r for r in rows if r["method"] == method]
            if not mine:
                continue
            cells = []
            for column in COLUMNS[world]:
                values = np.array([r[column] for r in mine], dtype=float)
                summary[f"{world}/{method}/{column}"] = {"mean": values.mean(), "std": values.std(), "n": len(values)}
                cells.append(f"{values.mean():.3g} ± {values.std():.2g}" if len(values) > 1 else f"{values.mean():.3g}")
            print(f"| {method} | {len(mine)} | " + " | ".join(cells) + " |")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--world", default="dna", help="dna, protein or dna,protein")
    p_run.add_argument("--methods", default=",".join(METHODS))
    p_run.add_argument("--seeds", default="0,1,2")
    p_run.add_argument("--jobs", type=int, default=2)
    p_run.add_argument("--out", default="runs/experiments/drakes")
    p_one = sub.add_parser("one")
    p_one.add_argument("--world", required=True, choices=sorted(SETTINGS))
    p_one.add_argument("--method", required=True, choices=METHODS)
    p_one.add_argument("--seed", type=int, required=True)
    p_one.add_argument("--out", required=True)
    p_report = sub.add_parser("report")
    p_report.add_argument("--out", default="runs/experiments/drakes")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    elif args.command == "one":
        one(args.world, args.method, args.seed, Path(args.out))
    else:
        report(args)


if __name__ == "__main__":
    main()
