"""trainer.attention=sdpa vs naive (`genalign.attention`'s switch), forward passes under no_grad."""

from __future__ import annotations

import torch

from benchmarks.timing import paired
from benchmarks.worlds import shapes_unet_batch


def bench_attention(args) -> list[dict]:
    """trainer.attention=sdpa vs naive (`genalign.attention`), forward passes under no_grad, measured alternately:
    the committed shapes-world UNet at its sampling batch (64 images with CFG: 128 rows of 8×8 latents, the
    prompts' CLIP states), and a masked-diffusion transformer backbone (MaskedDiffusionConfig's width 128, 4 heads,
    4 blocks, batch 8) at sequence lengths 128, 512 and 1024. The switch is inside each timed call (a walk over the
    modules, well under a millisecond)."""
    from genalign.attention import set_attention_backend
    from genalign.generators.masked import MaskedDiffusionConfig, build_backbone

    unet, x, t, text, description = shapes_unet_batch(args.device)
    cases = [(description, unet, lambda: unet(x, t, encoder_hidden_states=text))]
    for length in (128, 512, 1024):
        config = MaskedDiffusionConfig(alphabet="ACGT", length=length, backbone="transformer", num_layers=4)
        backbone = build_backbone(config).to(args.device).eval()
        ids = torch.randint(0, config.vocab_size + 1, (8, length), device=args.device)
        cases.append((f"masked-diffusion transformer forward, batch 8, L = {length}", backbone,
                      lambda backbone=backbone, ids=ids: backbone(ids)))

    rows = []
    for name, model, forward in cases:
        def on(backend, model=model, forward=forward):
            def run():
                set_attention_backend(model, backend)
                with torch.no_grad():
                    forward()

            return run

        naive, fused = paired(on("naive"), on("sdpa"), args.repeats)
        set_attention_backend(model, "sdpa")
        rows.append({"benchmark": name, "baseline": "naive softmax(QKᵀ/√d)·V", "baseline_s": naive, "ours_s": fused,
                     "ratio": fused / naive})
    return rows
