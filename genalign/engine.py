"""What every pipeline shares: config sections, model/prompt/reward loading, epoch plans, the sample → score →
gather step, evaluation, and the end of an epoch (evaluate, log, checkpoint).

Pipelines know a model only through the generator protocol (`genalign.generators.base`), so everything here
works for any model family. The epoch plan is what makes runs reproducible across process counts: each global
sample index has its own condition and noise seed, and the processes split the indices so that every optimiser
update sees the same set of samples whether 1 or N processes run (see `EpochPlan`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import numpy as np
import torch

from genalign.attention import apply_attention_backend, run_device
from genalign.config import ConfigError, PositiveInt, to_dict
from genalign.generators import detect_family, generator_class
from genalign.generators.base import Conditions, Generator, Rollout, Trajectory
from genalign.sharding import requested_sharding
from genalign.trainer import ParameterGroup, Trainer, TrainerConfig, launched_processes

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """Which model to fine-tune: a folder or hub id, and its family ("auto" tells it from the folder:
    model_index.json → diffusion, or audio when it names an AudioLDM/MusicLDM pipeline; a masked model's
    config.json → masked; a hub id → diffusion, so set `family: audio` for an audio hub id)."""

    pretrained: str = "runs/worlds/tiny-sd"
    family: Literal["auto", "diffusion", "audio", "masked"] = "auto"
    revision: str | None = None
    scheduler: Literal["ddim", "ddpm"] | None = None
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    # Diffusion models only: attach a ControlNet, "unet" (initialised from the UNet) or a folder / hub id.
    controlnet: str | None = None


@dataclass
class PromptConfig:
    """Training prompts (a file with one prompt per line, or a list) and held-out evaluation prompts. An
    unconditional model (e.g. a masked sequence model) sets `unconditional: true` and gives no prompts."""

    file: str | None = None
    prompts: list[str] = field(default_factory=list)
    eval_file: str | None = None
    eval_prompts: list[str] = field(default_factory=list)
    unconditional: bool = False


@dataclass
class RewardConfig:
    """A reward from the `rewards` registry, by name, with constructor arguments; `device` runs its model on a
    device of its own (e.g. "cuda:1", or "cpu" to keep an accelerator for the generator) and `batch_size` bounds
    each call (instance rewards only), see `rewards.placement`."""

    name: str = "jpeg_incompressibility"
    kwargs: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    batch_size: PositiveInt | None = None


@dataclass
class SamplingConfig:
    """Sampler settings. `num_inference_steps`, `log_prob_reduction` ("sum" = the true density, or "mean" over
    the state's elements) and `batch_size` apply to every family; the rest to one family each, and None means
    that family's default: guidance_scale, eta, negative_prompt and expansion_guidance_scale (diffusion and audio;
    w2 of Parrot's original-prompt-centred guidance), height, width (diffusion), audio_length_in_s (audio),
    temperature, length, final_step ("argmax" or "sample": whether the last step has a density) (masked).
    Setting one that the model's family does not have is an error."""

    num_inference_steps: PositiveInt = 10
    log_prob_reduction: Literal["sum", "mean"] = "sum"
    batch_size: PositiveInt = 16
    guidance_scale: float | None = None
    eta: float | None = None
    height: PositiveInt | None = None
    width: PositiveInt | None = None
    negative_prompt: str | None = None
    temperature: float | None = None
    length: PositiveInt | None = None
    final_step: Literal["argmax", "sample"] | None = None
    audio_length_in_s: float | None = None
    expansion_guidance_scale: float | None = None

    def options(self, generator: Generator) -> Any:
        """The generator's own sampling options with these settings."""
        defaults = generator.default_options()
        known = {f.name for f in dataclasses.fields(defaults)}
        values = {k: v for k, v in to_dict(self).items() if k != "batch_size" and v is not None}
        foreign = sorted(set(values) - known)
        if foreign:
            raise ConfigError(
                f"sampling.{foreign[0]} does not apply to a {type(generator).__name__}; its sampling settings are "
                f"{', '.join(sorted(known))} (remove sampling.{foreign[0]} from the config)"
            )
        return dataclasses.replace(defaults, **values)


@dataclass
class GoldConfig:
    """A gold evaluator (a world's judge that no reward uses) by name from `genalign.worlds.GOLD_EVALUATORS`,
    with constructor arguments; no name, no gold evaluation."""

    name: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """Held-out evaluation: every `every` epochs, `samples_per_prompt` fixed-seed samples per eval prompt,
    scored by the training reward and, when `gold.name` is set, by the gold evaluator."""

    every: PositiveInt = 5
    samples_per_prompt: PositiveInt = 2
    seed: int = 10_000
    gold: GoldConfig = field(default_factory=GoldConfig)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def build_generator(config: ModelConfig) -> Generator:
    """The configured model, loaded through its family's `from_pretrained`."""
    family = detect_family(config.pretrained) if config.family == "auto" else config.family
    cls = generator_class(family)
    if family == "diffusion" and config.controlnet is not None:
        return cls.from_pretrained(config.pretrained, torch_dtype=_DTYPES[config.dtype], revision=config.revision,
                                   scheduler=config.scheduler, controlnet=config.controlnet)
    if config.controlnet is not None:
        raise ConfigError(f"model.controlnet applies to diffusion (text-to-image) models only; remove it for a "
                          f"{family} model")
    if family in ("diffusion", "audio"):
        return cls.from_pretrained(config.pretrained, torch_dtype=_DTYPES[config.dtype], revision=config.revision,
                                   scheduler=config.scheduler)
    for key in ("revision", "scheduler"):
        if getattr(config, key) is not None:
            raise ConfigError(f"model.{key} applies to diffusers models only; remove it for a {family} model")
    return cls.from_pretrained(config.pretrained, torch_dtype=_DTYPES[config.dtype])


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line; a missing or empty file is an error that says what to pass."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file '{path}' does not exist; pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file '{path}' has no prompts (no non-empty lines); put one prompt per line")
    return prompts


