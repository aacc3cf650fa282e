"""Engine benchmarks, each reported as a ratio against a baseline measured in the same run.

    python scripts/bench.py                 # all benchmarks, markdown table on stdout
    python scripts/bench.py --only memory   # one of: sampling, masked, ddpo, prdp, memory, attention, shapes, tones, dragon, parrot, ctrl_u, gflownet
    python scripts/bench.py --out docs/bench.json

Benchmarks:
- sampling: our sampler with per-step log-probs vs diffusers' StableDiffusionPipeline, same model/seeds/η.
- masked: masked discrete diffusion sampling with per-step log-probs and per-sample seeds vs a bare MDLM sampling
  loop on the same model (scripts/bench_masked.py; 64 DNA-length sequences, 50 steps, the default CNN).
- ddpo: one DDPO update (PPO-clip loss through `step_log_prob`) vs a bare denoiser forward+backward on the
  same batch — the price of the policy-gradient bookkeeping.
- prdp: one PRDP update (the RDP-loss coefficients, then Σ G·∇log π over every step) vs one DDPO update over every
  step, same batch; once as an epoch's first update and once as a later one (which adds a no-grad values pass).
- memory: DRaFT-K peak memory for K = 1, 2, 5, 10 with and without checkpointing of the tracked denoiser
  calls (CUDA: torch.cuda.max_memory_allocated; CPU: peak resident memory of a fresh subprocess per setting, polled every
  millisecond, minus the resident memory after loading the model, with glibc's mmap threshold fixed so that RSS follows live memory).
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
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from genalign.generators.diffusion import DiffusionGenerator, SamplingOptions  # noqa: E402
from genalign.worlds.tiny import build_tiny_text_to_image  # noqa: E402

PROMPTS = ["a red circle", "two green stars", "a yellow sun", "a purple square"]


def bench_pipe(image_size: int):
    pipe = build_tiny_text_to_image("sd", image_size=image_size)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired(baseline, ours, repeats: int) -> tuple[float, float]:
    """Median times of two functions measured alternately, so machine noise hits both alike."""
    baseline()
    ours()
    t_base, t_ours = [], []
    for _ in range(repeats):
        t_base.append(timed(baseline, 1))
        t_ours.append(timed(ours, 1))
    return statistics.median(t_base), statistics.median(t_ours)


def bench_sampling(args) -> dict:
    pipe = bench_pipe(args.image_size).to(args.device)
    gen = DiffusionGenerator.from_pipeline(pipe)
    prompts = PROMPTS * (args.batch // len(PROMPTS))
    seeds = list(range(len(prompts)))
    options = SamplingOptions(num_inference_steps=args.steps, guidance_scale=5.0, eta=1.0)

    def ours():
        gen.sample(prompts, options, seeds=seeds)

    def plain():
        with torch.no_grad():
            pipe(prompts, num_inference_steps=args.steps, guidance_scale=5.0, eta=1.0, output_type="pt",
                 generator=[torch.Generator().manual_seed(s) for s in seeds])

    base, mine = paired(plain, ours, args.repeats)
    return {
        "benchmark": f"sampling {len(prompts)} images, {args.steps} DDIM steps, CFG, {args.image_size}px",
        "baseline": "diffusers StableDiffusionPipeline",
        "baseline_s": base,
        "ours_s": mine,
        "ratio": mine / base,
    }


SHAPES_MODEL = ROOT / "genalign" / "worlds" / "assets" / "shapes" / "t2i"


def bench_shapes(args) -> dict:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SHAPES_MODEL, safety_checker=None).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    gen = DiffusionGenerator.from_pipeline(pipe)
    prompts = (ROOT / "configs" / "prompts" / "shapes_eval.txt").read_text().splitlines()[:64]
    seeds = list(range(len(prompts)))
    options = SamplingOptions(num_inference_steps=10, guidance_scale=5.0, eta=1.0)

    def ours():
        gen.sample(prompts, options, seeds=seeds, batch_size=64)

    def plain():
        with torch.no_grad():
            pipe(prompts, num_inference_steps=10, guidance_scale=5.0, eta=1.0, output_type="pt",
                 generator=[torch.Generator().manual_seed(s) for s in seeds])

    base, mine = paired(plain, ours, args.repeats)
    return {
        "benchmark": "shapes world: 64 images, 10 DDIM steps, CFG 5, 32px (8x8 latents)",
        "baseline": "diffusers StableDiffusionPipeline",
        "baseline_s": base,
        "ours_s": mine,
        "ratio": mine / base,
        "samples_per_s": len(prompts) / mine,
    }


TONES_MODEL = ROOT / "genalign" / "worlds" / "assets" / "tones" / "t2a"


def bench_tones(args) -> dict:
    import warnings

    from diffusers import AudioLDMPipeline

    import genalign.generators.griffin_lim  # noqa: F401  (diffusers loads the vocoder only from an imported module)
    from genalign.generators.audio import AudioDiffusionGenerator, AudioSamplingOptions

    warnings.filterwarnings("ignore", message=".*deprecated.*")
    pipe = AudioLDMPipeline.from_pretrained(TONES_MODEL).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    gen = AudioDiffusionGenerator.from_pipeline(pipe)
    prompts = (ROOT / "configs" / "prompts" / "tones_eval.txt").read_text().splitlines()[:32]
    seeds = list(range(len(prompts)))
    options = AudioSamplingOptions(num_inference_steps=10, guidance_scale=3.0, eta=1.0, audio_length_in_s=2.0)

    def ours():
        gen.sample(prompts, options, seeds=seeds, batch_size=32)

    def plain():
        with torch.no_grad():
            pipe(prompts, num_inference_steps=10, guidance_scale=3.0, eta=1.0, audio_length_in_s=2.0,
                 generator=[torch.Generator().manual_seed(s) for s in seeds])

    base, mine = paired(plain, ours, args.repeats)
    latents = gen.sample(prompts, options, seeds=seeds, return_trajectory=False).extras["latents"]
    with torch.no_grad():
        mels = gen.decode_mel(latents)
        vocoder_s = timed(lambda: gen.vocoder(mels), 1)
    return {
        "benchmark": "tones world: 32 clips of 2 s, 10 DDIM steps, CFG 3, Griffin-Lim vocoder",
        "baseline": "diffusers AudioLDMPipeline",
        "baseline_s": base,
        "ours_s": mine,
        "ratio": mine / base,
        "samples_per_s": len(prompts) / mine,
        "vocoder_share": vocoder_s / mine,
    }


def bench_dragon(args) -> list[dict]:
    """One DRAGON round on the tones world at configs/dragon_tones_dataset_fd.yaml's settings (48 clips, 10 steps,
    a dataset-FAD reward on CLAP embeddings, leave-one-out credit, 4 DPO updates), phase by phase, each phase's
    time as a ratio to the round's generation time; and the set construction with the embedding cache vs a plain
    loop that embeds every subset it scores."""
    import tempfile

    import genalign.generators.griffin_lim  # noqa: F401
    from genalign.config import build_config, load_yaml
    from genalign.engine import gather_in_order, gather_trajectory, total_reward
    from pipelines.dragon import DRAGONConfig, DRAGONPipeline, leave_one_out_credit

    data = load_yaml(ROOT / "configs" / "dragon_tones_dataset_fd.yaml")
    out = tempfile.mkdtemp(prefix="bench-dragon-")
    config = build_config(DRAGONConfig, data, [f"trainer.output_dir={out}", "trainer.progress=false",
                                               "trainer.checkpoint_every=0", "eval.every=1000"])
    pipe = DRAGONPipeline(config)
    trainer, _, _ = pipe.start_training(accumulation_steps=1, total_updates=config.updates_per_epoch,
                                        keep_reference=True)
    cache = pipe.reward.embeddings
    plan = pipe.epoch_plan(trainer, 0, config.prompts_per_epoch, config.samples_per_prompt)
    tic = time.perf_counter()
    with trainer.autocast():
        rollout = pipe.generator.sample(pipe.conditions(plan, plan.local), pipe.demo_options,
                                        seeds=plan.seeds[plan.local].tolist(), batch_size=config.sampling.batch_size)
    generation_s = time.perf_counter() - tic
    cache.clear()
    tic = time.perf_counter()
    with torch.no_grad():
        embeddings = pipe.reward.embed(rollout.outputs)
    embedding_s = time.perf_counter() - tic
    samples = pipe.sample_and_score(trainer, plan, pipe.demo_options)  # the engine's own round (cached embeddings)
    scores = total_reward(samples.global_scores).cpu()
    outputs = gather_in_order(trainer, samples.rollout.outputs, plan)
    hits_before = cache.hits
    tic = time.perf_counter()
    demos, _ = pipe.demonstrations(samples, outputs, scores)
    construction_s = time.perf_counter() - tic
    hits = cache.hits - hits_before

    def embed_every_subset(indices: torch.Tensor) -> float:  # the straightforward loop: no cache, no slicing
        cache.clear()
        with torch.no_grad():
            return float(pipe.reward(outputs[indices]).metadata["set_score"])

    tic = time.perf_counter()
    leave_one_out_credit(embed_every_subset, len(scores))
    uncached_s = time.perf_counter() - tic
    trajectory = gather_trajectory(trainer, samples.rollout.trajectory, plan)
    tic = time.perf_counter()
    for k in range(config.updates_per_epoch):
        pipe.update(trainer, trajectory, demos, 0, k)
    update_s = time.perf_counter() - tic
    n = len(scores)
    round_s = generation_s + embedding_s + construction_s + update_s
    rows = [
        {"benchmark": f"DRAGON round, tones: {n} clips, dataset FAD, leave-one-out, {config.updates_per_epoch} DPO "
                      f"updates of {len(demos.pairs)} pairs", "baseline": "generation of the round's clips",
         "baseline_s": generation_s, "ours_s": round_s, "ratio": round_s / generation_s,
         "embedding_share": embedding_s / round_s, "update_share": update_s / round_s,
         "cache_hits": float(hits), "samples_per_s": n / round_s},
        {"benchmark": f"DRAGON set construction: leave-one-out over {n} clips ({n + 1} set scores)",
         "baseline": "embed every subset (no cache)", "baseline_s": uncached_s, "ours_s": construction_s,
         "ratio": construction_s / uncached_s, "cache_hits": float(hits)},
    ]
    return rows


def trainable_rollout(args):
    """The tiny model with every denoiser weight trainable, and a recorded batch of trajectories (CFG, η = 1)."""
    gen = DiffusionGenerator.from_pipeline(bench_pipe(args.image_size).to(args.device))
    gen.denoiser.requires_grad_(True)
    prompts = PROMPTS * (args.batch // len(PROMPTS))
    options = SamplingOptions(num_inference_steps=args.steps, guidance_scale=5.0, eta=1.0)
    return gen, prompts, gen.sample(prompts, options, seeds=list(range(len(prompts)))).trajectory


def bench_masked(args) -> dict:
    from bench_masked import bench_masked_sampling

    return bench_masked_sampling(repeats=args.repeats, device=args.device)


def bench_ddpo(args) -> dict:
    from pipelines.ddpo import ddpo_loss

    gen, prompts, traj = trainable_rollout(args)
    step = torch.full((len(prompts),), args.steps // 2)
    adv = torch.randn(len(prompts))

    def update():
        lp = gen.step_log_prob(traj, step)
        loss, _ = ddpo_loss(lp, traj.log_probs[:, args.steps // 2], adv.to(lp.device), 1e-4)
        loss.backward()
        gen.denoiser.zero_grad(set_to_none=True)

    from genalign.generators.diffusion import PromptEmbeds

    x = traj.states[:, args.steps // 2]
    t = gen.schedule(traj.options).timesteps[args.steps // 2].expand(len(prompts)).to(x.device)
    cond = PromptEmbeds.from_conditioning(traj.conditioning)
    uncond = PromptEmbeds.from_conditioning(traj.conditioning, "uncond_")

    def bare():
        out = gen.predict(x, t, cond, uncond, traj.options.guidance_scale)
        out.float().pow(2).mean().backward()
        gen.denoiser.zero_grad(set_to_none=True)

    base, mine = paired(bare, update, args.repeats)
    return {
        "benchmark": f"DDPO update on {len(prompts)} samples (one timestep, CFG)",
        "baseline": "bare denoiser forward+backward, same batch",
        "baseline_s": base,
        "ours_s": mine,
        "ratio": mine / base,
        "ddpo_updates_per_s": 1 / mine,
    }


def bench_prdp(args) -> list[dict]:
    """PRDP's update vs DDPO's on the same batch, both over every sampling step (DDPO's timestep_fraction 1)."""
    from pipelines.ddpo import ddpo_loss
    from pipelines.prdp import PRDPConfig, loss_coefficients

    gen, prompts, traj = trainable_rollout(args)
    steps = traj.trainable_steps.tolist()
    rewards = torch.randn(len(prompts), device=gen.device)
    groups = torch.arange(len(prompts), device=gen.device) // 4
    config = PRDPConfig(beta=1e-3, clip_range=1e-4)
    adv = torch.randn(len(prompts), device=gen.device)

    def log_prob(step):
        return gen.step_log_prob(traj, torch.full((len(prompts),), step))

    def ddpo():
        for step in steps:
            loss, _ = ddpo_loss(log_prob(step), traj.log_probs[:, step].to(gen.device), adv, 1e-4)
            loss.backward()
        gen.denoiser.zero_grad(set_to_none=True)

    def prdp(values_pass: bool):
        ratios = torch.zeros(len(prompts), len(steps), device=gen.device, dtype=torch.float64)
        if values_pass:
            with torch.no_grad():
                ratios = torch.stack([log_prob(step) for step in steps], dim=1) - ratios
        _, coefficients, _ = loss_coefficients(ratios, rewards, groups, config)
        for j, step in enumerate(steps):
            (coefficients[:, j] * log_prob(step)).sum().backward()
        gen.denoiser.zero_grad(set_to_none=True)

    rows = []
    for values_pass, name in ((False, "first update of an epoch (θ = θ_old, as every update when K = 1)"),
                              (True, "later update (K > 1: no-grad values pass first)")):
        base, mine = paired(ddpo, lambda: prdp(values_pass), args.repeats)
        rows.append({
            "benchmark": f"PRDP {name}, {len(prompts)} samples × {len(steps)} steps, CFG",
            "baseline": "DDPO update (PPO-clip, all steps), same batch",
            "baseline_s": base,
            "ours_s": mine,
            "ratio": mine / base,
        })
    return rows


def _memory_child(k: int, checkpoint: bool, image_size: int, batch: int, steps: int, device: str) -> None:
    """Runs in a fresh process: one DRaFT-K forward+backward; prints peak memory above the loaded model."""
    from rewards import build_reward

    pipe = bench_pipe(image_size).to(device)
    gen = DiffusionGenerator.from_pipeline(pipe)
    gen.denoiser.requires_grad_(True)
    reward = build_reward("colorfulness")
    options = SamplingOptions(num_inference_steps=steps, guidance_scale=5.0, eta=0.0)
    prompts = (PROMPTS * batch)[:batch]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        monitor = None
    else:
        start = _current_rss()
        monitor = _RssMonitor()
    out = gen.sample_differentiable(prompts, options, grad_steps=k, seeds=list(range(batch)), checkpoint=checkpoint)
    (-reward(out.outputs, prompts).rewards.mean()).backward()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - start
    else:
        peak = monitor.stop() - start
    print(json.dumps({"peak_bytes": peak}))


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class _RssMonitor:
    """Polls this process's resident memory every millisecond in a thread and keeps the maximum."""

    def __init__(self) -> None:
        import threading

        self.peak = _current_rss()
        self._running = True
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while self._running:
            self.peak = max(self.peak, _current_rss())
            time.sleep(0.001)

    def stop(self) -> int:
        self._running = False
        self._thread.join()
        return max(self.peak, _current_rss())


def bench_memory(args) -> list[dict]:
    rows = []
    results = {}
    for checkpoint in (True, False):
        for k in (1, 2, 5, 10):
            cmd = [sys.executable, __file__, "--memory-child", str(k), str(int(checkpoint)),
                   "--image-size", str(args.image_size), "--batch", str(args.batch), "--steps", str(max(args.steps, 10)),
                   "--device", args.device]
            # A fixed mmap threshold makes glibc return freed tensor memory to the OS, so peak RSS tracks the
            # peak of live memory; with glibc's adaptive threshold it mostly measured heap fragmentation.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
            results[(checkpoint, k)] = json.loads(out)["peak_bytes"]
    for checkpoint in (True, False):
        base = results[(checkpoint, 1)]
        for k in (1, 2, 5, 10):
            rows.append({
                "benchmark": f"DRaFT-{k} peak memory, checkpointing {'on' if checkpoint else 'off'}",
                "baseline": "DRaFT-1, same checkpointing",
                "baseline_s": None,
                "ours_s": None,
                "peak_mib": results[(checkpoint, k)] / 2**20,
                "ratio": results[(checkpoint, k)] / base,
            })
    return rows


def bench_attention(args) -> list[dict]:
    """trainer.attention=sdpa vs naive (`genalign.attention`), forward passes under no_grad, measured alternately:
    the committed shapes-world UNet at its sampling batch (64 images with CFG: 128 rows of 8×8 latents, the
    prompts' CLIP states), and a masked-diffusion transformer backbone (MaskedDiffusionConfig's width 128, 4 heads,
    4 blocks, batch 8) at sequence lengths 128, 512 and 1024. The switch is inside each timed call (a walk over the
    modules, well under a millisecond)."""
    from genalign.attention import set_attention_backend
    from genalign.generators.masked import MaskedDiffusionConfig, build_backbone

    generator = DiffusionGenerator.from_pretrained(SHAPES_MODEL).to(args.device)
    unet = generator.denoiser
    prompts = (ROOT / "configs" / "prompts" / "shapes_eval.txt").read_text().splitlines()[:64]
    size = unet.config.sample_size
    with torch.no_grad():
        pixels = size * generator.vae_scale_factor
        text = generator.encode_prompts([""] * len(prompts) + prompts, pixels, pixels).embeds
    x = torch.randn(len(text), unet.config.in_channels, size, size, device=args.device)
    t = torch.full((len(text),), 500, device=args.device)
    cases = [(f"shapes-world UNet forward, batch {len(text)} (64 images + CFG), {size}×{size} latents", unet,
              lambda: unet(x, t, encoder_hidden_states=text))]
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


def bench_parrot(args) -> list[dict]:
    from genalign.generators.base import Conditions
    from genalign.generators.prompt_expansion import PromptExpansionNetwork
    from pipelines.parrot import pareto_selection

    gen = DiffusionGenerator.from_pretrained(SHAPES_MODEL).to(args.device)
    pen = PromptExpansionNetwork.from_pretrained(ROOT / "genalign" / "worlds" / "assets" / "shapes" / "pen")
    pen.to(args.device)
    short = (ROOT / "configs" / "prompts" / "shapes_short_eval.txt").read_text().splitlines()
    prompts = (short * 2)[:64]
    seeds = list(range(len(prompts)))
    rewards = tuple(range(1, 5))
    expansions = pen.expand(prompts, [rewards] * len(prompts), seeds=seeds).texts
    cfg = SamplingOptions(num_inference_steps=10, guidance_scale=3.0, eta=1.0)
    centred = SamplingOptions(num_inference_steps=10, guidance_scale=3.0, eta=1.0, expansion_guidance_scale=3.0)
    with_expansions = Conditions(texts=prompts, expanded_texts=expansions)

    base, mine = paired(lambda: gen.sample(prompts, cfg, seeds=seeds, batch_size=64),
                        lambda: gen.sample(with_expansions, centred, seeds=seeds, batch_size=64), args.repeats)
    expand = timed(lambda: pen.expand(prompts, [rewards] * len(prompts), seeds=seeds), args.repeats)
    rows = [{
        "benchmark": "Parrot: original-prompt-centred guidance, shapes world, 64 images, 10 DDIM steps (w1 = w2 = 3)",
        "baseline": "CFG sampling, same prompts and seeds",
        "baseline_s": base, "ours_s": mine, "ratio": mine / base, "samples_per_s": len(prompts) / mine,
    }, {
        "benchmark": "Parrot: the shapes PEN expanding 64 short prompts (all four reward identifiers, sampled)",
        "baseline": "CFG sampling of 64 images, 10 DDIM steps",
        "baseline_s": base, "ours_s": expand, "ratio": expand / base,
    }]

    scores = torch.randn(256, 4, generator=torch.Generator().manual_seed(0)).to(args.device)

    def double_loop():
        values = scores.tolist()
        keep = [True] * len(values)
        for a, x in enumerate(values):
            for y in values:
                if all(q >= p for p, q in zip(x, y)) and any(q > p for p, q in zip(x, y)):
                    keep[a] = False
                    break
        return keep

    assert pareto_selection(scores).tolist() == double_loop()
    base, mine = paired(double_loop, lambda: pareto_selection(scores), args.repeats)
    rows.append({
        "benchmark": "Parrot: batch-wise Pareto selection of 256 samples × 4 rewards",
        "baseline": "the paper's O(N²) double loop in Python",
        "baseline_s": base, "ours_s": mine, "ratio": mine / base,
    })
    return rows


def bench_ctrl_u(args) -> list[dict]:
    from diffusers import StableDiffusionControlNetPipeline

    from genalign.config import build_config, load_yaml
    from pipelines.ctrl_u import CtrlUConfig, CtrlUPipeline

    config = build_config(CtrlUConfig, load_yaml(ROOT / "configs" / "ctrl_u_shapes_segmentation.yaml"),
                          ["trainer.output_dir=/tmp/bench_ctrl_u", "trainer.progress=false"])
    ctrl_u = CtrlUPipeline(config)
    gen = ctrl_u.generator.to(args.device)
    pipe = StableDiffusionControlNetPipeline(
        vae=gen.vae, text_encoder=gen.text_encoder, tokenizer=gen.tokenizer, unet=gen.denoiser,
        controlnet=gen.controlnet, scheduler=gen.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    examples = ctrl_u.data.examples(list(range(64)), "eval")
    seeds = list(range(len(examples)))
    options = SamplingOptions(num_inference_steps=10, guidance_scale=3.0, eta=0.0)

    def plain_sampling():
        with torch.no_grad():
            pipe(examples.texts, image=examples.control.to(args.device), num_inference_steps=10, guidance_scale=3.0,
                 eta=0.0, output_type="pt", generator=[torch.Generator().manual_seed(s) for s in seeds])

    base, mine = paired(plain_sampling, lambda: gen.sample(examples.conditions(), options, seeds=seeds, batch_size=64),
                        args.repeats)
    rows = [{"benchmark": "Ctrl-U: ControlNet sampling, shapes segmentation, 64 examples, 10 DDIM steps, CFG 3",
             "baseline": "diffusers StableDiffusionControlNetPipeline", "baseline_s": base, "ours_s": mine,
             "ratio": mine / base, "samples_per_s": len(examples) / mine}]

    trainer, _, _ = ctrl_u.start_training(accumulation_steps=1, total_updates=1)
    plan = ctrl_u.epoch_plan(trainer, 0, 16, 1)
    rows16 = plan.local[:16]
    batch = ctrl_u.data.examples(plan.prompt_index[rows16].tolist(), "train")
    batch_seeds = [int(s) for s in plan.seeds[rows16]]

    def controlnet_update():
        clean = gen.encode(batch.samples, seeds=batch_seeds)
        t = torch.randint(0, gen.num_train_timesteps, (len(batch),), generator=torch.Generator().manual_seed(0))
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1)).to(clean)
        gen.noised_prediction(clean, batch.conditions(), t, noise, decode=False).loss.mean().backward()

    def ctrl_u_update():
        loss, _ = ctrl_u.loss(trainer, plan, rows16)
        loss.backward()

    base, mine = paired(controlnet_update, ctrl_u_update, args.repeats)
    rewarded = float((torch.cat([torch.randint(gen.num_train_timesteps, (1,), generator=torch.Generator().manual_seed(s + 1))
                                 for s in batch_seeds]) <= config.max_reward_timestep).double().mean())
    rows.append({"benchmark": f"Ctrl-U: one update of 16 examples ({rewarded:.0%} with t ≤ t_max, so decoded and "
                              "scored twice), forward + backward",
                 "baseline": "the plain ControlNet update (diffusion loss, one copy)", "baseline_s": base,
                 "ours_s": mine, "ratio": mine / base})
    return rows


