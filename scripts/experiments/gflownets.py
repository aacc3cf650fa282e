"""GFlowNets against their baselines at equal reward-call budgets, several seeds (spec ../shared/specs/gflownets.md).

    python scripts/experiments/gflownets.py run --task grid,ngrams,dna,dna_mo --seeds 0,1,2 --jobs 2
    python scripts/experiments/gflownets.py report --out runs/experiments/gflownets

Tasks and methods:

* grid — the two-objective HyperGrid (−Branin, Currin) of configs/gflownet_hypergrid_mo.yaml at side 32 (1,024
  terminals, the true front known): MOGFN-PC (TB on the Tchebycheff scalarisation, preference-conditioned),
  OP-GFN (configs/gflownet_hypergrid_op.yaml: Pareto-order loss + SubTB, replay), the preference-conditioned
  REINFORCE baseline on the same scalarised R(x|ω) (on-policy: ε = 0, no replay), and best-of-N from the
  uniform-action sampler.
* ngrams — configs/gflownet_ngrams.yaml at lengths 12–16 (the shipped 32–36 is beyond this CPU budget): the same
  four methods; OP-GFN there is objective=op with op_balance=subtb.
* dna_mo — configs/gflownet_dna.yaml as shipped (128-bp enhancers from scratch, the reward oracle's HepG2 and
  K562 activities as the two objectives, 600 updates of 32): the same four methods, and the dna task's
  pretrained and DRAKES samples (which saw the HepG2 reward only) scored on the same preference grid.
* rfp — configs/gflownet_rfp.yaml at 150 updates (2,400 reward calls): up to 6 mutations of 2VAD's native RFP,
  predicted stability vs ProteinMPNN naturalness; the same four methods, plus the held-out stability oracle's
  score of the evaluation designs.
* dna — RTB (configs/rtb_dna.yaml) against DRAKES (configs/drakes_dna.yaml, as shipped) and the pretrained model
  on the DNA world, both fine-tuning the same pretrained masked diffusion model: at DRAKES' budget (30 updates of
  16 = 480 reward calls; DRAKES' calls carry reward gradients, RTB's are black-box) and at 5× (rtb_long). All are
  sampled with the same sampler (32 steps, argmax last step) and scored as scripts/experiments/drakes.py scores
  them, plus diversity (mean pairwise Hamming distance / length).

Every GFlowNet-task method spends `batch_size × epochs` reward calls of its config; best-of-N spends the same
number: for each of the M evaluation preferences it keeps n = samples_per_preference samples, each the best of
budget / (M·n) uniform-action draws by R(x|ω). All are scored by `pipelines.gfn.evaluation` on the same
preference grid (`sample_set_metrics`: hypervolume, R2, top-10 reward and diversity per preference, modes, IGD
on the grid).

`run` starts one process per (task, method, seed), `--jobs` at a time, each writing
<out>/<task>_<method>_<seed>/result.json (skipped when it exists). `report` prints markdown tables (mean ± std
over seeds), writes <out>/summary.json and the figures docs/results/gflownets_{grid,dna_mo}_fronts.png
(seed 0's samples in objective space) and docs/results/gflownets_rtb_dna.png.
"""

from __future__ import annotations

import argparse
import importlib.util
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

GFN_METHODS = ("mogfn_tb", "op_gfn", "reinforce", "best_of_n")
DNA_METHODS = ("pretrained", "drakes", "rtb", "rtb_long")
# On the two-objective DNA task the pretrained model's and DRAKES' samples of the dna task are scored too.
PRETRAINED_SETS = ("pretrained", "drakes")
METHODS = {"grid": GFN_METHODS, "ngrams": GFN_METHODS, "dna": DNA_METHODS, "dna_mo": GFN_METHODS + PRETRAINED_SETS,
           "rfp": GFN_METHODS}

SETTINGS = {
    "grid": {"config": "configs/gflownet_hypergrid_mo.yaml", "op_config": "configs/gflownet_hypergrid_op.yaml",
             "overrides": ["task.kwargs.height=32", "epochs=1500"]},
    "ngrams": {"config": "configs/gflownet_ngrams.yaml", "op_config": None,
               "overrides": ["task.kwargs.min_length=12", "task.kwargs.max_length=16", "epochs=1000"]},
    "dna_mo": {"config": "configs/gflownet_dna.yaml", "op_config": None, "overrides": []},
    "rfp": {"config": "configs/gflownet_rfp.yaml", "op_config": None, "overrides": ["epochs=150"]},
}
RTB_LONG_EPOCHS = 150