def load_prompts(config: PromptConfig) -> tuple[list[str], list[str]]:
    """(training prompts, eval prompts). Eval prompts default to the training prompts; an unconditional model
    has the one empty condition."""
    if config.unconditional:
        if config.file or config.prompts or config.eval_file or config.eval_prompts:
            raise ConfigError("prompts.unconditional=true takes no prompts; remove prompts.file/prompts/eval_*")
        return [""], [""]
    train = read_prompt_file(config.file) if config.file else list(config.prompts)
    if not train:
        raise ConfigError("no training prompts: set prompts.file to a text file or prompts.prompts to a list "
                          "(or prompts.unconditional=true for an unconditional model)")
    evaluation = read_prompt_file(config.eval_file) if config.eval_file else list(config.eval_prompts)
    return train, evaluation or train


def build_reward(config: RewardConfig):
    from rewards import build_reward as build
    from rewards.placement import Placed

    reward = build(config.name, **config.kwargs)
    if config.device is None and config.batch_size is None:
        return reward
    return Placed(reward, device=config.device, batch_size=config.batch_size)


def build_gold(config: GoldConfig):
    """The configured gold evaluator, or None."""
    if config.name is None:
        return None
    from genalign.worlds import build_gold as build

    try:
        return build(config.name, **config.kwargs)
    except TypeError as exc:  # a missing or misspelt constructor argument
        raise ConfigError(f"eval.gold: {exc}; set the arguments under eval.gold.kwargs") from exc
    except (ValueError, OSError) as exc:
        raise ConfigError(f"eval.gold: {exc}") from exc


def check_modality(reward, generator: Generator) -> None:
    """A reward must read what the generator makes (images, audio, sequences)."""
    modality = getattr(reward, "modality", None)
    if modality is not None and modality != generator.modality:
        raise ConfigError(
            f"reward '{getattr(reward, 'name', type(reward).__name__)}' scores {modality} outputs but the model "
            f"({type(generator).__name__}) generates {generator.modality}; pick a {generator.modality} reward"
        )


# ----------------------------------------------------------------------------------- epochs across processes


