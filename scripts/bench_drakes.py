"""Benchmark: one DRAKES micro-batch (relaxed sampling, reward, KL, backward) as the truncation K grows, and the cost
of its exact KL.

    python scripts/bench_drakes.py                                    # the DNA world's model, K = 5, 25, 50 of 128
    python scripts/bench_drakes.py --model runs/worlds/dna/model --batch 8 --steps 128 --ks 5,25,50

Every configuration runs in a fresh process (time of one step after a warm-up step; peak memory above the
loaded model: CUDA's allocator on a GPU, polled resident memory on the CPU). Three losses per K:

* "no KL" (α = 0): −mean r through the K relaxed steps — the baseline of every ratio;
* "exact KL, chunked" (ours): + α·Σ_t KL_t, the relaxed steps' KL inline and the T − K hard steps' KL
  backpropagated `--chunk` steps at a time (what `pipelines/drakes.py` does);
* "KL in one graph" (the public code's structure): the same terms, with both models re-run over every step of
  the trajectory inside one graph and one backward, so memory grows with T.

Rows are in scripts/bench.py's format; "kl_share" is 1 − time(no KL)/time(with KL).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmarks.timing import FRESH_PROCESS_ENV, RssMonitor, current_rss  # noqa: E402
from genalign.generators.masked import MaskedDiffusionGenerator, MaskedSamplingOptions  # noqa: E402

MODES = ("no_kl", "exact_chunked", "one_graph")


def drakes_step(generator: MaskedDiffusionGenerator, reward, options: MaskedSamplingOptions, batch: int, k: int,
                mode: str, chunk: int, alpha: float, seed: int) -> None:
    """One micro-batch's forward and backward passes under `mode`."""
    rollout = generator.sample_differentiable([""] * batch, options, grad_steps=k, seeds=range(seed, seed + batch),
                                              tau=1.0, kl_to_reference=mode != "no_kl")
    loss = -reward(rollout.outputs).rewards.mean()
    if mode == "no_kl":
        loss.backward()
        return
    states = rollout.extras["hard_states"]

    def hard_kl(steps) -> torch.Tensor:
        return sum(generator.step_kl(states[:, s], torch.full((batch,), s), options) for s in steps)

    loss = loss + alpha * rollout.extras["kl_relaxed"].mean()
    if mode == "one_graph":
        (loss + alpha * hard_kl(range(states.shape[1])).mean()).backward()
        return
    loss.backward()
    for start in range(0, states.shape[1], chunk):
        (alpha * hard_kl(range(start, min(start + chunk, states.shape[1]))).mean()).backward()


def child(args) -> None:
    from rewards import build_reward

    torch.manual_seed(0)
    device = args.device
    generator = MaskedDiffusionGenerator.from_pretrained(args.model, device=device)
    generator.keep_reference_copy()
    with torch.no_grad():  # fine-tuned weights that differ from the reference, as mid-run
        for p in generator.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    reward = build_reward("sequence_oracle", oracle=args.oracle).to(device) if args.oracle else build_reward(
        "gc_content").to(device)
    options = MaskedSamplingOptions(num_inference_steps=args.steps)
    drakes_step(generator, reward, options, args.batch, args.k, args.mode, args.chunk, 1e-3, seed=100)  # warm-up
    generator.backbone.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_memory, monitor = torch.cuda.memory_allocated(), None
    else:
        start_memory, monitor = current_rss(), RssMonitor()
    tic = time.perf_counter()
    drakes_step(generator, reward, options, args.batch, args.k, args.mode, args.chunk, 1e-3, seed=0)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else monitor.stop()) - start_memory
    print(json.dumps({"seconds": seconds, "peak_bytes": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "genalign/worlds/assets/dna/model"))
    parser.add_argument("--oracle", default=str(ROOT / "genalign/worlds/assets/dna/oracle_reward"),
                        help="a SequenceOracle folder ('' for the GC-content reward)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--ks", default="5,25,50")
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="no_kl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    env = {**os.environ, **FRESH_PROCESS_ENV}  # peak RSS tracks live memory (see benchmarks/timing.py)
    results = {}
    for k in [int(v) for v in args.ks.split(",")]:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", "--k", str(k), "--mode", mode, "--model", args.model,
                   "--oracle", args.oracle, "--batch", str(args.batch), "--steps", str(args.steps),
                   "--chunk", str(args.chunk), "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip()
            results[(k, mode)] = json.loads(out.splitlines()[-1])
            print(f"K={k} {mode}: {results[(k, mode)]}", file=sys.stderr)
    rows = []
    for (k, mode), result in results.items():
        base = results[(k, "no_kl")]
        rows.append({
            "benchmark": f"DRAKES step, K={k} of {args.steps}, {mode.replace('_', ' ')}",
            "baseline": f"no KL, K={k}",
            "baseline_s": base["seconds"],
            "ours_s": result["seconds"],
            "ratio": result["seconds"] / base["seconds"],
            "kl_share": 1 - base["seconds"] / result["seconds"],
            "peak_mib": result["peak_bytes"] / 2**20,
            "memory_ratio": result["peak_bytes"] / max(base["peak_bytes"], 1),
        })
    print(json.dumps(rows, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