def _drakes_experiment():
    """scripts/experiments/drakes.py as a module: the DNA world's loaders, DRAKES runs and metrics live there."""
    spec = importlib.util.spec_from_file_location("drakes_experiment", ROOT / "scripts/experiments/drakes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gfn_config(task: str, method: str, seed: int, folder: Path):
    from genalign.config import build_config, load_yaml
    from pipelines.gflownet import GFlowNetConfig

    settings = SETTINGS[task]
    path = settings["op_config"] if method == "op_gfn" and settings["op_config"] else settings["config"]
    overrides = [*settings["overrides"], f"trainer.output_dir={folder / 'run'}", f"trainer.seed={seed}",
                 "trainer.progress=false", "eval.every=1000000", "trainer.checkpoint_every=1000000"]
    if method == "op_gfn" and not settings["op_config"]:
        overrides += ["objective=op", "op_balance=subtb"]
    if method == "reinforce":  # on-policy: no ε-exploration, no replay
        overrides += ["objective=reinforce", "epsilon=0", "replay_capacity=0", "replay_batch=0"]
    return build_config(GFlowNetConfig, load_yaml(ROOT / path), overrides)


def _best_of_n(task: str, seed: int, folder: Path):
    """Best-of-N from the uniform-action sampler at the MOGFN-PC config's reward-call budget."""
    from pipelines.gflownet import GFlowNetPipeline
    from pipelines.gfn.evaluation import evaluation_preferences, sample_set_metrics, scalarised_reward
    from pipelines.gfn.policies import sample_trajectories

    config = _gfn_config(task, "mogfn_tb", seed, folder)
    pipeline = GFlowNetPipeline(config)
    env = pipeline.env
    preferences = evaluation_preferences(pipeline.num_objectives, config.eval.preference_divisions)
    kept = config.eval.samples_per_preference
    draws = max(1, config.batch_size * config.epochs // (len(preferences) * kept))
    generator = torch.Generator().manual_seed(1_000_003 * (seed + 1))
    terminals, objectives = [], []
    for preference in preferences:
        uniforms = torch.rand(kept * draws, env.max_steps, generator=generator, dtype=torch.float64)
        x = sample_trajectories(env, pipeline.policy, uniforms, None if pipeline.condition_size == 0 else
                                torch.zeros(kept * draws, pipeline.condition_size), epsilon=1.0).terminals
        values = env.objectives(x)
        reward = scalarised_reward(values, preference[None].expand(len(values), -1), config.scalarisation)
        best = reward.reshape(kept, draws).argmax(1) + torch.arange(kept) * draws
        terminals.append(x[best])
        objectives.append(values[best])
    evaluation = sample_set_metrics(env, preferences, torch.stack(terminals), torch.stack(objectives),
                                    config.scalarisation)
    return evaluation, len(preferences) * kept * draws


def _pretrained_set(task: str, method: str, seed: int, folder: Path):
    """The dna task's samples of `method` (the pretrained model or DRAKES, one HepG2 reward) scored on the
    two-objective task: the same first n samples at every evaluation preference (they ignore ω)."""
    from pipelines.gflownet import GFlowNetPipeline
    from pipelines.gfn.evaluation import evaluation_preferences, sample_set_metrics

    source = folder.parent / f"dna_{method}_{seed}" / "samples.txt"
    if not source.exists():
        raise FileNotFoundError(f"{source} is missing: run the dna task's {method} first (--task dna)")
    config = _gfn_config(task, "mogfn_tb", seed, folder)
    env = GFlowNetPipeline(config).env
    kept = config.eval.samples_per_preference
    x = env.encode(source.read_text().split("\n")[:kept])
    preferences = evaluation_preferences(len(env.objective_names), config.eval.preference_divisions)
    m = len(preferences)
    evaluation = sample_set_metrics(env, preferences, x[None].expand(m, -1, -1), env.objectives(x)[None].expand(m, -1, -1),
                                    config.scalarisation)
    calls = json.loads((source.parent / "result.json").read_text())["reward_calls"]
    return evaluation, calls


def _gfn_run(task: str, method: str, seed: int, folder: Path) -> dict:
    from pipelines.gflownet import GFlowNetPipeline
    from pipelines.gfn.evaluation import evaluate_policy

    if method in PRETRAINED_SETS:
        evaluation, calls = _pretrained_set(task, method, seed, folder)
    elif method == "best_of_n":
        evaluation, calls = _best_of_n(task, seed, folder)
    else:
        config = _gfn_config(task, method, seed, folder)
        pipeline = GFlowNetPipeline(config)
        pipeline.train()
        evaluation, calls = evaluate_policy(pipeline, config.eval), pipeline.reward_calls
    torch.save({"preferences": evaluation.preferences, "objectives": evaluation.objectives}, folder / "samples.pt")
    metrics = {"reward_calls": calls, **evaluation.metrics}
    if task == "rfp":  # the held-out stability oracle (trained on another split) on the same designs
        from pipelines.gfn.environments import build_task

        config = _gfn_config(task, "mogfn_tb", seed, folder)
        heldout = build_task("rfp", {**config.task.kwargs, "oracle": "eval"})
        stability = heldout.objectives(evaluation.terminals.reshape(-1, evaluation.terminals.shape[-1]))[:, 0]
        metrics.update({"heldout_stability_mean": float(stability.mean()), "heldout_stability_max": float(stability.max())})
    return metrics


def _dna_run(method: str, seed: int, folder: Path) -> dict:
    from genalign.cli import load_run_config, load_run_generator

    drakes = _drakes_experiment()
    settings = drakes.SETTINGS["dna"]
    world = drakes._world("dna")
    pretrained = drakes._pretrained("dna", world)
    conditions = [""] * settings["samples"]
    seeds = [10_000 * (seed + 1) + i for i in range(len(conditions))]
    if method == "pretrained":
        model, calls = pretrained, 0
    elif method == "drakes":
        model, calls = drakes._drakes("dna", seed, False, folder)
    else:
        run_dir = folder / "run"
        epochs = RTB_LONG_EPOCHS if method == "rtb_long" else None
        overrides = [f"trainer.output_dir={run_dir}", f"trainer.seed={seed}", "trainer.progress=false",
                     "eval.every=1000000", *([f"epochs={epochs}"] if epochs else [])]
        if not list((run_dir / "checkpoints").glob("step_*")):
            cmd = [sys.executable, "-m", "genalign.cli", "finetune", "--config", "configs/rtb_dna.yaml", *overrides]
            with open(folder / "finetune.log", "w") as log:
                subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        model, _ = load_run_generator(run_dir)
        config = load_run_config(run_dir)
        calls = config.batch_size * config.epochs
    ids = model.sample(conditions, drakes._options(model, settings["steps"]), seeds=seeds, batch_size=32).outputs.cpu()
    metrics = drakes.evaluate("dna", world, pretrained, ids, conditions)
    (folder / "samples.txt").write_text("\n".join(pretrained.decode(ids)))
    return {"reward_calls": calls, "diversity": drakes._diversity(ids), **metrics}


def one(task: str, method: str, seed: int, out: Path) -> None:
    torch.set_num_threads(1)
    folder = out / f"{task}_{method}_{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    tic = time.time()
    metrics = _dna_run(method, seed, folder) if task == "dna" else _gfn_run(task, method, seed, folder)
    result = {"task": task, "method": method, "seed": seed, "seconds": time.time() - tic, **metrics}
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def run(args) -> None:
    out = Path(args.out)
    jobs = [(task, method, seed) for task in args.task.split(",") for seed in map(int, args.seeds.split(","))
            for method in (args.methods.split(",") if args.methods else METHODS[task])]
    todo = [job for job in jobs if not (out / f"{job[0]}_{job[1]}_{job[2]}" / "result.json").exists()]
    print(f"{len(todo)} of {len(jobs)} runs to do", flush=True)

    def launch(job) -> int:
        task, method, seed = job
        folder = out / f"{task}_{method}_{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "one", "--task", task, "--method", method, "--seed", str(seed),
               "--out", str(out)]
        with open(folder / "log.txt", "w") as log:
            code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
        print(f"{task} {method} seed {seed}: {'done' if code == 0 else f'failed ({code})'}", flush=True)
        return code

    # dna_mo's pretrained and DRAKES sets read the dna task's samples: they go after every other run.
    later = [job for job in todo if job[0] == "dna_mo" and job[1] in PRETRAINED_SETS]
    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(launch, [job for job in todo if job not in later]))
        codes += list(pool.map(launch, later))
    if any(codes):
        sys.exit(1)