@dataclass
class EpochPlan:
    """Which samples one epoch draws, and which process draws (and trains on) which.

    Global sample i has condition `prompt_index[i]` and noise seed `seeds[i]`, independent of the number of
    processes. A seeded permutation `order` of the N global samples is dealt round-robin: process p holds
    `order[p::P]`, so its j-th local sample is `order[j·P + p]`. An update that takes local positions
    [a, b) on every process therefore trains on `order[a·P : b·P]` — the same global set for any P.

    Attributes:
        prompt_index: [N] index into the prompt list for each global sample.
        seeds: [N] per-sample noise seeds.
        order: [N] permutation of global indices.
        local: global indices held by this process, in training order.
    """

    prompt_index: np.ndarray
    seeds: np.ndarray
    order: np.ndarray
    local: np.ndarray

    @classmethod
    def make(
        cls,
        *,
        seed: int,
        epoch: int,
        num_prompts: int,
        prompts_per_epoch: int,
        samples_per_prompt: int,
        num_processes: int = 1,
        process_index: int = 0,
    ) -> "EpochPlan":
        n = prompts_per_epoch * samples_per_prompt
        if n % num_processes:
            raise ConfigError(
                f"{prompts_per_epoch} prompts × {samples_per_prompt} samples = {n} samples per epoch do not split "
                f"evenly over {num_processes} processes; make the product a multiple of {num_processes}"
            )
        rng = np.random.default_rng([seed, epoch])
        chosen = rng.choice(num_prompts, size=prompts_per_epoch, replace=prompts_per_epoch > num_prompts)
        prompt_index = np.repeat(chosen, samples_per_prompt)
        seeds = rng.integers(0, 2**31 - 1, size=n)
        order = rng.permutation(n)
        return cls(prompt_index, seeds, order, order[process_index::num_processes])

    def __len__(self) -> int:
        return len(self.prompt_index)

    def stream(self, name: str, global_index: int, *key: int) -> np.random.Generator:
        """A random stream private to one global sample (e.g. its training timesteps in inner epoch `key`)."""
        return np.random.default_rng([int(self.seeds[global_index]), sum(map(ord, name)), *map(int, key)])


def split_batch(total: int, num_processes: int, micro_batch: int, *, parts: int = 1,
                names: tuple[str, str] = ("samples per epoch", "train_batch_size")) -> tuple[int, int]:
    """(samples per process and part, micro-batches in it) for `total` samples split over processes and into
    `parts` updates; a clear error naming the settings when they do not divide."""
    what, batch_key = names
    if total % (num_processes * parts):
        raise ConfigError(
            f"{total} {what} must split evenly over {num_processes} process(es)" + (f" × {parts} updates" if parts > 1
                                                                                   else "")
            + "; change prompts_per_epoch or samples_per_prompt"
        )
    per_part = total // num_processes // parts
    if per_part % micro_batch:
        raise ConfigError(
            f"each process trains on {per_part} samples per update, not a multiple of {batch_key}={micro_batch}; "
            f"pick a divisor of {per_part}"
        )
    return per_part, per_part // micro_batch


def gather_rows(trainer: Trainer, values: torch.Tensor, global_index, total: int) -> torch.Tensor:
    """Every process's rows of `values` placed at their global indices: [total, ...] on every process.

    Args:
        values: [n_local, ...] rows of this process; processes may hold different numbers of rows (even 0).
        global_index: [n_local] the global index of each row; together the processes cover 0 … total−1.
    """
    index = torch.as_tensor(np.asarray(global_index), dtype=torch.long, device=values.device)
    if trainer.num_processes == 1:
        ordered = values.new_empty((total, *values.shape[1:]))
        ordered[index] = values
        return ordered
    # accelerate's gather needs equal shapes: pad every shard to the longest, marking padding with index −1.
    counts = trainer.gather(torch.tensor([len(values)], device=values.device))
    width = int(counts.max())
    padded = values.new_zeros((width, *values.shape[1:]))
    padded[: len(values)] = values
    padded_index = torch.full((width,), -1, dtype=torch.long, device=values.device)
    padded_index[: len(values)] = index
    gathered, gathered_index = trainer.gather(padded), trainer.gather(padded_index)
    keep = gathered_index >= 0
    ordered = values.new_empty((total, *values.shape[1:]))
    ordered[gathered_index[keep]] = gathered[keep]
    return ordered


