"""A short run of any registered pipeline on a tiny model, for the distributed tests (torchrun, or plain for 1
process): `pipeline_worker.py PIPELINE MODEL_DIR OUT_DIR [key=value ...]`."""

import sys

from genalign.config import build_config
from pipelines import get_pipeline

if __name__ == "__main__":
    name, model, out = sys.argv[1:4]
    pipeline_class = get_pipeline(name)
    config = build_config(
        pipeline_class.config_class,
        {
            "model": {"pretrained": model},
            "prompts": {"prompts": ["a red circle", "a blue square", "two green stars", "a yellow sun"]},
            "sampling": {"num_inference_steps": 3, "guidance_scale": 2.0, "batch_size": 8},
            "trainer": {"output_dir": out, "learning_rate": 1e-3, "progress": False, "checkpoint_every": 0},
            "eval": {"every": 100, "samples_per_prompt": 1},
        },
        sys.argv[4:],
    )
    pipeline_class(config).train()