COLUMNS = {
    "grid": ["eval_hypervolume", "eval_r2", "eval_igd", "eval_top10_reward", "eval_top10_diversity", "eval_modes",
             "reward_calls"],
    "ngrams": ["eval_hypervolume", "eval_r2", "eval_top10_reward", "eval_top10_diversity", "eval_modes",
               "reward_calls"],
    "dna_mo": ["eval_hypervolume", "eval_r2", "eval_top10_reward", "eval_top10_diversity", "eval_hepg2", "eval_k562",
               "eval_modes", "reward_calls"],
    "rfp": ["eval_hypervolume", "eval_r2", "eval_top10_reward", "eval_top10_diversity", "eval_stability",
            "eval_naturalness", "heldout_stability_mean", "eval_modes", "reward_calls"],
    "dna": ["eval_oracle_median", "reward_oracle_mean", "gold_activity_mean", "diversity", "log_likelihood_bound",
            "kmer3_correlation_top", "reward_calls"],
}


def _plots(out: Path, results: list[dict], docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.gfn.environments import HyperGrid
    from rewards.pareto import non_dominated_mask

    for task, names, true_front in (("grid", ("−Branin (scaled)", "Currin (scaled)"), True),
                                    ("dna_mo", ("HepG2 (scaled)", "K562 (scaled)"), False)):
        mine = sorted((r for r in results if r["task"] == task and r["seed"] == 0),
                      key=lambda r: METHODS[task].index(r["method"]))
        if not mine:
            continue
        figure, axes = plt.subplots(1, len(mine), figsize=(3.4 * len(mine), 3.3), squeeze=False, sharex=True, sharey=True)
        if true_front:
            env = HyperGrid(ndim=2, height=32, reward="branin_currin")
            everything = env.objectives(env.enumerate_terminals())
            front = everything[non_dominated_mask(everything)]
            front = front[torch.argsort(front[:, 0])]
        for axis, r in zip(axes[0], mine):
            samples = torch.load(out / f"{task}_{r['method']}_0" / "samples.pt")["objectives"].reshape(-1, 2)
            if true_front:
                axis.scatter(everything[:, 0], everything[:, 1], s=2, color="0.85")
                axis.plot(front[:, 0], front[:, 1], "k--", lw=1)
            axis.scatter(samples[:, 0], samples[:, 1], s=5, alpha=0.4)
            axis.set_title(f"{r['method']}  HV {r['eval_hypervolume']:.3f}", fontsize=9)
            axis.set_xlabel(names[0])
        axes[0][0].set_ylabel(names[1])
        figure.tight_layout()
        figure.savefig(docs / f"gflownets_{task}_fronts.png", dpi=110)
        plt.close(figure)
    dna = [r for r in results if r["task"] == "dna"]
    if dna:
        figure, axes = plt.subplots(1, 2, figsize=(8, 3.4))
        for method in DNA_METHODS:
            mine = [r for r in dna if r["method"] == method]
            if mine:
                axes[0].scatter([r["diversity"] for r in mine], [r["eval_oracle_median"] for r in mine], label=method)
                axes[1].scatter([r["log_likelihood_bound"] for r in mine], [r["eval_oracle_median"] for r in mine],
                                label=method)
        axes[0].set_xlabel("diversity (mean pairwise Hamming / length)")
        axes[1].set_xlabel("ELBO under the pretrained model (nats)")
        for axis in axes:
            axis.set_ylabel("evaluation-oracle HepG2 (median)")
        axes[0].legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(docs / "gflownets_rtb_dna.png", dpi=110)
        plt.close(figure)


def report(args) -> None:
    out = Path(args.out)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    summary = {}
    for task, columns in COLUMNS.items():
        rows = [r for r in results if r["task"] == task]
        if not rows:
            continue
        print(f"\n### {task}\n")
        print("| method | seeds | " + " | ".join(columns) + " |")
        print("|---|---|" + "---|" * len(columns))
        for method in METHODS[task]:
            mine = [r for r in rows if r["method"] == method]
            if not mine:
                continue
            cells = []
            for column in columns:
                values = np.array([r.get(column, np.nan) for r in mine], dtype=float)
                summary[f"{task}/{method}/{column}"] = {"mean": values.mean(), "std": values.std(), "n": len(values)}
                cells.append(f"{values.mean():.4g} ± {values.std():.2g}" if len(values) > 1 else f"{values.mean():.4g}")
            print(f"| {method} | {len(mine)} | " + " | ".join(cells) + " |")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plots(out, results, ROOT / "docs" / "results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--task", default="grid,ngrams,dna,dna_mo")
    p_run.add_argument("--methods", default="", help="comma-separated; default: every method of the task")
    p_run.add_argument("--seeds", default="0,1,2")
    p_run.add_argument("--jobs", type=int, default=2)
    p_run.add_argument("--out", default="runs/experiments/gflownets")
    p_one = sub.add_parser("one")
    p_one.add_argument("--task", required=True, choices=sorted(METHODS))
    p_one.add_argument("--method", required=True)
    p_one.add_argument("--seed", type=int, required=True)
    p_one.add_argument("--out", required=True)
    p_report = sub.add_parser("report")
    p_report.add_argument("--out", default="runs/experiments/gflownets")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    elif args.command == "one":
        if args.method not in METHODS[args.task]:
            parser.error(f"task {args.task} has methods {', '.join(METHODS[args.task])}; got {args.method}")
        one(args.task, args.method, args.seed, Path(args.out))
    else:
        report(args)


if __name__ == "__main__":
    main()