def gather_in_order(trainer: Trainer, values: torch.Tensor, plan: EpochPlan) -> torch.Tensor:
    """Every process's rows of `values` (one per local sample of `plan`), gathered in global sample order."""
    return gather_rows(trainer, values, plan.local, len(plan))


def gather_trajectory(trainer: Trainer, trajectory: Trajectory, plan: EpochPlan) -> Trajectory:
    """Every process's trajectories (one per local sample of `plan`) in global sample order, on every process."""
    return trajectory.map(lambda t: gather_in_order(trainer, t, plan))


def on_every_process(trainer: Trainer, compute: Callable[[], T], what: str = "the reward") -> T:
    """Run `compute` (e.g. scoring a batch) so that an error on one process is an error on every process.

    Without this, the processes that succeeded would wait forever in their next collective for the one that
    failed. Every process must call it at the same point; the failing one re-raises its own error, the
    others raise a RewardError that quotes it.
    """
    from accelerate.utils import gather_object

    from rewards import RewardError

    error: Exception | None = None
    result = None
    try:
        result = compute()
    except Exception as caught:  # noqa: BLE001 — re-raised on this process, reported on the others
        error = caught
    if not trainer.any_process(error is not None):
        return result
    failed = [message for message in gather_object([None if error is None else f"{type(error).__name__}: {error}"])
              if message is not None]
    if error is None:
        error = RewardError(f"{what} failed on another process: {failed[0] if failed else 'unknown error'}")
    error.raised_on_every_process = True  # lets the command line print it once
    raise error


def total_reward(values: torch.Tensor) -> torch.Tensor:
    """[B] or [B, K] rewards → [B]: the objectives' sum (weights belong in the reward's own composition)."""
    return values if values.ndim == 1 else values.sum(dim=1)


def reward_metrics(values: torch.Tensor, objectives: tuple[str, ...], prefix: str = "reward") -> dict[str, float]:
    """Mean/std of the total reward, plus the mean of each objective when there are several."""
    total = total_reward(values).float()
    out = {f"{prefix}_mean": float(total.mean()), f"{prefix}_std": float(total.std(unbiased=False))}
    if values.ndim == 2 and values.shape[1] > 1:
        for k, name in enumerate(objectives):
            out[f"{prefix}_mean/{name}"] = float(values[:, k].float().mean())
    return out


def evaluate(
    generator: Generator,
    reward,
    prompts: list[str],
    options: Any,
    *,
    samples_per_prompt: int,
    seed: int,
    batch_size: int,
    trainer: Trainer | None = None,
    gold=None,
    conditions: Callable[[list[str], list[int]], Conditions] | None = None,
) -> dict[str, float]:
    """Mean/std reward of fixed-seed samples on held-out prompts, plus ``eval_gold_<name>`` means of the gold
    evaluator's per-sample verdicts when one is given.

    `conditions(prompts, seeds)` turns a shard's prompts into what the generator samples from (e.g. the prompts
    with their expansions); the reward and gold judge always score against the prompts themselves.

    With a `trainer` of several processes the samples are sharded round-robin (shards may be uneven, or
    empty) and gathered; every process gets the same numbers.
    """
    all_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    seeds = [seed + i for i in range(len(all_prompts))]
    processes, rank = (1, 0) if trainer is None else (trainer.num_processes, trainer.process_index)
    mine = list(range(rank, len(all_prompts), processes))
    width = () if len(reward.objectives) == 1 else (len(reward.objectives),)

    def score_shard() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not mine:
            return torch.zeros((0, *width), device=generator.device), {}
        prompts, prompt_seeds = [all_prompts[i] for i in mine], [seeds[i] for i in mine]
        rollout = generator.sample(
            prompts if conditions is None else conditions(prompts, prompt_seeds), options, seeds=prompt_seeds,
            batch_size=batch_size, return_trajectory=False,
        )
        values = reward(rollout.outputs, prompts).rewards.float()
        verdicts = {} if gold is None else {k: v.float() for k, v in gold(rollout.outputs, prompts).items()}
        return values, verdicts

    if trainer is None:
        values, verdicts = score_shard()
    else:
        with trainer.gathered_weights():  # under FSDP: shards may be uneven or empty
            values, verdicts = on_every_process(trainer, score_shard, what="held-out evaluation")
        values = gather_rows(trainer, values.to(trainer.device), mine, len(all_prompts))
        if gold is not None:
            from accelerate.utils import gather_object

            # A process with no samples has no verdicts: it learns their names from the others.
            names = sorted(set().union(*gather_object([sorted(verdicts)])))
            verdicts = {
                name: gather_rows(trainer, verdicts.get(name, torch.zeros(0, device=trainer.device)).to(trainer.device),
                                  mine, len(all_prompts))
                for name in names
            }
    metrics = reward_metrics(values, reward.objectives, prefix="eval_reward")
    for name, verdict in verdicts.items():
        metrics[f"eval_gold_{name}"] = float(verdict.float().mean())
    return metrics


