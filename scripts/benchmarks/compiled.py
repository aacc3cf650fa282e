"""torch.compile (inductor, default mode) against eager forward passes under no_grad, on the same inputs: the committed
shapes-world UNet at its sampling batch (64 images + CFG, 8×8 latents) and the masked-diffusion transformer backbone
(width 128, 4 heads, 4 blocks, batch 8) at L = 128 and 512. The first compiled call compiles (its time is reported
as compile_s, apart, from an empty inductor cache); the two are then measured alternately. On the CPU inductor writes
C++ kernels, built with gcc."""

from __future__ import annotations

import os
import tempfile
import time

import torch

from benchmarks.timing import paired, synchronize
from benchmarks.worlds import shapes_unet_batch


def cases(args) -> list[tuple[str, torch.nn.Module, tuple, dict]]:
    """(name, module, positional inputs, keyword inputs) of each forward pass."""
    from genalign.generators.masked import MaskedDiffusionConfig, build_backbone

    unet, latents, timesteps, text, description = shapes_unet_batch(args.device)
    found = [(description, unet, (latents, timesteps), {"encoder_hidden_states": text, "return_dict": False})]
    for length in (128, 512):
        config = MaskedDiffusionConfig(alphabet="ACGT", length=length, backbone="transformer", num_layers=4)
        backbone = build_backbone(config).to(args.device).eval()
        ids = torch.randint(0, config.vocab_size + 1, (8, length), device=args.device)
        found.append((f"masked-diffusion transformer forward, batch 8, L = {length}", backbone, (ids,), {}))
    return found


def bench_compiled(args) -> list[dict]:
    # inductor keeps compiled graphs and kernels on disk across runs: a fresh cache folder makes compile_s a first
    # compilation (with the machine's default cache a second run of this benchmark compiled the UNet in 7 s, not 65 s).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")
    rows = []
    for name, module, inputs, keywords in cases(args):
        torch._dynamo.reset()  # each case compiles from scratch, not as a recompilation of the previous one
        compiled = torch.compile(module)
        with torch.no_grad():
            synchronize()
            tic = time.perf_counter()
            first = compiled(*inputs, **keywords)
            synchronize()
            compile_s = time.perf_counter() - tic
            reference = module(*inputs, **keywords)
        first, reference = (out[0] if isinstance(out, tuple) else out for out in (first, reference))

        def run(model):
            def call() -> None:
                with torch.no_grad():
                    model(*inputs, **keywords)

            return call

        eager_s, compiled_s = paired(run(module), run(compiled), args.repeats)
        rows.append({"benchmark": name, "baseline": "eager", "baseline_s": eager_s, "ours_s": compiled_s,
                     "ratio": compiled_s / eager_s, "compile_s": compile_s,
                     "max_abs_difference": float((first - reference).abs().max())})
    return rows
