"""Benchmark: masked-diffusion sampling with per-step log-probabilities vs a bare sampling loop, same model.

    python scripts/bench_masked.py                       # DNA-sized defaults, one markdown-ready row as JSON
    python scripts/bench_masked.py --samples 256 --steps 100 --backbone transformer

`bench_masked_sampling` returns a row in scripts/bench.py's format (benchmark, baseline, baseline_s, ours_s,
ratio, samples_per_s). "ours" is `MaskedDiffusionGenerator.sample` with per-sample seeds and the recorded
trajectory (states and float64 log-probs); the baseline is the loop one would write without log-probs: float32
probabilities, one batched `torch.multinomial` per step from the global RNG, no states kept. Both run the same
backbone, measured alternately in the same run; the ratio is the price of exact log-prob bookkeeping and of
batching-independent seeds. At the defaults (a 1.3M-parameter CNN) a run takes ~4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmarks.timing import paired  # noqa: E402
from genalign.generators.masked import (  # noqa: E402
    MaskedDiffusionConfig,
    MaskedDiffusionGenerator,
    MaskedSamplingOptions,
)


@torch.no_grad()
def bare_sampling_loop(generator: MaskedDiffusionGenerator, num_samples: int,
                       options: MaskedSamplingOptions) -> torch.Tensor:
    """The plain MDLM sampler without log-probs or trajectory: [num_samples, L] ids."""
    T, V, mask = options.num_inference_steps, generator.vocab_size, generator.mask_id
    length = options.length or generator.config.length
    x = torch.full((num_samples, length), mask, dtype=torch.long, device=generator.device)
    for k in range(T):
        m_t = generator.schedule.mask_prob(torch.tensor((T - k) / T)).item()
        m_s = generator.schedule.mask_prob(torch.tensor((T - k - 1) / T)).item()
        p0 = torch.softmax(generator.logits(x)[..., :V].float() / options.temperature, dim=-1)
        if k == T - 1:
            x0 = p0.argmax(-1)
        else:
            q = torch.cat([p0 * (m_t - m_s), torch.full_like(p0[..., :1], m_s)], dim=-1)
            x0 = torch.multinomial(q.reshape(-1, V + 1), 1).reshape(num_samples, length)
        x = torch.where(x == mask, x0, x)
    return x


def bench_masked_sampling(
    generator: MaskedDiffusionGenerator | None = None,
    *,
    num_samples: int = 64,
    num_steps: int = 50,
    length: int = 100,
    backbone: str = "cnn",
    hidden_size: int = 128,
    num_layers: int = 8,
    repeats: int = 3,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Median times of our sampler (with log-probs) and the bare loop, measured alternately after a warm-up.

    Args:
        generator: the model to time (default: a fresh DNA-sized model built from the other arguments; the
            weights do not change the cost).
    Returns:
        {benchmark, baseline, baseline_s, ours_s, ratio (ours / baseline), samples_per_s (ours)}.
    """
    torch.manual_seed(seed)
    if generator is None:
        config = MaskedDiffusionConfig(length=length, backbone=backbone, hidden_size=hidden_size, num_layers=num_layers)
        generator = MaskedDiffusionGenerator.from_config(config)
    generator.to(device)
    options = MaskedSamplingOptions(num_inference_steps=num_steps)
    seeds = list(range(num_samples))

    def ours() -> None:
        generator.sample([""] * num_samples, options, seeds=seeds)

    def bare() -> None:
        bare_sampling_loop(generator, num_samples, options)

    base, mine = paired(bare, ours, repeats)
    config = generator.config
    return {
        "benchmark": (f"masked sampling {num_samples} x {config.length} tokens, {num_steps} steps, "
                      f"{config.backbone} {sum(p.numel() for p in generator.backbone.parameters()) / 1e6:.2f}M params"),
        "baseline": "bare MDLM loop (no log-probs, global RNG)",
        "baseline_s": base,
        "ours_s": mine,
        "ratio": mine / base,
        "samples_per_s": num_samples / mine,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--backbone", choices=["cnn", "transformer"], default="cnn")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    row = bench_masked_sampling(num_samples=args.samples, num_steps=args.steps, length=args.length,
                                backbone=args.backbone, hidden_size=args.hidden_size, num_layers=args.num_layers,
                                repeats=args.repeats, device=args.device)
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
