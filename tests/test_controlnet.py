"""ControlNet in the diffusion generator: parity with StableDiffusionControlNetPipeline, control images through
sampling, re-evaluation and the differentiable path, what trains, save/load, and the error messages."""

import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline

from genalign.generators.base import Conditions
from genalign.generators.controlnet import CONTROL_KEY, controlnet_from_unet
from genalign.generators.diffusion import DiffusionGenerator, ModelLoadError, SamplingOptions
from genalign.worlds.tiny import build_tiny_text_to_image

PROMPTS = ["a red circle", "a blue square", "green"]
SEEDS = [11, 12, 13]
OPTIONS = SamplingOptions(num_inference_steps=5, guidance_scale=4.0, eta=0.7)


def _controlled_pipe() -> StableDiffusionControlNetPipeline:
    """The tiny SD pipeline with a ControlNet initialised from its UNet, then perturbed: diffusers' zero
    convolutions start at 0, and a ControlNet that adds nothing would make every parity check vacuous."""
    base = build_tiny_text_to_image("sd", prediction_type="epsilon")
    controlnet = controlnet_from_unet(base.unet, vae_scale_factor=2)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if "zero_conv" in name or "controlnet_" in name:
                p.normal_(0, 0.1)
    return StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, controlnet=controlnet,
        scheduler=base.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _control(seed: int = 0, batch: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _conditions(control: torch.Tensor) -> Conditions:
    return Conditions(texts=PROMPTS, tensors={CONTROL_KEY: control})


@pytest.fixture(scope="module")
def pipe():
    return _controlled_pipe()


def test_sampling_matches_diffusers_controlnet_pipeline(pipe):
    """Our sampler equals StableDiffusionControlNetPipeline for the same seeds and control images, and the
    control images matter. Fails if the control is not fed to both CFG branches, the residuals are dropped or
    scaled differently, or the control image is normalised differently from diffusers' preprocessing."""
    gen = DiffusionGenerator.from_pipeline(pipe)
    control = _control()
    ours = gen.sample(_conditions(control), OPTIONS, seeds=SEEDS)
    ref = pipe(PROMPTS, image=control, num_inference_steps=5, guidance_scale=4.0, eta=0.7, output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
    assert (ours.outputs - ref).abs().max() < 1e-5
    half = gen.sample(_conditions(control), SamplingOptions(**{**OPTIONS.__dict__, "controlnet_conditioning_scale": 0.5}),
                      seeds=SEEDS)
    ref_half = pipe(PROMPTS, image=control, num_inference_steps=5, guidance_scale=4.0, eta=0.7, output_type="pt",
                    controlnet_conditioning_scale=0.5,
                    generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
    assert (half.outputs - ref_half).abs().max() < 1e-5
    other = gen.sample(_conditions(_control(seed=1)), OPTIONS, seeds=SEEDS)
    assert (other.outputs - ours.outputs).abs().max() > 1e-3


def test_control_travels_into_re_evaluation_and_the_differentiable_path(pipe):
    """Re-evaluated log-probs equal the recorded ones (ratio 1) because the trajectory keeps its control images;
    gradients of the differentiable path reach the ControlNet and never the frozen UNet. Fails if re-evaluation
    ran without the control (the ratio moves), or if the UNet were left trainable."""
    gen = DiffusionGenerator.from_pipeline(pipe)
    rollout = gen.sample(_conditions(_control()), OPTIONS, seeds=SEEDS)
    trajectory = rollout.trajectory
    assert torch.equal(trajectory.conditioning[CONTROL_KEY], _control())
    for i in range(OPTIONS.num_inference_steps):
        step = torch.full((3,), i)
        assert torch.allclose(gen.step_log_prob(trajectory, step), trajectory.log_probs[:, i], atol=1e-6, rtol=0)
    stripped = trajectory.map(lambda t: t)
    stripped.conditioning = {**trajectory.conditioning, CONTROL_KEY: _control(seed=5)}
    assert not torch.allclose(gen.step_log_prob(stripped, torch.zeros(3, dtype=torch.long)), trajectory.log_probs[:, 0])

    assert set(gen.trainable_modules()) == {"controlnet"}
    assert not any(p.requires_grad for p in gen.denoiser.parameters())
    gen.controlnet.requires_grad_(True)
    try:
        out = gen.sample_differentiable(_conditions(_control()), OPTIONS, grad_steps=2, seeds=SEEDS)
        out.outputs.mean().backward()
        grads = [p.grad for p in gen.controlnet.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
        assert all(p.grad is None for p in gen.denoiser.parameters())
    finally:
        gen.controlnet.requires_grad_(False)
        gen.controlnet.zero_grad(set_to_none=True)


def test_save_and_load_round_trip_in_the_controlnet_pipeline_layout(pipe, tmp_path):
    """save_pretrained writes a StableDiffusionControlNetPipeline folder that diffusers loads, and
    from_pretrained brings the ControlNet back: same samples. Fails if the ControlNet is not saved, saved
    under another name, or not re-attached on load (samples would ignore the control)."""
    gen = DiffusionGenerator.from_pipeline(pipe)
    gen.save_pretrained(tmp_path / "model")
    loaded = DiffusionGenerator.from_pretrained(tmp_path / "model")
    assert loaded.controlnet is not None and set(loaded.trainable_modules()) == {"controlnet"}
    control = _control()
    a = gen.sample(_conditions(control), OPTIONS, seeds=SEEDS).outputs
    b = loaded.sample(_conditions(control), OPTIONS, seeds=SEEDS).outputs
    assert torch.equal(a, b)
    plain = StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "model")
    c = plain(PROMPTS, image=control, num_inference_steps=5, guidance_scale=4.0, eta=0.7, output_type="pt",
              generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
    assert (a - c).abs().max() < 1e-5
    # A ControlNet folder attaches to the plain base model; 'unet' initialises one that changes nothing yet.
    gen.controlnet.save_pretrained(tmp_path / "controlnet")
    base = build_tiny_text_to_image("sd", prediction_type="epsilon")
    base.save_pretrained(tmp_path / "base")
    attached = DiffusionGenerator.from_pretrained(tmp_path / "base", controlnet=tmp_path / "controlnet")
    assert torch.equal(attached.sample(_conditions(control), OPTIONS, seeds=SEEDS).outputs, a)
    fresh = DiffusionGenerator.from_pretrained(tmp_path / "base", controlnet="unet")
    uncontrolled = DiffusionGenerator.from_pretrained(tmp_path / "base").sample(PROMPTS, OPTIONS, seeds=SEEDS).outputs
    assert (fresh.sample(_conditions(control), OPTIONS, seeds=SEEDS).outputs - uncontrolled).abs().max() < 1e-6


def test_bad_control_input_gets_a_clear_error(pipe, tmp_path):
    """Missing, superfluous and misshaped control images, and a ControlNet of another UNet, are refused with
    the fix; without these a wrong-size control image would fail deep inside a convolution."""
    gen = DiffusionGenerator.from_pipeline(pipe)
    with pytest.raises(ValueError, match="needs a control image"):
        gen.sample(PROMPTS, OPTIONS, seeds=SEEDS)
    with pytest.raises(ValueError, match=r"expected \(3, 3, 32, 32\)"):
        gen.sample(_conditions(torch.rand(3, 3, 16, 16)), OPTIONS, seeds=SEEDS)
    plain = DiffusionGenerator.from_pipeline(build_tiny_text_to_image("sd", prediction_type="epsilon"))
    with pytest.raises(ValueError, match="has no ControlNet"):
        plain.sample(_conditions(_control()), OPTIONS, seeds=SEEDS)
    other = build_tiny_text_to_image("sdxl", prediction_type="epsilon")
    controlnet_from_unet(other.unet, vae_scale_factor=2).save_pretrained(tmp_path / "foreign")
    pipe_base = build_tiny_text_to_image("sd", prediction_type="epsilon")
    pipe_base.save_pretrained(tmp_path / "base")
    with pytest.raises(ModelLoadError, match="another UNet"):
        DiffusionGenerator.from_pretrained(tmp_path / "base", controlnet=tmp_path / "foreign")
    with pytest.raises(ModelLoadError, match="could not load a ControlNet"):
        DiffusionGenerator.from_pretrained(tmp_path / "base", controlnet=tmp_path / "missing")


def test_a_controlnet_from_the_unet_does_not_depend_on_the_global_rng(pipe):
    """The conditioning embedding is the one random part of `from_unet`. Drawn from the global RNG it made one
    process and two processes start from different ControlNets (caught by Ctrl-U's two-process test); it must be
    a function of the UNet alone, and leave the caller's RNG where it was."""
    torch.manual_seed(123)
    first = controlnet_from_unet(pipe.unet, vae_scale_factor=2).state_dict()
    after_first = torch.rand(1)
    torch.manual_seed(123)
    torch.rand(5)  # whatever else ran before
    second = controlnet_from_unet(pipe.unet, vae_scale_factor=2).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after_first)  # building one drew nothing from the caller's stream
