"""Ctrl-U learns on the shapes world, through the shipped config and the command line's gallery.

What Ctrl-U optimises is the reward model's reading of the one-step estimate x̂_0 of noised training data
(t ≤ t_max). On held-out examples at fixed timesteps and noise that reading is a low-noise measurement, so the
learning test asserts it: it must rise over the base ControlNet and end above a control run that is identical
but for λ_rew = 0 (the diffusion loss alone), and the evaluation model's controllability of held-out *samples*
(the gold here) must not fall. Held-out sampled controllability moves by about ±0.02 per 60 updates and seed
on this world (docs/results/ctrl_u.md), too little for a test of its rise."""

from pathlib import Path

import pytest
import torch

from genalign.cli import main
from genalign.config import build_config, load_yaml
from pipelines.ctrl_u import CtrlUConfig, CtrlUPipeline

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ctrl_u_shapes_segmentation.yaml"
WORLD = ROOT / "genalign" / "worlds" / "assets" / "shapes"
UPDATES = 40

pytestmark = pytest.mark.skipif(not (WORLD / "controlnet").exists(), reason="the committed shapes world lacks Ctrl-U's parts")


@torch.no_grad()
def one_step_controllability(pipe: CtrlUPipeline, count: int = 64, timesteps: tuple[int, ...] = (100, 300)) -> float:
    """Mean mIoU, by the reward model, of x̂_0 from the first `count` held-out examples noised at `timesteps`."""
    examples = pipe.data.examples(list(range(count)), "eval")
    seeds = [70_000 + i for i in range(count)]
    clean = pipe.generator.encode(examples.samples, seeds=seeds)
    scores = []
    for t in timesteps:
        noise = torch.stack([torch.randn(clean.shape[1:], generator=torch.Generator().manual_seed(s + t)) for s in seeds])
        outputs = pipe.generator.noised_prediction(clean, examples.conditions(), torch.full((count,), t), noise).outputs
        scores.append(pipe.reward(outputs, list(examples.target)).rewards.mean())
    return float(torch.stack(scores).mean())


def _train(folder: Path, *overrides: str) -> tuple[CtrlUPipeline, float, float, list[dict]]:
    import json

    config = build_config(CtrlUConfig, load_yaml(CONFIG), [
        f"trainer.output_dir={folder}", f"epochs={UPDATES}", f"eval.every={UPDATES}", "eval_examples=32",
        f"trainer.checkpoint_every={UPDATES}", "trainer.progress=false", "ramp_updates=0",
        *overrides])
    pipe = CtrlUPipeline(config)
    before = one_step_controllability(pipe)
    pipe.train()
    after = one_step_controllability(pipe)
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return pipe, before, after, [r for r in log if "eval_controllability" in r]


def test_ctrl_u_raises_what_it_optimises_beyond_the_diffusion_loss_and_gold_does_not_fall(tmp_path, capsys):
    """Fails if the reward term does not reach the ControlNet (detached x̂_0, a wrong sign, the t_max mask
    inverted), or if it buys the rise by breaking held-out control. Measured (trainer seed 0, 40 updates × 16):
    one-step mIoU 0.7325 → 0.7430, control 0.7247; gold 0.5768 → 0.5842. With λ_rew = 5 the one-step reading
    rose too but gold fell to 0.5516: the reward model was being gamed.

    Other trainer seeds (measured 2026-12-04): seed 1 one-step 0.7480, control 0.7316, gold 0.5546; seed 2
    one-step 0.7384, control 0.7232, gold 0.5713. The one-step assertions hold on all three; the gold bound
    fails on seed 1. On 32 held-out samples it is at the noise floor: it catches a collapse, not a small loss."""
    _, before, after, evals = _train(tmp_path / "ctrl_u")
    _, control_before, control_after, _ = _train(tmp_path / "control", "reward_weight=0")
    print(f"one-step: base {before:.4f}, ctrl_u {after:.4f}, control {control_after:.4f}; gold {evals[0]['eval_controllability']:.4f} -> {evals[-1]['eval_controllability']:.4f}")
    assert control_before == before  # the same base, examples and noise
    assert after > before + 0.005, (before, after)
    assert after > control_after + 0.01, (after, control_after)
    start, end = evals[0]["eval_controllability"], evals[-1]["eval_controllability"]
    assert end > start - 0.02, (start, end)

    # The command line's gallery of this run: control, base beside fine-tuned, the uncertainty map.
    assert main(["gallery", "--run", str(tmp_path / "ctrl_u"), "--n", "1", "--max-prompts", "2"]) == 0
    images = tmp_path / "ctrl_u" / "gallery" / "images"
    for name in ("p000_figure_00", "p000_base_00", "p001_fine_tuned_00", "p001_uncertainty_fine_tuned_00"):
        assert (images / f"{name}.png").is_file(), name
    assert "controllability fine_tuned" in (tmp_path / "ctrl_u" / "gallery" / "index.html").read_text()
