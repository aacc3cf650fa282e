"""Base ControlNet vs ControlNet++-style vs Ctrl-U on the shapes world, with the reward model and with a noisier
one, at equal budgets. Results in docs/results/ctrl_u.md.

    python scripts/experiments/ctrl_u.py run                           # 3 conditions × 2 reward models × 2 arms × 3 seeds
    python scripts/experiments/ctrl_u.py run --conditions edges --seeds 0 --set epochs=20
    python scripts/experiments/ctrl_u.py report                        # tables from the saved results
    python scripts/experiments/ctrl_u.py gallery --condition segmentation   # control | base | ControlNet++ | Ctrl-U | U

Every run starts from the world's base ControlNet of its condition (configs/ctrl_u_shapes_<condition>.yaml) and
sees the same training examples, timesteps and noise (trainer.seed); the arms differ only in `uncertainty`:

- ``controlnet_pp``: loss = L_diff + λ_rew·ramp·L_rew (the ControlNet++-style baseline);
- ``ctrl_u``: loss = L_diff + λ_rew·ramp·L_rew weighted by exp(−U) + λ_u·mean(U), u_scale = 1 (the paper's);
- ``ctrl_u_scaled``: the same with u_scale raised so that U is O(1) where the reward model disagrees (SCALED_U).

The reward model is the world's reward predictor (``clean``) or the same design trained on only 128 fixed scenes
(``noisy``). After training, each run and the base model sample the first 256 held-out examples with fixed seeds;
controllability is judged by the evaluation predictor (a different design, a different scene stream), image
quality by the Fréchet distance between world-CLIP features of the samples and of the examples' own renders
(torchmetrics' FID with that feature extractor; unit-norm features, so the numbers are small) and by CLIP score
against the captions. One result file per run (runs/experiments/ctrl_u/<condition>/<reward>_<arm>_seed<k>/);
a rerun skips finished runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from genalign.cli import load_run_generator  # noqa: E402
from genalign.config import build_config, load_yaml  # noqa: E402
from pipelines.ctrl_u import CtrlUConfig, CtrlUPipeline, write_control_gallery  # noqa: E402
from rewards.clip_rewards import ClipScore  # noqa: E402
from rewards.controllability import ConditionReward  # noqa: E402
from rewards.embedders import ClipImageEmbedder  # noqa: E402

WORLD = ROOT / "genalign" / "worlds" / "assets" / "shapes"
OUT = ROOT / "runs" / "experiments" / "ctrl_u"
CONDITIONS = ("segmentation", "edges", "depth")
ARMS = {"controlnet_pp": ["uncertainty=false"], "ctrl_u": ["uncertainty=true"], "ctrl_u_scaled": ["uncertainty=true"]}
# With t2 = t + 1 and shared noise the two one-step estimates barely differ: measured on 16 training examples, the
# 99th percentile of U is 3e-5 (segmentation) and 2e-3 / 1e-3 (edges / depth) at t = 200, so exp(−U) ≈ 1 and
# Ctrl-U at u_scale = 1 is the baseline. `ctrl_u_scaled` raises u_scale so that percentile is O(1).
SCALED_U = {"segmentation": 1e4, "edges": 300.0, "depth": 300.0}
REWARDS = {"clean": "reward", "noisy": "reward_noisy"}
EVAL_EXAMPLES = 256
EVAL_SEED = 90_000
METRIC = {"segmentation": "mIoU ↑", "edges": "SSIM ↑", "depth": "RMSE ↓"}


def config_for(condition: str, reward: str, arm: str, seed: int, extra: list[str]) -> CtrlUConfig:
    folder = OUT / condition / f"{reward}_{arm}_seed{seed}"
    scale = [f"uncertainty_scale={SCALED_U[condition]}"] if arm == "ctrl_u_scaled" else []
    overrides = [*ARMS[arm], *scale, f"trainer.seed={seed}", f"trainer.output_dir={folder}", "trainer.progress=false",
                 f"reward.kwargs.predictor={WORLD / 'condition' / condition / REWARDS[reward]}", *extra]
    return build_config(CtrlUConfig, load_yaml(ROOT / "configs" / f"ctrl_u_shapes_{condition}.yaml"), overrides)


class Judges:
    """What every model is measured with: the evaluation predictor, FID on world-CLIP features, CLIP score."""

    def __init__(self, pipe: CtrlUPipeline) -> None:
        self.examples = pipe.data.examples(list(range(EVAL_EXAMPLES)), "eval")
        self.seeds = [EVAL_SEED + i for i in range(EVAL_EXAMPLES)]
        self.features = ClipImageEmbedder(str(WORLD / "clip"))
        self.clip_score = ClipScore(model=str(WORLD / "clip"))

    @torch.no_grad()
    def __call__(self, pipe: CtrlUPipeline, generator, **more_judges) -> dict:
        from torchmetrics.image.fid import FrechetInceptionDistance

        rollout = generator.sample(self.examples.conditions(), pipe.options, seeds=self.seeds, batch_size=64,
                                   return_trajectory=False)
        outputs = rollout.outputs.float().cpu()
        targets = list(self.examples.target)
        fid = FrechetInceptionDistance(feature=self.features, normalize=True)
        fid.update(self.examples.samples, real=True)
        fid.update(outputs, real=False)
        return {
            **{name: judge(outputs, targets).rewards.float().tolist() for name, judge in more_judges.items()},
            "evaluation": pipe.evaluation_reward(outputs, targets).rewards.float().tolist(),
            "reward_model": pipe.reward(outputs, targets).rewards.float().tolist(),
            "fid": float(fid.compute()),
            "clip_score": float(self.clip_score(outputs, self.examples.texts).rewards.float().mean()),
        }


def run(condition: str, reward: str, arm: str, seed: int, extra: list[str], judges: dict) -> None:
    folder = OUT / condition / f"{reward}_{arm}_seed{seed}"
    if (folder / "result.json").exists():
        print(f"{condition} {reward} {arm} seed {seed}: done already")
        return
    shutil.rmtree(folder, ignore_errors=True)
    pipe = CtrlUPipeline(config_for(condition, reward, arm, seed, extra))
    tic = time.time()
    pipe.train()
    seconds = time.time() - tic
    if condition not in judges:
        judges[condition] = Judges(pipe)
    result = {"condition": condition, "reward": reward, "arm": arm, "seed": seed, "seconds": seconds,
              "updates": pipe.config.epochs, "examples_seen": pipe.config.epochs * pipe.config.batch_size,
              **judges[condition](pipe, pipe.generator)}
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    result["train"] = [{k: r[k] for k in ("step", "reward_loss", "uncertainty_mean", "diffusion_loss") if k in r}
                       for r in log if "reward_loss" in r]
    (folder / "result.json").write_text(json.dumps(result))
    print(f"{condition} {reward} {arm} seed {seed}: {seconds:.0f} s, evaluation "
          f"{np.mean(result['evaluation']):.4f}, fid {result['fid']:.4f}", flush=True)


def run_base(condition: str, extra: list[str], judges: dict) -> None:
    path = OUT / condition / "base.json"
    if path.exists():
        return
    pipe = CtrlUPipeline(config_for(condition, "clean", "ctrl_u", 0, [*extra, f"trainer.output_dir={OUT / 'base_run'}"]))
    judges[condition] = Judges(pipe)
    noisy = ConditionReward(str(WORLD / "condition" / condition / REWARDS["noisy"]), condition)
    result = judges[condition](pipe, pipe.generator, noisy_reward_model=noisy)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    print(f"{condition} base: evaluation {np.mean(result['evaluation']):.4f}, fid {result['fid']:.4f}", flush=True)


# ------------------------------------------------------------------ report


def _cell(values: list[float], digits: int = 4) -> str:
    return f"{np.mean(values):.{digits}f}" + (f" ± {np.std(values):.{digits}f}" if len(values) > 1 else "")


def report() -> str:
    lines = []
    for condition in CONDITIONS:
        base_path = OUT / condition / "base.json"
        if not base_path.exists():
            continue
        base = json.loads(base_path.read_text())
        sign = -1.0 if condition == "depth" else 1.0  # the reward is −RMSE; the tables show RMSE

        def mean(values: list[float]) -> float:
            return sign * float(np.mean(values))

        results = [json.loads(p.read_text()) for p in sorted((OUT / condition).glob("*_seed*/result.json"))]
        lines += [f"### {condition}", "",
                  f"| model | reward model | runs | updates × examples | {METRIC[condition]} (evaluation model) | "
                  "by its reward model | FID (world CLIP) | CLIP score |", "|---" * 8 + "|"]
        lines.append(f"| base ControlNet | — | 1 | — | {_cell([mean(base['evaluation'])])} | "
                     f"{_cell([mean(base['reward_model'])])} (noisy: {_cell([mean(base['noisy_reward_model'])])}) "
                     f"| {_cell([base['fid']])} | {_cell([base['clip_score']], 2)} |")
        gaps = {}
        for reward in REWARDS:
            by_arm = {}
            for arm in ARMS:
                mine = [r for r in results if r["reward"] == reward and r["arm"] == arm]
                if not mine:
                    continue
                by_arm[arm] = [mean(r["evaluation"]) for r in mine]
                lines.append(
                    f"| {arm} | {reward} | {len(mine)} | {mine[0]['updates']} × {mine[0]['examples_seen'] // mine[0]['updates']} | "
                    f"{_cell(by_arm[arm])} | {_cell([mean(r['reward_model']) for r in mine])} | "
                    f"{_cell([r['fid'] for r in mine])} | {_cell([r['clip_score'] for r in mine], 2)} |")
            for arm in ("ctrl_u", "ctrl_u_scaled"):
                if arm in by_arm and len(by_arm[arm]) == len(by_arm.get("controlnet_pp", [])):
                    gaps[(reward, arm)] = np.asarray(by_arm[arm]) - np.asarray(by_arm["controlnet_pp"])
        lines.append("")
        for (reward, arm), gap in gaps.items():
            lines.append(f"- {arm} − controlnet_pp ({reward} reward model, {METRIC[condition]}), per seed: "
                         + ", ".join(f"{g:+.4f}" for g in gap) + f"; mean {gap.mean():+.4f}")
        lines.append("")
    return "\n".join(lines)


def gallery(condition: str, seed: int, reward: str) -> Path:
    runs = {arm: OUT / condition / f"{reward}_{arm}_seed{seed}" for arm in ("controlnet_pp", "ctrl_u_scaled")}
    base, config = load_run_generator(runs["ctrl_u_scaled"], trained=False)
    models = {"base": base}
    for arm, folder in runs.items():
        models[arm], _ = load_run_generator(folder)
    pipe = CtrlUPipeline(config, generator=base)
    folder = OUT / condition / f"gallery_{reward}_seed{seed}"
    index = write_control_gallery(folder, models, pipe.data, pipe.reward, pipe.evaluation_reward, pipe.options,
                                  examples=8, samples=1, seed=EVAL_SEED, uncertainty_scale=config.uncertainty_scale,
                                  title=f"Ctrl-U on shapes {condition} ({reward} reward model, seed {seed})")
    overview(folder, ["figure", *models, f"uncertainty_{list(models)[-1]}"], examples=8)
    return index


def overview(folder: Path, columns: list[str], examples: int) -> Path:
    """One PNG of the gallery's first sample per example: a row per example, a column per grid."""
    from PIL import Image

    tiles = [[Image.open(folder / "images" / f"p{e:03d}_{column}_00.png").convert("RGB") for column in columns]
             for e in range(examples)]
    size = tiles[0][1].size
    sheet = Image.new("RGB", (size[0] * len(columns), size[1] * examples), "white")
    for e, row in enumerate(tiles):
        for c, tile in enumerate(row):
            sheet.paste(tile.resize(size, resample=Image.NEAREST), (c * size[0], e * size[1]))
    sheet.save(folder / "overview.png")
    return folder / "overview.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "report", "gallery"])
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--condition", default="segmentation", choices=CONDITIONS, help="for gallery")
    parser.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=list(REWARDS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seed", type=int, default=0, help="for gallery")
    parser.add_argument("--reward", default="clean", choices=list(REWARDS), help="for gallery")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for every run (key=value)")
    args = parser.parse_args()
    if args.command == "report":
        print(report())
        return
    if args.command == "gallery":
        print(f"gallery: {gallery(args.condition, args.seed, args.reward)}")
        return
    judges: dict = {}
    for condition in args.conditions:
        run_base(condition, args.set, judges)
        for seed in args.seeds:
            for reward in args.rewards:
                for arm in args.arms:
                    run(condition, reward, arm, seed, args.set, judges)


if __name__ == "__main__":
    main()
