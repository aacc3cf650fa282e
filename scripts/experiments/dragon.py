"""DRAGON on the tones world (and once on the shapes world): five target rewards of the three kinds, win rates against
the base model on held-out prompts, FAD to the held-out exemplar half, CLAP score and gold accuracy; DPO vs KTO and
paired vs unpaired as an ablation. Results in docs/results/dragon.md.

    python scripts/experiments/dragon.py                          # everything: ~50 min on a quiet 2-core machine
    python scripts/experiments/dragon.py --only clap --seeds 0    # one run
    python scripts/experiments/dragon.py --report                 # the tables from the saved results

Each run fine-tunes the base model with one shipped config (configs/dragon_*.yaml; the seed and the output folder
are the only overrides) and then samples the held-out prompts (configs/prompts/tones_eval.txt) with fixed seeds,
once with the fine-tuned model and once with the base model (the generator's `reference()`, the LoRA adapter
switched off), so every comparison is paired: same prompt, same initial noise. Every run is scored by every
reward:

- instance and instance-to-distribution rewards: the win rate is the fraction of (prompt, seed) pairs where the
  fine-tuned clip scores higher than the base clip (ties count half);
- set rewards (dataset FAD, Vendi): one value per set, so the win rate is the fraction of 200 paired random halves
  of the held-out clips (the same clips on both sides) on which the fine-tuned half scores higher.

FAD to the evaluation half of the exemplars (which no reward sees) is the Fréchet distance between the held-out
clips' CLAP embeddings and those of the 32 evaluation exemplars. Results are saved after every run
(runs/experiments/dragon/results.json); a rerun skips the runs already there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import genalign.generators.griffin_lim  # noqa: E402,F401  (diffusers finds the vocoder class by its module)
from genalign.config import build_config, load_yaml  # noqa: E402
from pipelines import get_pipeline  # noqa: E402
from rewards import build_reward  # noqa: E402

TONES = ROOT / "genalign" / "worlds" / "assets" / "tones"
RUNS = {  # name: (world, config, overrides)
    "clap": ("tones", "dragon_tones.yaml", []),
    "aesthetic": ("tones", "dragon_tones_aesthetic.yaml", []),
    "exemplar_fd": ("tones", "dragon_tones_exemplar_fd.yaml", []),
    "dataset_fd": ("tones", "dragon_tones_dataset_fd.yaml", []),
    "vendi": ("tones", "dragon_tones_vendi.yaml", []),
    # Ablation on the CLAP score: the loss and the pairing. KTO's beta: Diffusion-KTO's 5000 scale for errors ~1e-4.
    "clap_dpo_unpaired": ("tones", "dragon_tones.yaml", ["construction=unpaired", "positive_fraction=0.25"]),
    "clap_kto_paired": ("tones", "dragon_tones.yaml", ["loss=kto", "beta=5000"]),
    "clap_kto_unpaired": ("tones", "dragon_tones.yaml", ["loss=kto", "beta=5000", "construction=unpaired"]),
    "shapes_clip": ("shapes", "dragon_shapes.yaml", []),
}
TONES_REWARDS = {  # evaluation rewards: name -> (config that defines it, kind)
    "clap": ("dragon_tones.yaml", "instance"),
    "aesthetic": ("dragon_tones_aesthetic.yaml", "instance"),
    "exemplar_fd": ("dragon_tones_exemplar_fd.yaml", "instance_to_distribution"),
    "dataset_fd": ("dragon_tones_dataset_fd.yaml", "distribution_to_distribution"),
    "vendi": ("dragon_tones_vendi.yaml", "distribution_to_distribution"),
}
SHAPES_REWARDS = {"clip": ("dragon_shapes.yaml", "instance")}
EVAL_SEEDS = (0, 1)  # clips per held-out prompt
HALVES = 200


def reward_from(config_name: str):
    spec = load_yaml(ROOT / "configs" / config_name)["reward"]
    return build_reward(spec["name"], **(spec.get("kwargs") or {}))


def sample(pipe, prompts: list[str], reference: bool):
    texts = [p for p in prompts for _ in EVAL_SEEDS]
    seeds = [10_000 + 97 * i + s for i in range(len(prompts)) for s in EVAL_SEEDS]
    gen = pipe.generator
    with torch.no_grad():
        if reference:
            with gen.reference():
                out = gen.sample(texts, pipe.options, seeds=seeds, batch_size=pipe.config.sampling.batch_size,
                                 return_trajectory=False)
        else:
            out = gen.sample(texts, pipe.options, seeds=seeds, batch_size=pipe.config.sampling.batch_size,
                             return_trajectory=False)
    return out.outputs.detach().cpu(), texts


def win_rates(rewards: dict, kinds: dict, tuned, base, texts) -> dict:
    """Per reward: the tuned and base means (or set values) and the paired win rate of tuned over base."""
    out = {}
    rng = np.random.default_rng(0)
    halves = [rng.choice(len(texts), len(texts) // 2, replace=False) for _ in range(HALVES)]
    for name, reward in rewards.items():
        with torch.no_grad():
            if kinds[name] == "distribution_to_distribution":
                emb_t, emb_b = reward.embed(tuned), reward.embed(base)
                value_t, value_b = float(reward.set_score(emb_t)), float(reward.set_score(emb_b))
                wins = [float(reward.set_score(emb_t[h]) > reward.set_score(emb_b[h])) for h in halves]
            else:
                score_t = reward(tuned, texts).rewards.double().cpu().numpy()
                score_b = reward(base, texts).rewards.double().cpu().numpy()
                value_t, value_b = float(score_t.mean()), float(score_b.mean())
                wins = list((score_t > score_b) + 0.5 * (score_t == score_b))
        out[name] = {"tuned": value_t, "base": value_b, "win_rate": float(np.mean(wins))}
    return out


def gold_metrics(pipe, outputs, texts) -> dict:
    verdicts = pipe.gold(outputs, texts)
    return {k: float(v.float().mean()) for k, v in verdicts.items()}


def evaluate_run(name: str, pipe, world: str, cache: dict) -> dict:
    prompts = pipe.eval_prompts
    tuned, texts = sample(pipe, prompts, reference=False)
    if world not in cache:  # the base model's clips are the same for every run of a world
        cache[world] = sample(pipe, prompts, reference=True)
    base, _ = cache[world]
    specs = TONES_REWARDS if world == "tones" else SHAPES_REWARDS
    rewards = {k: reward_from(cfg) for k, (cfg, _) in specs.items()}
    result = {"rewards": win_rates(rewards, {k: kind for k, (_, kind) in specs.items()}, tuned, base, texts),
              "gold_tuned": gold_metrics(pipe, tuned, texts), "gold_base": gold_metrics(pipe, base, texts)}
    if world == "tones":
        fad = build_reward("batch_fd", embedder={"name": "clap_audio", "kwargs": {"model": str(TONES / "clap"),
                                                                                "sampling_rate": 16000}},
                           reference_embeddings=str(TONES / "exemplars" / "eval"))
        with torch.no_grad():
            result["fad_eval_exemplars"] = {"tuned": -float(fad.set_score(fad.embed(tuned))),
                                            "base": -float(fad.set_score(fad.embed(base)))}
        cache_stats = rewards["dataset_fd"].embeddings
        result["embedding_cache"] = {"calls": cache_stats.calls, "hits": cache_stats.hits, "misses": cache_stats.misses}
    return result


def run(name: str, seed: int, out_dir: Path, cache: dict, extra: list[str]) -> dict:
    world, config_name, overrides = RUNS[name]
    data = load_yaml(ROOT / "configs" / config_name)
    cls = get_pipeline(data["pipeline"])
    run_dir = out_dir / f"{name}_s{seed}"
    config = build_config(cls.config_class, data, [*overrides, f"trainer.seed={seed}", f"trainer.output_dir={run_dir}",
                                                   "trainer.progress=false", "trainer.checkpoint_every=0",
                                                   "eval.every=1000", *extra])
    pipe = cls(config)
    tic = time.time()
    pipe.train()
    train_s = time.time() - tic
    result = evaluate_run(name, pipe, world, cache)
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["reward_mean"] for r in log if "reward_mean" in r]
    result.update(name=name, seed=seed, world=world, config=config_name, overrides=overrides, train_s=train_s,
                  eval_s=time.time() - tic - train_s, train_reward_first=train[0], train_reward_last=train[-1])
    return result


def report(results: list[dict]) -> str:
    """Markdown tables: mean ± std over seeds of each run's win rates and metrics."""
    def stat(values):
        values = np.asarray(values, dtype=float)
        return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values.mean():.3f}"

    lines = []
    for world, specs in (("tones", TONES_REWARDS), ("shapes", SHAPES_REWARDS)):
        names = [n for n in RUNS if RUNS[n][0] == world and any(r["name"] == n for r in results)]
        if not names:
            continue
        extra = ["FAD→eval exemplars (base → tuned)"] if world == "tones" else []
        head = ["run (target)", "seeds", *[f"win: {k}" for k in specs], *extra, "gold all-correct (base → tuned)"]
        lines += [f"### {world}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for n in names:
            rs = [r for r in results if r["name"] == n]
            row = [n, str(len(rs)), *[stat([r["rewards"][k]["win_rate"] for r in rs]) for k in specs]]
            if world == "tones":
                row.append(f"{np.mean([r['fad_eval_exemplars']['base'] for r in rs]):.4f} → "
                           f"{stat([r['fad_eval_exemplars']['tuned'] for r in rs])}")
            row.append(f"{np.mean([r['gold_base']['all_correct'] for r in rs]):.3f} → "
                       f"{stat([r['gold_tuned']['all_correct'] for r in rs])}")
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", f"Reward values, base → tuned (mean over seeds), {world}:", "",
                  "| run | " + " | ".join(specs) + " |", "|" + "---|" * (len(specs) + 1)]
        for n in names:
            rs = [r for r in results if r["name"] == n]
            cells = [f"{np.mean([r['rewards'][k]['base'] for r in rs]):.4g} → "
                     f"{np.mean([r['rewards'][k]['tuned'] for r in rs]):.4g}" for k in specs]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(RUNS), default=None)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--shapes-seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "experiments" / "dragon"))
    parser.add_argument("--report", action="store_true", help="print the tables of the saved results and exit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every run (e.g. epochs=1 for a smoke test)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    results = json.loads(path.read_text()) if path.exists() else []
    if not args.report:
        cache: dict = {}
        for name in args.only or list(RUNS):
            for seed in (args.shapes_seeds if RUNS[name][0] == "shapes" else args.seeds):
                if any(r["name"] == name and r["seed"] == seed for r in results):
                    continue
                result = run(name, seed, out_dir, cache, args.set)
                results.append(result)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(results, indent=1))
                tmp.replace(path)
                wins = {k: round(v["win_rate"], 3) for k, v in result["rewards"].items()}
                print(f"{name} seed {seed}: win rates {wins}, train {result['train_s']:.0f} s", flush=True)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