# ----------------------------------------------------------------------------------- the pipeline base


@dataclass
class PipelineConfig:
    """The sections every pipeline's config has; a pipeline's config adds its method's settings."""

    pipeline: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    epochs: PositiveInt = 10


@dataclass
class EpochSamples:
    """One epoch's samples on this process, scored: the rollout of its local share and every process's
    rewards in global order ([N] or [N, K])."""

    plan: EpochPlan
    rollout: Rollout
    global_scores: torch.Tensor


class Pipeline:
    """What every pipeline holds: its config, prompts, generator, sampling options and reward.

    A method subclasses it and writes its own `train()` top to bottom; pass `generator` / `reward` objects to
    use your own instead of building them from the config.
    """

    takes_prompts = True  # False: the method's data brings its own captions (prompts.* must stay empty)
    # The sharded strategies ("fsdp", "deepspeed") the method is tested under (2 sharded processes equal to 1):
    # under FSDP every process must make the same collective calls in training forwards and backwards; under
    # DeepSpeed every backward must sit in `trainer.accumulate()`, since the engine steps at its boundary.
    sharding_strategies: tuple[str, ...] = ()

    def __init__(self, config: PipelineConfig, generator: Generator | None = None, reward=None):
        self.config = config
        if self.takes_prompts:
            self.prompts, self.eval_prompts = load_prompts(config.prompts)
        elif config.prompts != PromptConfig():
            raise ConfigError(f"the {config.pipeline} pipeline trains on its data's captions; remove the prompts "
                              "section (set data.* instead)")
        else:
            self.prompts, self.eval_prompts = [], []
        self.generator = generator or build_generator(config.model)
        self.options = config.sampling.options(self.generator)
        self.reward = reward or build_reward(config.reward)
        check_modality(self.reward, self.generator)
        self.gold = build_gold(config.eval.gold)
        self.attention = apply_attention_backend(config.trainer.attention, run_device(), generator=self.generator,
                                                 reward=self.reward, gold=self.gold)
        logger.info("attention backend %s: %s", config.trainer.attention, self.attention)

    def trainable_steps(self) -> np.ndarray:
        """Indices of the sampling steps with a density (what policy-gradient methods train on)."""
        steps = np.flatnonzero(self.generator.trainable_steps(self.options).cpu().numpy())
        if len(steps) == 0:
            raise ConfigError(f"{self.config.pipeline} trains on steps with a density, and these sampling settings "
                              "have none (diffusion: eta > 0 with DDIM, or a DDPM scheduler)")
        return steps

    def start_training(
        self,
        *,
        accumulation_steps: int,
        total_updates: int,
        extra_parameters: dict[str, ParameterGroup] | None = None,
        keep_reference: bool = False,
    ) -> tuple[Trainer, int, dict[str, Any]]:
        """The run's `Trainer` (which checks and claims the run folder), with a checkpoint restored if
        `trainer.resume` asks for one; a fresh run first logs the base model's held-out evaluation (step −1).

        Returns:
            (trainer, first epoch to run, the pipeline state saved with the restored checkpoint or {}).
        """
        c = self.config
        sharding = requested_sharding()
        if sharding is not None and launched_processes() > 1 and sharding not in self.sharding_strategies:
            tested = f" (it is under {', '.join(self.sharding_strategies)})" if self.sharding_strategies else ""
            raise ConfigError(f"the {c.pipeline} pipeline is not tested under {sharding}{tested}; launch it with data "
                              "parallelism (configs/accelerate/ddp.yaml, or no --config_file)")
        trainer = Trainer(
            self.generator,
            c.trainer,
            accumulation_steps=accumulation_steps,
            total_updates=total_updates,
            run_config=to_dict(c),
            extra_parameters=extra_parameters,
            keep_reference=keep_reference,
        )
        start, state = trainer.resume_if_requested()
        if start == 0:
            trainer.log(self.evaluate(trainer), step=-1)
        return trainer, start, state

    def epoch_plan(self, trainer: Trainer, epoch: int, prompts_per_epoch: int, samples_per_prompt: int) -> EpochPlan:
        """This epoch's samples (prompts, seeds, and which process holds which) for the run's seed."""
        return EpochPlan.make(
            seed=self.config.trainer.seed,
            epoch=epoch,
            num_prompts=len(self.prompts),
            prompts_per_epoch=prompts_per_epoch,
            samples_per_prompt=samples_per_prompt,
            num_processes=trainer.num_processes,
            process_index=trainer.process_index,
        )

    def conditions(self, plan: EpochPlan, global_indices) -> Conditions:
        """The conditions of the given global samples of `plan`."""
        return Conditions.coerce([self.prompts[plan.prompt_index[i]] for i in global_indices])

    def sample_and_score(self, trainer: Trainer, plan: EpochPlan, options: Any = None,
                         conditions: Conditions | None = None) -> EpochSamples:
        """Sample this process's share of the epoch (with log-probs, under the training autocast so that recorded
        and re-evaluated log-probs agree), score it, and gather every process's rewards in global order.
        `options` overrides the run's sampling options (e.g. fewer steps for demonstrations); `conditions` (one per
        local sample) what the generator is conditioned on (e.g. prompt expansions). The reward always scores
        against the plan's own prompts, the ones the user asked for."""
        prompts = self.conditions(plan, plan.local)
        with trainer.gathered_weights(), trainer.autocast():
            rollout = self.generator.sample(
                conditions or prompts, options or self.options, seeds=plan.seeds[plan.local].tolist(),
                batch_size=self.config.sampling.batch_size,
            )
        scores = on_every_process(trainer, lambda: self.reward(rollout.outputs, prompts.texts).rewards.float())
        return EpochSamples(plan, rollout, gather_in_order(trainer, scores, plan))

    def finish_epoch(self, trainer: Trainer, epoch: int, metrics: dict[str, float], state: dict[str, Any],
                     started: float, samples: int) -> dict[str, float]:
        """The end of every epoch: throughput, LR and gradient norm, the held-out evaluation when due, the log
        record, and the checkpoint when due (with the pipeline's `state`). Returns the logged metrics."""
        c = self.config
        metrics = {
            **metrics,
            "samples_per_s": samples / (time.time() - started),
            "lr": trainer.learning_rate,
            "grad_norm": trainer.last_grad_norm,
        }
        if (epoch + 1) % c.eval.every == 0 or epoch + 1 == c.epochs:
            metrics.update(self.evaluate(trainer))
        trainer.log(metrics, step=epoch)
        trainer.maybe_checkpoint(epoch, c.epochs, state)
        return metrics

    def sample(self, prompts: list[str], seeds: list[int] | None = None) -> Rollout:
        """Samples from the current model with the run's sampler settings."""
        return self.generator.sample(prompts, self.options, seeds=seeds, batch_size=self.config.sampling.batch_size,
                                     return_trajectory=False)

    def evaluate(self, trainer) -> dict[str, float]:
        """Held-out reward with fixed prompts and seeds (EMA weights if any), sharded over the processes."""
        c = self.config
        with trainer.ema_weights():
            return evaluate(
                self.generator,
                self.reward,
                self.eval_prompts,
                self.options,
                samples_per_prompt=c.eval.samples_per_prompt,
                seed=c.eval.seed,
                batch_size=c.sampling.batch_size,
                trainer=trainer,
                gold=self.gold,
            )
