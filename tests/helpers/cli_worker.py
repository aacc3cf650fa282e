"""`genalign` with one extra registered reward, for the multi-process command-line tests:
`cli_worker.py finetune --config ... key=value ...` (plain, or under torchrun)."""

import os
import sys

import torch

from genalign.cli import main
from rewards import Reward, register_reward


@register_reward("test_nan_on_last_process")
class NaNOnLastProcess(Reward):
    """Mean brightness, except that the last process returns NaN for one sample from its `nan_on_call`-th call."""

    modality = "image"
    kind = "instance"
    differentiable = False
    objectives = ("brightness",)

    def __init__(self, nan_on_call: int = 2):
        super().__init__()
        self.calls, self.nan_on_call = 0, nan_on_call
        self.poisoned = int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1

    def score(self, images, conditions=None):
        self.calls += 1
        out = images.mean(dim=(1, 2, 3))
        if self.poisoned and self.calls >= self.nan_on_call:
            out = out.clone()
            out[0] = float("nan")
        return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:]))
