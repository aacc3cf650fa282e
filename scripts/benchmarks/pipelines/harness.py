"""Running one training unit of a real pipeline and of its plain reference loop, timing both, and checking that they
computed the same thing.

A `Case` names a pipeline, its shipped config and the overrides that size the benchmark (and the smallest size the
test uses). One *unit* is what the pipeline repeats: an epoch (one round of sampling, scoring and its updates) for
the diffusion and masked-diffusion pipelines, a run of `updates` optimiser updates for GFlowNets.

- The engine side builds the pipeline from the config (loading its models), then runs `train()` for one unit with
  the held-out evaluation and checkpointing switched off (neither is part of the method's update). Its time is the
  sum of the epochs' own timings (each epoch's `samples_per_s` in metrics.jsonl: from the epoch's start to before its
  evaluation, log and checkpoint), so the Trainer's construction (LoRA adapters, optimiser, reference copy) is not
  in it.
- The reference side loads the same models (the case's `load_models`) and runs the case's `reference` function,
  which sets up what it needs (LoRA adapters, optimiser, a frozen copy) and times its unit the same way
  (`Stopwatch`, set-up excluded).

Both start from the pretrained weights with the same seeds, so their first updates must agree: each side reports
named values (reward mean, loss, gradient norm before clipping, ...) and `check` compares them within the case's
tolerance. `measure` alternates the two sides, after a warm-up pair whose values are the ones checked.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from unittest import mock

from benchmarks.timing import synchronize
from benchmarks.worlds import CONFIGS


@dataclass
class Outcome:
    """One unit's time and the values the equality check compares (e.g. {"reward_mean": …, "grad_norm": …})."""

    seconds: float
    values: dict[str, float]


@dataclass
class Case:
    """A pipeline benchmark: the real pipeline on `config` (a file under configs/) with `overrides`, against
    `reference(config, load_models(config))`, the same algorithm as a plain loop.

    Attributes:
        samples, updates: config → samples (or trajectories) and optimiser updates per epoch (what the pipeline's
            epochs report their samples_per_s over); a unit is `config.epochs` epochs.
        load_models: config → the models the reference uses, freshly loaded (it trains them).
        reference: (config, models) → Outcome; sets up, and times its unit with a `Stopwatch`.
        engine_values: metrics.jsonl records of the unit (one per epoch) → the values `reference` reports.
        tolerance: largest relative difference accepted between the two sides' values.
        leaves_out: what the reference loop leaves out or does differently (reported with the benchmark).
    """

    name: str
    title: str
    config: str
    overrides: list[str]
    test_overrides: list[str]
    samples: Callable[[Any], int]
    updates: Callable[[Any], int]
    load_models: Callable[[Any], Any]
    reference: Callable[[Any, Any], Outcome]
    engine_values: Callable[[list[dict]], dict[str, float]]
    leaves_out: str
    tolerance: float = 1e-3

    def build_config(self, output_dir: str | Path, test_size: bool = False):
        """The case's config (benchmark size, or the test's smallest size) writing into `output_dir`."""
        from genalign.config import build_config, load_yaml
        from pipelines import get_pipeline

        cls = get_pipeline(load_yaml(CONFIGS / self.config)["pipeline"]).config_class
        # One epoch per unit unless the case says otherwise (GFlowNets: an epoch is one update).
        overrides = ["epochs=1", *self.overrides, *(self.test_overrides if test_size else []),
                     f"trainer.output_dir={output_dir}", "trainer.progress=false", "trainer.log_with=[jsonl]"]
        return build_config(cls, load_yaml(CONFIGS / self.config), overrides)


class Stopwatch:
    """`with Stopwatch() as clock: …` then `clock.seconds` (CUDA work synchronised at both ends)."""

    def __enter__(self) -> "Stopwatch":
        synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize()
        self.seconds = time.perf_counter() - self.start


