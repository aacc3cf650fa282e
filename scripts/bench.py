"""Engine benchmarks, each reported as a ratio against a baseline measured in the same run (the suite lives in
scripts/benchmarks/, one module per topic).

    python scripts/bench.py                              # every benchmark, markdown table on stdout
    python scripts/bench.py --only memory,attention      # some of them (names below)
    python scripts/bench.py --only pipelines --out runs/bench.json --plots docs

Benchmarks (--only NAME[,NAME]):
- sampling: our sampler with per-step log-probs vs diffusers' StableDiffusionPipeline, same model/seeds/η.
- masked: masked discrete diffusion sampling with per-step log-probs and per-sample seeds vs a bare MDLM sampling
  loop on the same model (scripts/bench_masked.py; 64 DNA-length sequences, 50 steps, the default CNN).
- ddpo: one DDPO update (PPO-clip loss through `step_log_prob`) vs a bare denoiser forward+backward on the
  same batch — the price of the policy-gradient bookkeeping.
- prdp: one PRDP update (the RDP-loss coefficients, then Σ G·∇log π over every step) vs one DDPO update over every
  step, same batch; once as an epoch's first update and once as a later one (which adds a no-grad values pass).
- memory: DRaFT-K peak memory for K = 1, 2, 5, 10 with and without checkpointing of the tracked denoiser
  calls (CUDA: torch.cuda.max_memory_allocated; CPU: peak resident memory of a fresh subprocess per setting, polled every
  millisecond, minus the resident memory before the step, with glibc's mmap threshold fixed so that RSS follows live
  memory).
- attention: trainer.attention=sdpa vs naive (genalign.attention's switch), forward passes: the committed shapes-world
  UNet at its sampling batch (64 images + CFG) and a masked-diffusion transformer backbone at L = 128, 512, 1024.
- shapes: the committed shapes-world model (genalign/worlds/assets/shapes/t2i) at the demo's settings (64 images,
  10 DDIM steps, CFG 5, eta 1): our sampler with per-step log-probs vs diffusers' pipeline, plus samples/s.
- tones: the committed tones-world text-to-audio model (genalign/worlds/assets/tones/t2a; 2 s clips, Griffin-Lim
  vocoder) at the fine-tuning configs' settings (32 clips, 10 DDIM steps, CFG 3, eta 1): our sampler with per-step
  log-probs vs diffusers' AudioLDMPipeline, plus clips/s and the vocoder's share of the time.
- parrot: on the committed shapes-world model at configs/parrot_shapes.yaml's settings (64 images, 10 DDIM steps),
  original-prompt-centred guidance ([∅, c, ĉ] in one batched call) vs plain CFG sampling; the shapes PEN's 64
  expansions against that sampling time; and batch-wise Pareto selection of 256 × 4 rewards in torch vs the
  paper's O(N²) double loop in Python.
- ctrl_u: on the committed shapes world's segmentation ControlNet (configs/ctrl_u_shapes_segmentation.yaml):
  sampling 64 held-out examples (10 DDIM steps, CFG 3) with per-step log-probs vs diffusers'
  StableDiffusionControlNetPipeline; and one Ctrl-U update of 16 examples (two noised copies, x̂_0 decoded for
  t ≤ t_max, the reward model, U) vs the plain ControlNet update on the same examples (diffusion loss only).
- dragon: one DRAGON round on the tones world with a dataset-FAD reward (generation, embedding, set construction,
  DPO updates) against its generation time, with the embedding share and the cache hits; and the leave-one-out set
  construction on cached embeddings vs a loop that embeds every subset it scores.
- gflownet: rollouts of the GFlowNet sequence transformer (DNA length 128; N-grams 32–36) with its key–value cache
  vs re-reading the whole prefix at every step, 32 trajectories; with one policy forward+backward's share.
- pipelines (or pipeline_<name> for one: pipeline_ddpo, pipeline_draft, pipeline_alignprop, pipeline_prdp,
  pipeline_dragon, pipeline_drakes, pipeline_ctrl_u, pipeline_parrot, pipeline_gflownet, pipeline_rtb): one training
  unit of the real pipeline vs the same algorithm as a plain loop (per-sample sampling and reward calls, nothing
  cached), checked to compute the same update; samples/s, updates/s and each side's peak memory
  (benchmarks/pipelines/).
- scaling (or scaling_steps, scaling_batch, scaling_truncation, scaling_length): cost against denoising steps T,
  batch size, DRaFT truncation K (time and peak memory, checkpointing on/off) and sequence length; PNG plots in
  --plots.
- compiled: torch.compile vs eager forward passes of the shapes UNet and the masked-diffusion transformer, with the
  compile time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmarks.report import markdown, write_json  # noqa: E402

# name → "module:function" under scripts/benchmarks; each function takes the parsed arguments and returns rows.
BENCHMARKS: dict[str, str] = {
    "sampling": "benchmarks.sampling:bench_sampling",
    "masked": "benchmarks.sampling:bench_masked",
    "ddpo": "benchmarks.updates:bench_ddpo",
    "prdp": "benchmarks.updates:bench_prdp",
    "memory": "benchmarks.memory:bench_memory",
    "attention": "benchmarks.attention:bench_attention",
    "shapes": "benchmarks.sampling:bench_shapes",
    "tones": "benchmarks.sampling:bench_tones",
    "dragon": "benchmarks.components:bench_dragon",
    "parrot": "benchmarks.components:bench_parrot",
    "ctrl_u": "benchmarks.components:bench_ctrl_u",
    "gflownet": "benchmarks.components:bench_gflownet",
    "pipelines": "benchmarks.pipelines:bench_pipelines",
    "scaling": "benchmarks.scaling:bench_scaling",
    "compiled": "benchmarks.compiled:bench_compiled",
}
# Benchmarks that take a part name after an underscore: pipeline_ddpo, scaling_length.
PARTS = {"pipeline": "pipelines", "scaling": "scaling"}


def resolve(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def selected(only: str | None) -> list[tuple[str, list[str] | None]]:
    """[(benchmark, parts or None for all)] in the order asked for (every benchmark without --only)."""
    if not only:
        return [(name, None) for name in BENCHMARKS]
    chosen: dict[str, list[str] | None] = {}
    for name in only.split(","):
        prefix, _, part = name.partition("_")
        if name in BENCHMARKS:
            chosen[name] = None
        elif prefix in PARTS and part:
            parts = chosen.setdefault(PARTS[prefix], [])
            if parts is not None:
                parts.append(part)
        else:
            raise SystemExit(f"unknown benchmark '{name}'; choose from {', '.join(BENCHMARKS)} "
                             "(or pipeline_<name>, scaling_<curve>)")
    return list(chosen.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pipeline-repeats", type=int, default=None,
                        help="alternated units per side for the pipeline benchmarks (default: --repeats, at most 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--plots", help="folder for the scaling benchmarks' PNG plots (none without it)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # module:function and its JSON arguments
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(resolve(args.child[0])(**json.loads(args.child[1]))))
        return
    if args.pipeline_repeats is None:
        args.pipeline_repeats = min(args.repeats, 3)
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    rows = []
    for name, parts in selected(args.only):
        function = resolve(BENCHMARKS[name])
        load_before = os.getloadavg()[0]
        result = function(args, parts) if name in PARTS.values() else function(args)
        # The machine's 1-minute load average around each benchmark: other work on the cores shows up here.
        load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        rows.extend({**row, "load_1min": load} for row in (result if isinstance(result, list) else [result]))
        if args.out:  # after every benchmark, so that a long run's finished parts survive an interruption
            write_json(args.out, device, rows)
    print(f"device: {device}; torch {torch.__version__}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
