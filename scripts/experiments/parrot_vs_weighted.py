"""Parrot vs a fixed weighted sum on the shapes world, at equal sample budgets. Results in docs/results/parrot.md.

    python scripts/experiments/parrot_vs_weighted.py run --set eval.every=1000  # 3 arms × 3 seeds, ~5 min per run
    python scripts/experiments/parrot_vs_weighted.py run --arms parrot_pen --seeds 0 --set epochs=5
    python scripts/experiments/parrot_vs_weighted.py report                    # tables from the saved results

Arms, all from configs/parrot_shapes.yaml (four rewards stacked: CLIP score, aesthetic head, JPEG
compressibility, colourfulness; the same prompts, seeds, learning rates and sample budget):

- ``parrot_t2i``: Parrot without the PEN: batch-wise Pareto selection, the T2I model samples from the short prompt;
- ``parrot_pen``: Parrot with the world's PEN trained jointly; evaluation samples with the PEN's expansion (all four
  reward identifiers) and original-prompt-centred guidance;
- ``weighted``: the same policy gradient on every sample with an equal-weight sum of the (per-prompt standardised)
  rewards, no PEN.

After training, each run samples the evaluation prompts with fixed seeds, and the base model is sampled the same way
(and with the base PEN's expansions), so every arm is compared on the same prompts and noise. Each sample gets the
four rewards and the gold judge's verdict against the *short* prompt the user wrote. Hypervolume is computed on the
rewards in units of the base model's per-reward standard deviation around its mean, with the corner at −3 in each,
over all of an arm's evaluation samples; per-batch non-dominated fractions come from the training logs.
One result file per run (runs/experiments/parrot/<arm>_seed<k>/result.json); a rerun skips finished runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from genalign.config import build_config, load_yaml  # noqa: E402
from genalign.engine import build_gold, build_reward  # noqa: E402
from genalign.generators.base import Conditions  # noqa: E402
from pipelines.parrot import ParrotConfig, ParrotPipeline  # noqa: E402
from rewards.pareto import hypervolume, non_dominated_mask  # noqa: E402

CONFIG = ROOT / "configs" / "parrot_shapes.yaml"
OUT = ROOT / "runs" / "experiments" / "parrot"
ARMS = {
    "parrot_t2i": ["pen.pretrained=null", "sampling.expansion_guidance_scale=null"],
    "parrot_pen": [],
    "weighted": ["selection=all", "pen.pretrained=null", "sampling.expansion_guidance_scale=null"],
}
EVAL_SEEDS = 4  # samples per evaluation prompt
HV_CORNER = -3.0


def config_for(arm: str, seed: int, extra: list[str]) -> ParrotConfig:
    overrides = [*ARMS[arm], f"trainer.seed={seed}", f"trainer.output_dir={OUT / f'{arm}_seed{seed}'}",
                 "trainer.progress=false", "gallery_prompts=8", *extra]
    return build_config(ParrotConfig, load_yaml(CONFIG), overrides)


def score(pipe: ParrotPipeline, prompts: list[str], conditions: Conditions, options, seeds: list[int]) -> dict:
    """Rewards [N, K] and gold verdicts of samples from `conditions`, against the user's `prompts`."""
    with torch.no_grad():
        rollout = pipe.generator.sample(conditions, options, seeds=seeds, batch_size=64, return_trajectory=False)
        rewards = pipe.reward(rollout.outputs, prompts).rewards.float().reshape(len(seeds), -1).cpu()
    verdicts = pipe.gold(rollout.outputs, prompts)
    return {"rewards": rewards.tolist(), "gold": {k: v.float().tolist() for k, v in verdicts.items()}}


def evaluation_set(pipe: ParrotPipeline) -> tuple[list[str], list[int]]:
    prompts = [p for p in pipe.eval_prompts for _ in range(EVAL_SEEDS)]
    return prompts, [50_000 + i for i in range(len(prompts))]


def evaluate_pipe(pipe: ParrotPipeline) -> dict:
    """The arm's own inference (with its PEN and centred guidance when it has one), and for the PEN arm also
    the expansion alone."""
    prompts, seeds = evaluation_set(pipe)
    out = {}
    if pipe.pen is None:
        out["model"] = score(pipe, prompts, Conditions(texts=prompts), pipe.options, seeds)
        return out
    centred = pipe.inference_conditions(prompts, seeds)
    out["model"] = score(pipe, prompts, centred, pipe.options, seeds)
    out["expansion_only"] = score(pipe, prompts, Conditions(texts=centred.expanded_texts), pipe.train_options, seeds)
    out["model"]["expansions"] = centred.expanded_texts
    return out


