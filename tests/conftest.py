import os
import warnings

import pytest
import torch

# Tests run on the CPU with both cores; keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", message=".*should be kept in float32.*")


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: the models of these tests are tiny, and a second thread costs more in
    synchronisation than it saves (10× slower when the other core is busy). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random SD-layout model written as a normal diffusers folder."""
    from genalign.worlds.tiny import save_tiny_text_to_image

    return save_tiny_text_to_image(tmp_path_factory.mktemp("models") / "tiny-sd", "sd")


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\na blue square\ntwo green stars\na yellow sun\n")
    return path


@pytest.fixture(scope="session")
def pretrained_tiny_dir(tmp_path_factory):
    """The tiny SD-layout model after its short smooth-latent pre-training (what `make demo` fine-tunes)."""
    from genalign.worlds.tiny import save_tiny_text_to_image

    return save_tiny_text_to_image(tmp_path_factory.mktemp("models") / "tiny-sd-pretrained", "sd", pretrain_steps=300)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps process-wide singletons; each test builds its own Accelerator settings."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def torchrun():
    """Run a script on two processes through torch.distributed.run, on a port free now (a fixed port fails when
    another run on the machine holds it). `check=True` raises with the workers' stderr, which a plain
    CalledProcessError under capture_output would hide."""
    import subprocess
    import sys

    def run(args, *, env, check=True, timeout=600):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *map(str, args)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"two-process run failed (exit {result.returncode}):\n{result.stderr[-6000:]}")
        return result

    return run


@pytest.fixture
def accelerate_launch():
    """Run a script on CPU processes under a shipped launcher config (`accelerate launch --config_file
    configs/accelerate/<config>.yaml`: "fsdp" is torch's FSDP2 on gloo, "deepspeed_zero2" DeepSpeed's ZeRO-2 on
    gloo), on a free port. `check=True` raises with the workers' stderr."""
    import subprocess
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "configs" / "accelerate"

    def run(args, *, env, config="fsdp", processes=2, check=True, timeout=600):
        if config.startswith("deepspeed"):
            pytest.importorskip("deepspeed")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(folder / f"{config}.yaml"),
                   "--num_processes", str(processes), "--main_process_port", str(_free_port()), *map(str, args)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{config} run failed (exit {result.returncode}):\n{result.stderr[-6000:]}")
        return result

    return run
