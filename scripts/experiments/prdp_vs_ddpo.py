"""PRDP vs DDPO on the shapes world: a small prompt set and a large one, several seeds, equal sample budgets.

    python scripts/experiments/prdp_vs_ddpo.py run --out runs/experiments/prdp_vs_ddpo --jobs 2 --threads 1
    python scripts/experiments/prdp_vs_ddpo.py report --out runs/experiments/prdp_vs_ddpo --plots docs/results

`run` launches one `genalign finetune` process per (setting, method, seed), `--jobs` at a time, each run in
its own folder with its own log; a finished run (its last checkpoint written) is skipped when run again,
and `--deadline` stops what is still running after that many seconds (its metrics so far stay usable).
Both methods draw the same N prompts × B images per epoch for the same number of epochs:
- small: 16 training captions (configs/prompts/shapes_small16.txt), evaluated on those captions;
- large: 2,000 generated captions, evaluated on 256 held-out ones (configs/prompts/shapes_eval.txt).
PRDP runs configs/prdp_shapes{_small}.yaml; DDPO runs configs/ddpo_shapes.yaml made to match (all timesteps,
the same prompts, N, B and evaluation). `report` compares the runs at the last evaluation all runs reached:
a markdown table (mean ± std over seeds) on stdout, a JSON summary and curve plots.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("prdp", "ddpo")
SETTINGS = ("small", "large")

_EVAL = {
    "small": ["prompts.file=configs/prompts/shapes_small16.txt", "prompts.eval_file=null", "eval.samples_per_prompt=4"],
    "large": ["prompts.file=configs/prompts/shapes_train.txt", "prompts.eval_file=configs/prompts/shapes_eval.txt",
              "eval.samples_per_prompt=1"],
}
_DDPO = {
    # Across epochs each small-set caption comes back, so DDPO keeps its per-prompt reward history (its
    # default); the large set's captions rarely repeat, so advantages use the epoch's own group of B.
    "small": ["stat_buffer_size=32", "stat_min_count=16"],
    "large": ["stat_buffer_size=32", "stat_min_count=8"],
}


def run_command(
    setting: str,
    method: str,
    seed: int,
    epochs: int,
    eval_every: int,
    out: Path,
    extra: list[str] = (),
    ddpo_updates: int = 1,
) -> list[str]:
    """The `genalign finetune` command line of one run."""
    config = {
        ("small", "prdp"): "configs/prdp_shapes_small.yaml",
        ("large", "prdp"): "configs/prdp_shapes.yaml",
    }.get((setting, method), "configs/ddpo_shapes.yaml")
    overrides = [
        f"trainer.output_dir={out}",
        f"trainer.seed={seed}",
        "trainer.progress=false",
        f"trainer.checkpoint_every={eval_every}",
        "trainer.resume=latest",
        f"epochs={epochs}",
        f"eval.every={eval_every}",
        "prompts_per_epoch=16",
        "samples_per_prompt=8",
        *_EVAL[setting],
    ]
    if method == "ddpo":
        overrides += ["timestep_fraction=1.0", "train_batch_size=32", f"updates_per_epoch={ddpo_updates}",
                      *_DDPO[setting]]
    overrides += list(extra)
    return [sys.executable, "-m", "genalign.cli", "finetune", "--config", config, *overrides]


def run_dir(out: Path, setting: str, method: str, seed: int) -> Path:
    return out / f"{setting}_{method}_seed{seed}"


def finished(path: Path, epochs: int) -> bool:
    return (path / "checkpoints" / f"step_{epochs - 1:06d}" / "trainer_state.json").exists()


def cmd_run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    epochs = {"small": args.epochs_small, "large": args.epochs_large}
    queue = [
        (setting, method, seed)
        for seed in args.seeds
        for setting in args.settings
        for method in args.methods
        if not finished(run_dir(out, setting, method, seed), epochs[setting])
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    start = time.time()
    running: list[tuple[subprocess.Popen, tuple, object]] = []
    failed = []
    print(f"{len(queue)} runs to do, {args.jobs} at a time", flush=True)
    while queue or running:
        while queue and len(running) < args.jobs:
            key = queue.pop(0)
            path = run_dir(out, *key)
            path.mkdir(parents=True, exist_ok=True)
            log = open(path / "run.log", "a")
            command = run_command(*key, epochs[key[0]], args.eval_every, path, args.set, args.ddpo_updates)
            running.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), key, log))
            print(f"[{time.time() - start:6.0f}s] start {key}", flush=True)
        time.sleep(2)
        for item in list(running):
            process, key, log = item
            if process.poll() is not None:
                running.remove(item)
                log.close()
                status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
                if process.returncode:
                    failed.append(key)
                print(f"[{time.time() - start:6.0f}s] {status} {key}", flush=True)
        if args.deadline and time.time() - start > args.deadline:
            for process, key, log in running:
                process.terminate()
                process.wait()
                log.close()
                print(f"[{time.time() - start:6.0f}s] stopped at the deadline {key}", flush=True)
            print(f"deadline: {len(queue)} runs not started", flush=True)
            break
    return 1 if failed else 0


def read_log(path: Path) -> list[dict]:
    file = path / "metrics.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []


def summarise(out: Path, settings, seeds, train_window: int = 5) -> dict:
    """Per setting and method: base, and per-seed values at the last evaluation every run of the setting reached."""
    summary: dict = {}
    for setting in settings:
        logs = {(m, s): read_log(run_dir(out, setting, m, s)) for m in METHODS for s in seeds}
        logs = {k: v for k, v in logs.items() if v}
        if not logs:
            continue
        evaluated = [max(r["step"] for r in log if "eval_reward_mean" in r) for log in logs.values()]
        at = min(evaluated)
        first = next(iter(logs.values()))[0]
        entry = {"epoch": at + 1, "base": {k: first[k] for k in first if k.startswith("eval_")}, "runs": {}}
        for (method, seed), log in logs.items():
            final = next(r for r in log if r["step"] == at and "eval_reward_mean" in r)
            train = [r["reward_mean"] for r in log if 0 <= r["step"] <= at and "reward_mean" in r]
            entry["runs"].setdefault(method, {})[seed] = {
                "train_reward_first": float(np.mean(train[:train_window])),
                "train_reward_last": float(np.mean(train[-train_window:])),
                **{k: final[k] for k in final if k.startswith("eval_")},
            }
        summary[setting] = entry
    return summary


_COLUMNS = [
    ("train_reward_last", "train CLIP (last 5 epochs)"),
    ("eval_reward_mean", "eval CLIP"),
    ("eval_gold_all_correct", "gold all-correct"),
    ("eval_gold_shape", "gold shape"),
    ("eval_gold_colour", "gold colour"),
    ("eval_gold_position", "gold position"),
]


def table(summary: dict) -> str:
    lines = []
    for setting, entry in summary.items():
        lines.append(f"\n**{setting} prompt set**, after {entry['epoch']} epochs "
                     f"({entry['epoch'] * 128:,} samples per run):\n")
        lines.append("| model | " + " | ".join(name for _, name in _COLUMNS) + " |")
        lines.append("|---" * (len(_COLUMNS) + 1) + "|")
        base = entry["base"]
        first_train = [v["train_reward_first"] for runs in entry["runs"].values() for v in runs.values()]
        cells = [f"{np.mean(first_train):.2f} (first 5 epochs)"] + [
            f"{base[key]:.3f}" if key in base else "–" for key, _ in _COLUMNS[1:]]
        lines.append("| base | " + " | ".join(cells) + " |")
        for method, runs in entry["runs"].items():
            cells = []
            for key, _ in _COLUMNS:
                values = [v[key] for v in runs.values() if key in v]
                precision = 2 if "reward" in key else 3
                cells.append(f"{np.mean(values):.{precision}f} ± {np.std(values):.{precision}f}" if values else "–")
            lines.append(f"| {method.upper()} ({len(runs)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(out: Path, settings, seeds, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for setting in settings:
        panels = [("reward_mean", "training CLIP score"), ("eval_reward_mean", "eval CLIP score"),
                  ("eval_gold_all_correct", "eval gold all-correct")]
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        for ax, (key, title) in zip(axes, panels):
            for method, colour in zip(METHODS, ("tab:blue", "tab:orange")):
                curves = []
                for seed in seeds:
                    log = read_log(run_dir(out, setting, method, seed))
                    points = [(r["step"] + 1, r[key]) for r in log if key in r]
                    if points:
                        curves.append(points)
                for i, points in enumerate(curves):
                    x, y = zip(*points)
                    if key == "reward_mean":  # noisy per epoch: a 5-epoch running mean
                        window = min(5, len(y))
                        y = np.convolve(y, np.ones(window) / window, mode="valid")
                        x = x[window - 1 :]
                    ax.plot(x, y, color=colour, alpha=0.8, lw=1.2, label=method.upper() if i == 0 else None)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"PRDP vs DDPO on the shapes world: {setting} prompt set (one line per seed)")
        fig.tight_layout()
        path = folder / f"prdp_vs_ddpo_{setting}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def cmd_report(args: argparse.Namespace) -> int:
    out = Path(args.out)
    summary = summarise(out, args.settings, args.seeds)
    if not summary:
        print(f"no runs with metrics under {out}; run the experiment first", file=sys.stderr)
        return 1
    print(table(summary))
    if args.plots:
        for path in plot(out, args.settings, args.seeds, Path(args.plots)):
            print(f"wrote {path}")
        json_path = Path(args.plots) / "prdp_vs_ddpo.json"
        json_path.write_text(json.dumps(summary, indent=1))
        print(f"wrote {json_path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--out", default="runs/experiments/prdp_vs_ddpo")
        p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
        p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    run = sub.choices["run"]
    run.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    run.add_argument("--epochs-small", type=int, default=30)
    run.add_argument("--epochs-large", type=int, default=60)
    run.add_argument("--eval-every", type=int, default=10)
    run.add_argument("--jobs", type=int, default=1, help="runs at a time")
    run.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    run.add_argument("--ddpo-updates", type=int, default=1,
                     help="DDPO's PPO updates per epoch (1: the same update count as PRDP's K = 1; 2: DDPO's own setting)")
    run.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run (smoke tests)")
    run.add_argument("--deadline", type=float, default=0, help="stop everything after this many seconds (0: never)")
    sub.choices["report"].add_argument("--plots", default=None, help="folder for the plots and JSON summary")
    args = parser.parse_args(argv)
    return cmd_run(args) if args.command == "run" else cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
