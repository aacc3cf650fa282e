"""Sampling with per-step log-probs against the samplers one would use without them: diffusers' pipelines (images,
audio) and a bare masked-diffusion loop."""

from __future__ import annotations

import torch

from benchmarks.timing import paired, timed
from benchmarks.worlds import PROMPTS, TONES_MODEL, prompt_lines, shapes_pipe, tiny_sd_pipe
from genalign.generators.diffusion import DiffusionGenerator, SamplingOptions


def _against_diffusers(pipe, generator, prompts: list[str], options, repeats: int, **call) -> tuple[float, float]:
    """(diffusers pipeline s, our sampler s), measured alternately with the same seeds and settings; `call` holds the
    diffusers call's own settings."""
    seeds = list(range(len(prompts)))

    def ours():
        generator.sample(prompts, options, seeds=seeds, batch_size=len(prompts))

    def plain():
        with torch.no_grad():
            pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **call)

    return paired(plain, ours, repeats)


def bench_sampling(args) -> dict:
    """Our sampler with per-step log-probs vs diffusers' StableDiffusionPipeline on the tiny SD model."""
    pipe = tiny_sd_pipe(args.image_size).to(args.device)
    gen = DiffusionGenerator.from_pipeline(pipe)
    prompts = PROMPTS * (args.batch // len(PROMPTS))
    options = SamplingOptions(num_inference_steps=args.steps, guidance_scale=5.0, eta=1.0)
    base, mine = _against_diffusers(pipe, gen, prompts, options, args.repeats, num_inference_steps=args.steps,
                                    guidance_scale=5.0, eta=1.0, output_type="pt")
    return {"benchmark": f"sampling {len(prompts)} images, {args.steps} DDIM steps, CFG, {args.image_size}px",
            "baseline": "diffusers StableDiffusionPipeline", "baseline_s": base, "ours_s": mine, "ratio": mine / base}


def bench_shapes(args) -> dict:
    """The committed shapes-world model at the demo's settings (64 images, 10 DDIM steps, CFG 5, η = 1)."""
    pipe = shapes_pipe(args.device)
    gen = DiffusionGenerator.from_pipeline(pipe)
    prompts = prompt_lines("shapes_eval", 64)
    options = SamplingOptions(num_inference_steps=10, guidance_scale=5.0, eta=1.0)
    base, mine = _against_diffusers(pipe, gen, prompts, options, args.repeats, num_inference_steps=10,
                                    guidance_scale=5.0, eta=1.0, output_type="pt")
    return {"benchmark": "shapes world: 64 images, 10 DDIM steps, CFG 5, 32px (8x8 latents)",
            "baseline": "diffusers StableDiffusionPipeline", "baseline_s": base, "ours_s": mine, "ratio": mine / base,
            "samples_per_s": len(prompts) / mine}


def bench_tones(args) -> dict:
    """The committed tones-world text-to-audio model (32 clips of 2 s, 10 DDIM steps, CFG 3, η = 1) vs diffusers'
    AudioLDMPipeline, with the Griffin-Lim vocoder's share of the time."""
    import warnings

    from diffusers import AudioLDMPipeline

    import genalign.generators.griffin_lim  # noqa: F401  (diffusers loads the vocoder only from an imported module)
    from genalign.generators.audio import AudioDiffusionGenerator, AudioSamplingOptions

    warnings.filterwarnings("ignore", message=".*deprecated.*")
    pipe = AudioLDMPipeline.from_pretrained(TONES_MODEL).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    gen = AudioDiffusionGenerator.from_pipeline(pipe)
    prompts = prompt_lines("tones_eval", 32)
    seeds = list(range(len(prompts)))
    options = AudioSamplingOptions(num_inference_steps=10, guidance_scale=3.0, eta=1.0, audio_length_in_s=2.0)
    base, mine = _against_diffusers(pipe, gen, prompts, options, args.repeats, num_inference_steps=10,
                                    guidance_scale=3.0, eta=1.0, audio_length_in_s=2.0)
    latents = gen.sample(prompts, options, seeds=seeds, return_trajectory=False).extras["latents"]
    with torch.no_grad():
        mels = gen.decode_mel(latents)
        vocoder_s = timed(lambda: gen.vocoder(mels), 1)
    return {"benchmark": "tones world: 32 clips of 2 s, 10 DDIM steps, CFG 3, Griffin-Lim vocoder",
            "baseline": "diffusers AudioLDMPipeline", "baseline_s": base, "ours_s": mine, "ratio": mine / base,
            "samples_per_s": len(prompts) / mine, "vocoder_share": vocoder_s / mine}


def bench_masked(args) -> dict:
    """Masked-diffusion sampling with log-probs and per-sample seeds vs a bare MDLM loop (scripts/bench_masked.py)."""
    from bench_masked import bench_masked_sampling

    return bench_masked_sampling(repeats=args.repeats, device=args.device)
