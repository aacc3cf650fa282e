"""A short DDPO run used by the distributed test (launched with torchrun, or plainly for 1 process)."""

import sys

from genalign.config import build_config
from pipelines.ddpo import DDPOConfig, DDPOPipeline

if __name__ == "__main__":
    model, out = sys.argv[1], sys.argv[2]
    config = build_config(
        DDPOConfig,
        {
            "model": {"pretrained": model},
            "prompts": {"prompts": ["a red circle", "a blue square", "two green stars", "a yellow sun"]},
            "sampling": {"num_inference_steps": 3, "guidance_scale": 2.0, "batch_size": 8},
            "trainer": {"output_dir": out, "learning_rate": 1e-3, "progress": False, "checkpoint_every": 0},
            "eval": {"every": 100, "samples_per_prompt": 1},
            "epochs": 2,
            "prompts_per_epoch": 4,
            "samples_per_prompt": 2,
            "updates_per_epoch": 2,
            "timestep_fraction": 0.67,
            "stat_min_count": 2,
        },
        sys.argv[3:],
    )
    DDPOPipeline(config).train()
