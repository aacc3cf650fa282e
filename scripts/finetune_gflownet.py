"""Train a GFlowNet (`pipelines/gflownet.py`) from a YAML config, then write its gallery: the Pareto front of
samples drawn at every evaluation preference (a plot, with the true front where the task is enumerable) and the
best samples per preference, in <trainer.output_dir>/gallery/index.html.

    python scripts/finetune_gflownet.py --config configs/gflownet_hypergrid.yaml
    python scripts/finetune_gflownet.py --config configs/gflownet_ngrams.yaml epochs=200 trainer.output_dir=runs/try

Overrides are key=value pairs on the config (dotted keys for nested sections); --no-gallery skips the gallery.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genalign.config import build_config, load_yaml  # noqa: E402
from pipelines.gflownet import GFlowNetConfig, GFlowNetPipeline  # noqa: E402
from pipelines.gfn.evaluation import evaluate_policy, write_gallery  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a YAML config with pipeline: gflownet")
    parser.add_argument("--no-gallery", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    config = build_config(GFlowNetConfig, load_yaml(args.config), args.overrides)
    pipeline = GFlowNetPipeline(config)
    metrics = pipeline.train()
    if not pipeline.trainer.is_main:
        return 0
    print(json.dumps({k: round(v, 5) for k, v in metrics.items()}))
    if not args.no_gallery:
        evaluation = evaluate_policy(pipeline, config.eval)
        page = write_gallery(evaluation, pipeline.env, Path(config.trainer.output_dir) / "gallery",
                             title=f"GFlowNet ({config.objective}) on {config.task.name}",
                             scalarisation=config.scalarisation)
        print(f"gallery: {page}")
    print(f"run folder: {config.trainer.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
