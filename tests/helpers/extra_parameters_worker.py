"""One update of a toy trainer with an extra parameter group under torchrun; writes each process's log Z."""

import os
import sys
from pathlib import Path

import torch

from genalign.trainer import LoRAConfig, ParameterGroup, Trainer, TrainerConfig
from tests.test_masked_pipelines import _Toy

if __name__ == "__main__":
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    log_z = torch.nn.Parameter(torch.zeros(()))
    toy = _Toy()
    trainer = Trainer(toy, TrainerConfig(output_dir=str(out / "run"), progress=False, lora=LoRAConfig(enabled=False),
                                         weight_decay=0.0),
                      extra_parameters={"log_z": ParameterGroup({"value": log_z}, learning_rate=0.1)})
    with trainer.accumulate():
        trainer.backward(toy.forward_module(torch.ones(1, 2)).sum() + (1.0 if rank == 0 else -3.0) * log_z)
        trainer.optimizer_step()
    (out / f"log_z_{rank}.txt").write_text(repr(float(log_z.detach())))
    # Leave together: a rank that exits while its peer's gloo threads still talk to it aborts that peer
    # (SIGABRT, "terminate called without an active exception"; 2 runs in 10 before this).
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