def run(arm: str, seed: int, extra: list[str]) -> None:
    folder = OUT / f"{arm}_seed{seed}"
    if (folder / "result.json").exists():
        print(f"{arm} seed {seed}: done already")
        return
    if (folder / "checkpoints").exists():
        import shutil

        shutil.rmtree(folder)
    config = config_for(arm, seed, extra)
    pipe = ParrotPipeline(config)
    tic = time.time()
    pipe.train()
    seconds = time.time() - tic
    result = {"arm": arm, "seed": seed, "seconds": seconds, "objectives": list(pipe.reward.objectives),
              **evaluate_pipe(pipe)}
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    result["train"] = [{k: r[k] for k in r if k.startswith(("reward_mean", "pareto_fraction", "selected"))}
                       for r in log if r["step"] >= 0]
    result["samples"] = len(result["train"]) * config.prompts_per_epoch * config.samples_per_prompt
    (folder / "result.json").write_text(json.dumps(result))
    print(f"{arm} seed {seed}: {seconds:.0f} s")


def run_base(extra: list[str]) -> None:
    """The base model on the evaluation set: plain prompts, and the untrained PEN with centred guidance."""
    path = OUT / "base.json"
    if path.exists():
        return
    config = config_for("parrot_pen", 0, [*extra, f"trainer.output_dir={OUT / 'base_run'}"])
    pipe = ParrotPipeline(config)
    prompts, seeds = evaluation_set(pipe)
    centred = pipe.inference_conditions(prompts, seeds)
    # Plain prompts: CFG only (train_options carry no expansion guidance).
    result = {"model": score(pipe, prompts, Conditions(texts=prompts), pipe.train_options, seeds),
              "base_pen": score(pipe, prompts, centred, pipe.options, seeds),
              "base_pen_expansion_only": score(pipe, prompts, Conditions(texts=centred.expanded_texts), pipe.train_options,
                                               seeds)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))


# ------------------------------------------------------------------ report


def summarise(block: dict, mean: np.ndarray, std: np.ndarray) -> dict:
    rewards = np.asarray(block["rewards"])
    z = (rewards - mean) / std
    gold = {k: float(np.mean(v)) for k, v in block["gold"].items()}
    return {
        "rewards": rewards.mean(0),
        "hv": hypervolume(torch.as_tensor(np.maximum(z, HV_CORNER + 1e-9)), torch.full((z.shape[1],), HV_CORNER)),
        "front_fraction": float(non_dominated_mask(torch.as_tensor(rewards)).double().mean()),
        "gold": gold,
    }


def report() -> str:
    base = json.loads((OUT / "base.json").read_text())
    base_rewards = np.asarray(base["model"]["rewards"])
    mean, std = base_rewards.mean(0), base_rewards.std(0)
    results = [json.loads(p.read_text()) for p in sorted(OUT.glob("*_seed*/result.json"))]
    objectives = results[0]["objectives"]
    lines = ["| model | runs | samples | " + " | ".join(objectives) + " | hypervolume | gold all-correct | gold shape "
             "| gold colour | gold position | train front fraction |",
             "|---" * (len(objectives) + 9) + "|"]

    def row(name: str, summaries: list[dict], runs: int, samples: str, front: str) -> str:
        def cell(values: list[float], digits: int = 3) -> str:
            return f"{np.mean(values):.{digits}f}" + (f" ± {np.std(values):.{digits}f}" if len(values) > 1 else "")

        rewards = [cell([s["rewards"][k] for s in summaries]) for k in range(len(objectives))]
        gold = [cell([s["gold"][key] for s in summaries]) for key in ("all_correct", "shape", "colour", "position")]
        return (f"| {name} | {runs} | {samples} | " + " | ".join(rewards) + f" | {cell([s['hv'] for s in summaries], 1)} | "
                + " | ".join(gold) + f" | {front} |")

    lines.append(row("base", [summarise(base["model"], mean, std)], 1, "—", "—"))
    lines.append(row("base + untrained PEN, centred guidance", [summarise(base["base_pen"], mean, std)], 1, "—", "—"))
    lines.append(row("base + untrained PEN, expansion only", [summarise(base["base_pen_expansion_only"], mean, std)],
                     1, "—", "—"))
    for arm in ARMS:
        mine = [r for r in results if r["arm"] == arm]
        if not mine:
            continue
        front = [np.mean([t["pareto_fraction"] for t in r["train"]]) for r in mine]
        samples = str(mine[0]["samples"])
        lines.append(row(arm, [summarise(r["model"], mean, std) for r in mine], len(mine), samples,
                         f"{np.mean(front):.2f}"))
        if "expansion_only" in mine[0]:
            lines.append(row(f"{arm}, expansion only (no centred guidance)",
                             [summarise(r["expansion_only"], mean, std) for r in mine], len(mine), samples, "—"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for every run (key=value)")
    args = parser.parse_args()
    if args.command == "report":
        print(report())
        return
    run_base(args.set)
    for seed in args.seeds:
        for arm in args.arms:
            run(arm, seed, args.set)


if __name__ == "__main__":
    main()
