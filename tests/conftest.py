import os
import warnings

import pytest
import torch

# Tests run on the CPU with both cores; keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", message=".*should be kept in float32.*")


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