def bench_gflownet(args) -> list[dict]:
    """GFlowNet rollouts of the sequence transformer (configs/gflownet_dna.yaml's policy: 64 wide, 2 blocks) on
    the DNA world's length (128, ACGT) and on N-grams' (36 with a stop action), 32 trajectories: the key–value
    cached sampler vs re-reading the whole prefix at every step (`cached=False`), and one TB update's policy
    forward + backward on the sampled batch for scale."""
    from pipelines.gfn.environments import SequenceTask, ngrams_task
    from pipelines.gfn.policies import SequencePolicy, sample_trajectories

    tasks = {
        "dna (L = 128)": SequenceTask(alphabet="ACGT", max_length=128, min_length=128,
                                      score=lambda x: torch.ones(len(x)), objective_names=("one",), fixed_length=True),
        "ngrams (L = 32–36)": ngrams_task(min_length=32, max_length=36),
    }
    rows = []
    for name, env in tasks.items():
        torch.manual_seed(0)
        policy = SequencePolicy(env, hidden=64, layers=2, heads=4).to(args.device)
        uniforms = torch.rand(32, env.max_steps, dtype=torch.float64, device=args.device)
        full = lambda: sample_trajectories(env, policy, uniforms, cached=False)  # noqa: E731
        fast = lambda: sample_trajectories(env, policy, uniforms)  # noqa: E731
        t_full, t_fast = paired(full, fast, max(1, args.repeats // 2))
        batch = fast()

        def update():
            log_pf, _, _ = policy(batch.states, batch.actions, batch.lengths)
            log_pf.sum().backward()

        t_update = timed(update, args.repeats)
        rows.append({"benchmark": f"gflownet rollout, {name}, 32 trajectories", "baseline": "re-read the prefix each step",
                     "baseline_s": t_full, "ours_s": t_fast, "ratio": t_fast / t_full, "samples_per_s": 32 / t_fast,
                     "update_share": t_update / (t_update + t_fast)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| benchmark | baseline | baseline s | ours s | ratio (ours / baseline) | extra |", "|---|---|---|---|---|---|"]
    for r in rows:
        extra = ", ".join(f"{k}={v:.3g}" for k, v in r.items() if k in ("peak_mib", "ddpo_updates_per_s", "samples_per_s", "vocoder_share", "embedding_share", "update_share", "cache_hits"))
        fmt = lambda v: "" if v is None else f"{v:.4f}"
        lines.append(f"| {r['benchmark']} | {r['baseline']} | {fmt(r['baseline_s'])} | {fmt(r['ours_s'])} | "
                     f"{r['ratio']:.3f} | {extra} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["sampling", "masked", "ddpo", "prdp", "memory", "attention", "shapes", "tones", "dragon", "parrot", "ctrl_u", "gflownet"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(int(args.memory_child[0]), bool(int(args.memory_child[1])), args.image_size, args.batch,
                      args.steps, args.device)
        return
    torch.manual_seed(0)
    benches = {"sampling": bench_sampling, "masked": bench_masked, "ddpo": bench_ddpo, "prdp": bench_prdp, "memory": bench_memory, "attention": bench_attention,
               "shapes": bench_shapes, "tones": bench_tones, "dragon": bench_dragon, "parrot": bench_parrot,
               "ctrl_u": bench_ctrl_u, "gflownet": bench_gflownet}
    rows = []
    for name, fn in benches.items():
        if args.only and name != args.only:
            continue
        result = fn(args)
        rows.extend(result if isinstance(result, list) else [result])
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; torch {torch.__version__}\n")
    print(markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
