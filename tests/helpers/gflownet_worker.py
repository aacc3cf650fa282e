"""A short GFlowNet run on the two-objective HyperGrid, for the distributed test (torchrun, or plain for 1
process): `gflownet_worker.py OUT_DIR [key=value ...]`."""

import sys
from pathlib import Path

from pipelines.gflownet import GFlowNetPipeline
from tests.test_gflownets import grid_config

if __name__ == "__main__":
    out, overrides = sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:])
    GFlowNetPipeline(grid_config(Path(out), **overrides)).train()
