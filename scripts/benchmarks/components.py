"""Method parts against their plain versions: Parrot's centred guidance, PEN expansion and Pareto selection; Ctrl-U's
ControlNet sampling and update; a DRAGON round phase by phase with its embedding cache; the GFlowNet sequence
policy's key–value cache. (Whole training units against plain loops are in `benchmarks.pipelines`.)"""

from __future__ import annotations

import time

import torch

from benchmarks.timing import paired, timed
from benchmarks.worlds import ASSETS, CONFIGS, SHAPES_MODEL, prompt_lines
from genalign.generators.diffusion import DiffusionGenerator, SamplingOptions


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

    data = load_yaml(CONFIGS / "dragon_tones_dataset_fd.yaml")
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



def bench_parrot(args) -> list[dict]:
    """On the shapes world at configs/parrot_shapes.yaml's settings (64 images, 10 DDIM steps): original-prompt-centred
    guidance ([∅, c, ĉ] in one batched call) vs CFG sampling; the shapes PEN's 64 expansions against that sampling
    time; batch-wise Pareto selection of 256 × 4 rewards in torch vs the paper's O(N²) double loop in Python."""
    from genalign.generators.base import Conditions
    from genalign.generators.prompt_expansion import PromptExpansionNetwork
    from pipelines.parrot import pareto_selection

    gen = DiffusionGenerator.from_pretrained(SHAPES_MODEL).to(args.device)
    pen = PromptExpansionNetwork.from_pretrained(ASSETS / "shapes" / "pen")
    pen.to(args.device)
    short = prompt_lines("shapes_short_eval")
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
    """On the shapes world's segmentation ControlNet (configs/ctrl_u_shapes_segmentation.yaml): sampling 64 held-out
    examples with per-step log-probs vs diffusers' StableDiffusionControlNetPipeline; one Ctrl-U update of 16
    examples vs the plain ControlNet update (diffusion loss only) on the same examples."""
    from diffusers import StableDiffusionControlNetPipeline

    from genalign.config import build_config, load_yaml
    from pipelines.ctrl_u import CtrlUConfig, CtrlUPipeline

    config = build_config(CtrlUConfig, load_yaml(CONFIGS / "ctrl_u_shapes_segmentation.yaml"),
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