def fresh_accelerate_state() -> None:
    """accelerate keeps process-wide singletons (gradient accumulation steps among them); each pipeline built here
    gets its own, as every test does (tests/conftest.py)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def load_engine(case: Case, config) -> Callable[[], Outcome]:
    """Build the real pipeline (its models loaded) and return the call that trains one unit."""
    from pipelines import get_pipeline

    fresh_accelerate_state()
    pipeline = get_pipeline(config.pipeline)(config)

    def run() -> Outcome:
        from genalign.trainer import Trainer

        with ExitStack() as patches:
            # Held-out evaluation (before the first epoch and after the last) and checkpoints are not part of a
            # training unit: the pipeline runs without them.
            patches.enter_context(mock.patch.object(pipeline, "evaluate", lambda trainer=None: {}))
            patches.enter_context(mock.patch.object(Trainer, "maybe_checkpoint", lambda *args, **kwargs: None))
            pipeline.train()
        records = [json.loads(line) for line in (Path(config.trainer.output_dir) / "metrics.jsonl").open()]
        records = [r for r in records if r["step"] >= 0]
        seconds = sum(case.samples(config) / r["samples_per_s"] for r in records)
        return Outcome(seconds, case.engine_values(records))

    return run


def load_reference(case: Case, config) -> Callable[[], Outcome]:
    """Load the reference's models and return the call that runs its unit (as `load_engine` does)."""
    models = case.load_models(config)
    return lambda: case.reference(config, models)


def run_side(case: Case, side: str, test_size: bool = False) -> Outcome:
    """One unit of `side` ("engine" or "reference") in a fresh run folder, from the pretrained weights."""
    folder = tempfile.mkdtemp(prefix=f"bench-{case.name}-{side}-")
    try:
        config = case.build_config(folder, test_size)
        loader = load_engine if side == "engine" else load_reference
        return loader(case, config)()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check(case: Case, engine: Outcome, reference: Outcome) -> tuple[bool, str]:
    """(whether every value agrees within the tolerance, a line listing each value on both sides)."""
    ok, parts = True, []
    for key, value in engine.values.items():
        theirs = reference.values[key]
        difference = abs(value - theirs) / max(abs(value), abs(theirs), 1e-12)
        agrees = math.isfinite(difference) and difference <= case.tolerance
        ok &= agrees
        parts.append(f"{key} {value:.6g} vs {theirs:.6g}{'' if agrees else ' (DIFFERS)'}")
    return ok, "; ".join(parts)


@dataclass
class Measurement:
    """Median unit times of both sides (alternated), the unit's samples and updates, and the check of the first,
    warm-up pair."""

    engine_s: float
    reference_s: float
    samples: int
    updates: int
    agrees: bool
    check: str
    engine_times: list[float] = field(default_factory=list)
    reference_times: list[float] = field(default_factory=list)


def measure(case: Case, repeats: int) -> Measurement:
    """A warm-up pair (checked for equality), then `repeats` alternating engine/reference units."""
    config = case.build_config(tempfile.gettempdir())
    engine, reference = run_side(case, "engine"), run_side(case, "reference")
    agrees, line = check(case, engine, reference)
    engine_times, reference_times = [], []
    for _ in range(repeats):
        engine_times.append(run_side(case, "engine").seconds)
        reference_times.append(run_side(case, "reference").seconds)
    return Measurement(statistics.median(engine_times), statistics.median(reference_times),
                       case.samples(config) * config.epochs, case.updates(config) * config.epochs, agrees, line,
                       engine_times, reference_times)


def peak_memory_child(case_name: str, side: str) -> dict:
    """In a fresh process (`benchmarks.timing.run_child`): the peak memory of one unit of `side`, above the memory
    after its models are loaded."""
    from benchmarks.pipelines import CASES
    from benchmarks.timing import PeakMemory

    case = CASES[case_name]
    folder = tempfile.mkdtemp(prefix=f"bench-{case.name}-memory-")
    try:
        config = case.build_config(folder)
        run = (load_engine if side == "engine" else load_reference)(case, config)
        with PeakMemory() as peak:
            run()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"peak_bytes": peak.bytes, "memory_method": peak.method}


