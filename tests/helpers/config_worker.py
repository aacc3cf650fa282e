"""Train any registered pipeline from a YAML config, for the distributed tests (under torchrun, or plainly for one
process): `config_worker.py CONFIG.yaml [--stop-after EPOCH] [key=value ...]`.

`--stop-after EPOCH` ends the run once the checkpoint of that epoch is written, on every process, as a job
killed at that point would leave it (the next launch resumes with trainer.resume=latest, on any process count).
"""

import sys

import torch

from genalign.config import build_config, load_yaml
from genalign.trainer import Trainer
from pipelines import get_pipeline


class StopAfterCheckpoint(Exception):
    pass


def stop_after(epoch: int) -> None:
    save = Trainer.save_checkpoint

    def save_then_stop(self, at_epoch, pipeline_state):
        path = save(self, at_epoch, pipeline_state)
        if at_epoch == epoch:
            raise StopAfterCheckpoint(path)
        return path

    Trainer.save_checkpoint = save_then_stop


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = sys.argv[1:]
    config_file, args = args[0], args[1:]
    if args[:1] == ["--stop-after"]:
        stop_after(int(args[1]))
        args = args[2:]
    data = load_yaml(config_file)
    pipeline_class = get_pipeline(data["pipeline"])
    try:
        pipeline_class(build_config(pipeline_class.config_class, data, args)).train()
    except StopAfterCheckpoint:
        pass
    if torch.distributed.is_initialized():
        # Leave together: a rank that exits while another still talks to it aborts in gloo.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
