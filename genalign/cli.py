"""The `genalign` command: finetune, sample, gallery, export.

    genalign finetune --config configs/ddpo_tiny.yaml trainer.learning_rate=1e-3
    genalign sample --run runs/ddpo_tiny --prompts prompts.txt --n 4 --out samples/
    genalign gallery --run runs/ddpo_tiny
    genalign export --run runs/ddpo_tiny --out lora/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from genalign.config import ConfigError, build_config, load_yaml
from genalign.generators.base import Conditions


def load_run_config(run_dir: str | Path):
    """The pipeline config a run was trained with (its config.yaml)."""
    from pipelines import get_pipeline

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"'{run_dir}' is not a run folder (no config.yaml); pass the output_dir of a finetune run")
    data = load_yaml(path)
    cls = get_pipeline(data.get("pipeline", ""))
    return build_config(cls.config_class, data)


def load_run_generator(run_dir: str | Path, checkpoint: str = "latest", trained: bool = True, use_ema: bool = True):
    """(generator with the run's trained weights — or the base model if not `trained` —, run config).

    A run trained with EMA gives its EMA weights, as its own evaluations used; `use_ema=False` gives the raw
    trained weights."""
    from genalign.attention import apply_attention_backend, run_device
    from genalign.engine import build_generator
    from genalign.trainer import load_trained_weights, resolve_checkpoint

    config = load_run_config(run_dir)
    generator = build_generator(config.model)
    apply_attention_backend(config.trainer.attention, run_device(), generator=generator)
    if trained:
        path = resolve_checkpoint(checkpoint, Path(run_dir))
        if path is None:
            raise ConfigError(f"run '{run_dir}' has no checkpoint yet; train longer or pass --base")
        load_trained_weights(generator, config.trainer, path, use_ema=use_ema)
    return generator, config


def _device() -> torch.device:
    from accelerate import PartialState

    return PartialState().device


def cmd_finetune(args: argparse.Namespace) -> int:
    from pipelines import get_pipeline

    data = load_yaml(args.config)
    if "pipeline" not in data:
        raise ConfigError(f"config '{args.config}' has no 'pipeline:' key; add e.g. 'pipeline: ddpo'")
    cls = get_pipeline(str(data["pipeline"]))
    config = build_config(cls.config_class, data, args.overrides)
    metrics = cls(config).train()
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps({k: round(v, 5) for k, v in metrics.items()}))
        print(f"run folder: {config.trainer.output_dir}")
    return 0


def _run_prompts(path: str | None, config) -> list[str]:
    """The prompts to sample: a file's, or the run's evaluation prompts (the empty one when unconditional)."""
    from genalign.engine import load_prompts, read_prompt_file

    return read_prompt_file(path) if path else load_prompts(config.prompts)[1]


def cmd_sample(args: argparse.Namespace) -> int:
    from genalign.engine import build_gold, build_reward
    from genalign.writers import write_samples

    generator, config = load_run_generator(args.run, args.checkpoint, trained=not args.base,
                                           use_ema=not args.raw_weights)
    prompts = _run_prompts(args.prompts, config)
    generator.to(_device())
    reward = build_reward(config.reward)
    batch = [p for p in prompts for _ in range(args.n)]
    seeds = [args.seed + i for i in range(len(batch))]
    options = config.sampling.options(generator)
    if args.expansion_guidance is not None:
        options = replace(options, expansion_guidance_scale=args.expansion_guidance)
    conditions = Conditions.coerce(batch)
    expander = _run_expander(args, config, reward)
    if expander is not None:
        pen, reward_tokens = expander
        if not getattr(options, "expansion_guidance_scale", 0.0):
            raise ConfigError("sampling with a prompt-expansion network needs original-prompt-centred guidance: pass "
                              "--expansion-guidance W2 (Parrot uses 5)")
        expansion = pen.to(_device()).expand(batch, [reward_tokens] * len(batch), seeds=seeds,
                                             batch_size=config.sampling.batch_size)
        conditions = Conditions(texts=batch, expanded_texts=expansion.texts)
    rollout = generator.sample(conditions, options, seeds=seeds, batch_size=config.sampling.batch_size,
                               return_trajectory=False)
    scores = reward(rollout.outputs, rollout.texts).rewards
    gold = build_gold(config.eval.gold)
    verdicts = {k: v.cpu() for k, v in gold(rollout.outputs, rollout.texts).items()} if gold else {}
    records = [{"prompt": prompt, "seed": seed, config.reward.name: scores[i].tolist(),
                **({"expansion": conditions.expanded_texts[i]} if conditions.expanded_texts else {}),
                **{f"gold_{k}": float(v[i]) for k, v in verdicts.items()}}
               for i, (prompt, seed) in enumerate(zip(batch, seeds))]
    write_samples(rollout, generator, Path(args.out), records)
    print(f"wrote {len(batch)} {rollout.modality} samples to {args.out}")
    return 0


def _run_expander(args: argparse.Namespace, config, reward):
    """(prompt-expansion network, the reward identifiers to prepend) for `genalign sample`, or None: the one
    `--pen` names (all its identifiers), else a Parrot run's own PEN with the checkpoint's weights."""
    if args.pen:
        from genalign.generators.prompt_expansion import PromptExpansionNetwork

        pen = PromptExpansionNetwork.from_pretrained(args.pen)
        return pen, tuple(range(1, pen.num_reward_tokens + 1))
    if config.pipeline != "parrot" or not config.pen.pretrained:
        return None
    from genalign.trainer import resolve_checkpoint
    from pipelines.parrot import load_trained_expander

    checkpoint = None if args.base else resolve_checkpoint(args.checkpoint, Path(args.run))
    num_rewards = len(reward.objectives)
    return (load_trained_expander(config, checkpoint, num_rewards, use_ema=not args.raw_weights),
            tuple(range(1, num_rewards + 1)))


def cmd_gallery(args: argparse.Namespace) -> int:
    from genalign.engine import build_gold, build_reward, total_reward
    from genalign.gallery import PromptRow, write_gallery
    from genalign.generators.base import Rollout
    from genalign.writers import gallery_samples, gold_label, sample_figures

    run = Path(args.run)
    base, config = load_run_generator(run, trained=False)
    tuned, _ = load_run_generator(run, args.checkpoint, trained=True, use_ema=not args.raw_weights)
    if config.pipeline == "ctrl_u":
        return _control_gallery(args, run, config, base, tuned)
    prompts = _run_prompts(args.prompts, config)[: args.max_prompts]
    reward = build_reward(config.reward)
    gold = build_gold(config.eval.gold)
    batch = [p for p in prompts for _ in range(args.n)]
    seeds = [args.seed + i for i in range(len(batch))]
    device = _device()
    results = {}
    for name, generator in (("before", base), ("after", tuned)):
        generator.to(device)
        rollout = generator.sample(batch, config.sampling.options(generator), seeds=seeds,
                                   batch_size=config.sampling.batch_size, return_trajectory=False)
        scores = total_reward(reward(rollout.outputs, rollout.texts).rewards).cpu()
        verdicts = {k: v.cpu() for k, v in gold(rollout.outputs, rollout.texts).items()} if gold else {}
        labels = [
            {"seed": str(seed), **({"gold": gold_label({k: float(v[i]) for k, v in verdicts.items()})} if gold else {})}
            for i, seed in enumerate(seeds)
        ]
        results[name] = (gallery_samples(rollout, generator, scores.tolist(), labels), scores, verdicts, rollout)

    def prompt_rollout(rollout: Rollout, p: int) -> Rollout:
        rows = slice(p * args.n, (p + 1) * args.n)
        return Rollout(outputs=rollout.outputs[rows], modality=rollout.modality, conditions=rollout.conditions[rows])

    rows = [
        PromptRow(prompt=prompt or "(unconditional)",
                  **{name: samples[p * args.n : (p + 1) * args.n] for name, (samples, *_) in results.items()},
                  figures=sample_figures({name: prompt_rollout(r[3], p) for name, r in results.items()}, tuned))
        for p, prompt in enumerate(prompts)
    ]
    summary: dict[str, float | str] = {"reward": config.reward.name}
    for name, (_, scores, verdicts, _) in results.items():
        summary[f"mean reward {name}"] = float(scores.mean())
        for key, value in verdicts.items():
            summary[f"gold {key} {name}"] = float(value.mean())
    summary["samples per grid"] = args.n
    metrics = run / "metrics.jsonl"
    plot_keys = ["reward_mean", "eval_reward_mean", "approx_kl_after_update", "kl", "grad_norm"]
    gold_keys = list(results["after"][2])
    if "all_correct" in gold_keys:
        gold_keys = ["all_correct", "position", "colour"]
    plot_keys[2:2] = [f"eval_gold_{key}" for key in gold_keys[:4]]
    index = write_gallery(
        Path(args.out) if args.out else run / "gallery",
        rows,
        title=f"{config.pipeline}: {run.name}",
        summary=summary,
        metrics_path=metrics if metrics.exists() else None,
        plot_keys=plot_keys,
    )
    print(json.dumps(summary))
    print(f"gallery: {index.resolve()}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a run's trained model in its family's native form: the LoRA adapter (diffusers' format for image
    and audio models, the merged model for masked ones) or, when fully fine-tuned, the whole model. Checkpoints of
    unsharded runs carry the adapter already (lora/); for an FSDP run this is how to get it."""
    generator, config = load_run_generator(args.run, args.checkpoint, use_ema=not args.raw_weights)
    save = generator.save_adapter if config.trainer.lora.enabled else generator.save_pretrained
    folder = save(Path(args.out))
    print(f"exported the {'adapter' if config.trainer.lora.enabled else 'model'} of {args.run} to {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genalign", description="Reward fine-tuning of generative models.")
    sub = parser.add_subparsers(dest="command", required=True)

    finetune = sub.add_parser("finetune", help="fine-tune a model with a pipeline config")
    finetune.add_argument("--config", required=True, help="YAML config (see configs/)")
    finetune.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.learning_rate=1e-4")
    finetune.set_defaults(func=cmd_finetune)

    sample = sub.add_parser("sample",
                            help="sample from a fine-tuned run (images as PNG, audio as WAV, sequences as FASTA)")
    sample.add_argument("--run", required=True, help="a finetune run folder (trainer.output_dir)")
    sample.add_argument("--prompts", help="text file, one prompt per line (default: the run's eval prompts)")
    sample.add_argument("--n", type=int, default=4, help="samples per prompt")
    sample.add_argument("--out", required=True, help="folder for the samples (PNG, WAV or FASTA) and samples.jsonl")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint folder")
    sample.add_argument("--base", action="store_true", help="sample the base model instead")
    sample.add_argument("--raw-weights", action="store_true",
                        help="with a run trained with EMA: the raw trained weights instead of the EMA ones")
    sample.add_argument("--pen", help="a prompt-expansion network folder whose expansions guide sampling (default: "
                                      "a Parrot run's own PEN)")
    sample.add_argument("--expansion-guidance", type=float, default=None, metavar="W2",
                        help="w2 of original-prompt-centred guidance, w1·ε(c) + (1−w1−w2)·ε(∅) + w2·ε(ĉ) with "
                             "w1 = the run's guidance_scale (default: the run's sampling.expansion_guidance_scale)")
    sample.set_defaults(func=cmd_sample)

    gallery = sub.add_parser("gallery", help="write an HTML page of before/after samples and reward curves")
    gallery.add_argument("--run", required=True)
    gallery.add_argument("--prompts", help="prompt file (default: the run's eval prompts)")
    gallery.add_argument("--n", type=int, default=4, help="samples per prompt")
    gallery.add_argument("--max-prompts", type=int, default=8)
    gallery.add_argument("--seed", type=int, default=0)
    gallery.add_argument("--checkpoint", default="latest")
    gallery.add_argument("--out", help="output folder (default: RUN/gallery)")
    gallery.add_argument("--raw-weights", action="store_true",
                         help="with a run trained with EMA: the raw trained weights instead of the EMA ones")
    gallery.set_defaults(func=cmd_gallery)

    export = sub.add_parser("export", help="write a run's trained adapter (or fully fine-tuned model) in its "
                                           "family's native format")
    export.add_argument("--run", required=True)
    export.add_argument("--out", required=True, help="folder to write")
    export.add_argument("--checkpoint", default="latest")
    export.add_argument("--raw-weights", action="store_true",
                        help="with a run trained with EMA: the raw trained weights instead of the EMA ones")
    export.set_defaults(func=cmd_export)
    return parser


def _control_gallery(args: argparse.Namespace, run: Path, config, base, tuned) -> int:
    """A ControlNet run's gallery: held-out examples (the run's data carries the captions), the control image,
    base beside fine-tuned, controllability by the evaluation and the reward model, and the uncertainty map."""
    from pipelines.ctrl_u import CtrlUPipeline, write_control_gallery

    if args.prompts:
        raise ConfigError("a ControlNet run's gallery shows its data's held-out examples; drop --prompts")
    device = _device()
    pipe = CtrlUPipeline(config, generator=tuned.to(device))  # the run's data, reward and evaluation models
    judge = pipe.evaluation_reward.to(device) if pipe.evaluation_reward is not None else None
    index = write_control_gallery(
        Path(args.out) if args.out else run / "gallery", {"base": base.to(device), "fine_tuned": tuned},
        pipe.data, pipe.reward.to(device), judge, pipe.options, examples=args.max_prompts, samples=args.n,
        seed=args.seed, batch_size=config.sampling.batch_size, uncertainty_scale=config.uncertainty_scale,
        title=f"{config.pipeline}: {run.name} ({config.condition})",
    )
    print(f"gallery: {index.resolve()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from genalign.trainer import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, OSError, ValueError, CheckpointError, FloatingPointError) as error:
        # One clear line instead of a traceback for problems the user can fix. Under a multi-process launch,
        # an error every process raises alike (a config error, or one the engine made them agree on) is
        # printed by the first process only.
        raised_everywhere = isinstance(error, ConfigError) or getattr(error, "raised_on_every_process", False)
        if int(os.environ.get("RANK", "0")) == 0 or not raised_everywhere:
            print(f"genalign {args.command}: error: {error}", file=sys.stderr)
        return 2


def finetune_then_gallery(argv: Sequence[str]) -> int:
    """`genalign finetune` with `argv` (--config and overrides), then `genalign gallery` of the finished run: the
    modality scripts' entry point (scripts/finetune_dna.py, finetune_protein.py). `--no-gallery` skips the
    gallery and `--gallery-n N` sets its samples per prompt."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--no-gallery", action="store_true")
    parser.add_argument("--gallery-n", type=int, default=4)
    own, rest = parser.parse_known_args(list(argv))
    code = main(["finetune", *rest])
    if code or own.no_gallery:
        return code
    from pipelines import get_pipeline

    args = build_parser().parse_args(["finetune", *rest])
    data = load_yaml(args.config)
    config = build_config(get_pipeline(str(data["pipeline"])).config_class, data, args.overrides)
    return main(["gallery", "--run", config.trainer.output_dir, "--n", str(own.gallery_n)])


if __name__ == "__main__":
    sys.exit(main())
