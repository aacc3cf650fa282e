"""Spec 00 checks for the diffusion generator: exact step log-probs, ratios of 1, parity with diffusers."""

import math

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    EulerDiscreteScheduler,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from genalign.generators.diffusion import DiffusionGenerator, ModelLoadError, SamplingOptions
from genalign.sampling import SchedulerNotSupportedError, StepSchedule, gaussian_log_prob, step_mean
from genalign.worlds.tiny import build_tiny_text_to_image, sd_scheduler

PROMPTS = ["a red circle", "a blue square", "green"]
SEEDS = [11, 12, 13]


def _pipe(layout, scheduler="ddim", prediction_type="v_prediction"):
    pipe = build_tiny_text_to_image(layout, prediction_type=prediction_type)
    if scheduler == "ddpm":
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _spec00_log_prob(x_t, x_prev, eps_hat, a_t, a_prev, eta):
    """The spec's formulas written out independently (epsilon parameterisation)."""
    x_t, eps_hat = x_t.double(), eps_hat.double()
    x0 = (x_t - math.sqrt(1 - a_t) * eps_hat) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    mu = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps_hat
    normal = torch.distributions.Normal(mu.double(), sigma)
    return normal.log_prob(x_prev.double()).flatten(1).sum(1), mu, sigma


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_step_log_prob_equals_independent_gaussian(eta):
    torch.manual_seed(0)
    sched = sd_scheduler()
    schedule = StepSchedule.from_scheduler(sched, 10, eta=eta)
    x_t, eps_hat = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    step = torch.tensor([0, 3, 5, 9])
    mean, std = step_mean(schedule, eps_hat, x_t, step)
    x_prev = mean + std * torch.randn_like(mean)
    ours = gaussian_log_prob(x_prev, mean, std)
    alphas = sched.alphas_cumprod.double()
    for b, i in enumerate(step.tolist()):
        t = int(sched.timesteps[i])
        prev = t - 1000 // 10
        a_prev = float(alphas[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
        ref, mu, sigma = _spec00_log_prob(x_t[b : b + 1], x_prev[b : b + 1], eps_hat[b : b + 1], float(alphas[t]), a_prev, eta)
        assert torch.allclose(mean[b : b + 1].double(), mu, atol=1e-5)
        assert float(std[b]) == pytest.approx(sigma, rel=1e-6)
        assert float(ours[b]) == pytest.approx(float(ref), rel=1e-4)


def test_mean_reduction_is_sum_over_elements():
    mean, x = torch.zeros(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    std = torch.full((2, 1, 1, 1), 0.5)
    assert torch.allclose(gaussian_log_prob(x, mean, std, "mean") * 36, gaussian_log_prob(x, mean, std, "sum"))


@pytest.mark.parametrize("layout", ["sd", "sdxl"])
@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sampling_matches_plain_diffusers_pipeline(layout, scheduler, prediction_type):
    pipe = _pipe(layout, scheduler, prediction_type)
    gen = DiffusionGenerator.from_pipeline(pipe)
    ours = gen.sample(PROMPTS, SamplingOptions(num_inference_steps=6, guidance_scale=4.0, eta=0.7), seeds=SEEDS)
    kwargs = {"eta": 0.7} if scheduler == "ddim" else {}
    ref = pipe(
        PROMPTS,
        num_inference_steps=6,
        guidance_scale=4.0,
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
        output_type="pt",
        **kwargs,
    ).images
    assert ours.outputs.shape == ref.shape
    assert (ours.outputs - ref).abs().max() < 1e-5


@pytest.mark.parametrize("layout", ["sd", "sdxl"])
@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_importance_ratio_is_exactly_one_before_update(layout, scheduler, reduction):
    gen = DiffusionGenerator.from_pipeline(_pipe(layout, scheduler))
    options = SamplingOptions(num_inference_steps=5, guidance_scale=3.0, eta=1.0, log_prob_reduction=reduction)
    rollout = gen.sample(PROMPTS, options, seeds=SEEDS)
    traj = rollout.trajectory
    steps = torch.nonzero(traj.trainable).flatten()
    recomputed = gen.log_prob(traj, steps)
    ratio = torch.exp(recomputed - traj.log_probs[:, steps])
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
    # Per-sample step indices (as DDPO's timestep subsampling uses) give the same numbers.
    per_sample = torch.stack([steps.flip(0)] * len(PROMPTS))
    assert torch.allclose(gen.log_prob(traj, per_sample), recomputed.flip(1), atol=1e-4)


def test_recorded_log_prob_equals_normal_density_of_recorded_step():
    gen = DiffusionGenerator.from_pipeline(_pipe("sd"))
    options = SamplingOptions(num_inference_steps=4, guidance_scale=2.0, eta=1.0)
    traj = gen.sample(PROMPTS, options, seeds=SEEDS).trajectory
    i = 2
    _, mean, std = gen.step_log_prob(traj, torch.full((3,), i), return_mean=True)
    ref = torch.distributions.Normal(mean.double(), std.double()).log_prob(traj.states[:, i + 1].double())
    assert torch.allclose(traj.log_probs[:, i].double(), ref.flatten(1).sum(1), rtol=1e-4)


def test_ddpm_last_step_is_deterministic_and_excluded():
    gen = DiffusionGenerator.from_pipeline(_pipe("sd", "ddpm"))
    traj = gen.sample(PROMPTS[:1], SamplingOptions(num_inference_steps=4), seeds=SEEDS[:1]).trajectory
    assert traj.trainable.tolist() == [True, True, True, False]
    assert traj.log_probs[0, -1] == 0


def test_trajectory_shapes_and_chunked_sampling_is_invariant():
    gen = DiffusionGenerator.from_pipeline(_pipe("sd"))
    options = SamplingOptions(num_inference_steps=3, guidance_scale=2.0)
    full = gen.sample(PROMPTS, options, seeds=SEEDS)
    chunked = gen.sample(PROMPTS, options, seeds=SEEDS, batch_size=2)
    assert full.trajectory.states.shape == (3, 4, 4, 16, 16)
    assert full.trajectory.log_probs.shape == (3, 3)
    assert full.outputs.shape == (3, 3, 32, 32)
    assert torch.allclose(full.outputs, chunked.outputs, atol=1e-5)
    assert torch.allclose(full.trajectory.log_probs, chunked.trajectory.log_probs, rtol=1e-5)


@pytest.mark.parametrize("layout", ["sd", "sdxl"])
def test_save_and_load_through_from_pretrained(tmp_path, layout):
    pipe = _pipe(layout)
    pipe.save_pretrained(tmp_path / "model")
    loaded = DiffusionGenerator.from_pretrained(tmp_path / "model")
    assert (loaded.text_encoder_2 is not None) == (layout == "sdxl")
    options = SamplingOptions(num_inference_steps=3, guidance_scale=3.0)
    a = DiffusionGenerator.from_pipeline(pipe).sample(PROMPTS, options, seeds=SEEDS).outputs
    b = loaded.sample(PROMPTS, options, seeds=SEEDS).outputs
    assert torch.allclose(a, b, atol=1e-6)
    # Our save_pretrained writes a folder that we and diffusers itself load back.
    loaded.save_pretrained(tmp_path / "again")
    assert DiffusionGenerator.from_pretrained(tmp_path / "again", scheduler="ddpm").scheduler.__class__ is DDPMScheduler
    again = DiffusionGenerator.from_pretrained(tmp_path / "again").sample(PROMPTS, options, seeds=SEEDS).outputs
    assert torch.allclose(a, again, atol=1e-6)
    plain = (StableDiffusionXLPipeline if layout == "sdxl" else StableDiffusionPipeline).from_pretrained(tmp_path / "again")
    assert type(plain.unet) is type(pipe.unet)


def test_missing_model_path_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        DiffusionGenerator.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        DiffusionGenerator.from_pretrained(tmp_path / "empty")


def test_hub_id_not_in_cache_is_one_clear_error():
    # local_files_only: the same code path a hub id takes, without touching the network.
    with pytest.raises(ModelLoadError, match="in the local cache"):
        DiffusionGenerator.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", local_files_only=True)


def test_unsupported_scheduler_names_the_supported_ones():
    with pytest.raises(SchedulerNotSupportedError, match="DDIMScheduler"):
        StepSchedule.from_scheduler(EulerDiscreteScheduler.from_config(sd_scheduler().config), 5)


def test_differentiable_sampling_tracks_only_last_k_steps():
    gen = DiffusionGenerator.from_pipeline(_pipe("sd"))
    params = [p for n, p in gen.denoiser.named_parameters() if "conv_out" in n]
    gen.denoiser.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    options = SamplingOptions(num_inference_steps=4, guidance_scale=2.0, eta=0.0)
    grads = {}
    for checkpoint in (True, False):
        out = gen.sample_differentiable(PROMPTS, options, grad_steps=2, seeds=SEEDS, checkpoint=checkpoint)
        out.outputs.mean().backward()
        grads[checkpoint] = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
    for a, b in zip(grads[True], grads[False]):
        assert a.abs().sum() > 0
        assert torch.allclose(a, b, atol=1e-6)
    # The forward pass equals ordinary sampling with the same seeds.
    with torch.no_grad():
        plain = gen.sample(PROMPTS, options, seeds=SEEDS, return_trajectory=False).outputs
        diff = gen.sample_differentiable(PROMPTS, options, grad_steps=2, seeds=SEEDS).outputs
    assert torch.allclose(plain, diff, atol=1e-5)
    lv = gen.sample_differentiable(PROMPTS, options, seeds=SEEDS, lv_rounds=2)
    assert lv.outputs.shape[0] == 2 * len(PROMPTS) and lv.outputs.requires_grad
    assert lv.texts == PROMPTS * 2


def test_transformer_denoiser_samples_with_exact_log_probs_and_round_trips(tmp_path):
    """A DiT/PixArt-style 2-D transformer (learned-variance head) in place of the UNet."""
    sd = _pipe("sd")
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=2,
        attention_head_dim=16, cross_attention_dim=32, caption_channels=32, use_additional_conditions=False,
    )
    gen = DiffusionGenerator(
        denoiser=transformer, vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
        scheduler=sd.scheduler, use_encoder_attention_mask=True,
    )
    options = SamplingOptions(num_inference_steps=4, guidance_scale=3.0, eta=1.0)
    rollout = gen.sample(PROMPTS, options, seeds=SEEDS)
    assert rollout.outputs.shape == (3, 3, 32, 32)
    traj = rollout.trajectory
    ratio = torch.exp(gen.log_prob(traj, torch.arange(4)) - traj.log_probs)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
    gen.save_pretrained(tmp_path / "dit")
    loaded = DiffusionGenerator.from_pretrained(tmp_path / "dit")
    assert isinstance(loaded.denoiser, PixArtTransformer2DModel) and loaded.use_encoder_attention_mask
    assert torch.allclose(loaded.sample(PROMPTS, options, seeds=SEEDS).outputs, rollout.outputs, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_log_probs_score_the_stored_state(dtype):
    """The recorded log-prob is of the state as stored in the model dtype, so re-evaluation gives ratio 1.

    Scoring the un-rounded state instead put |log ρ| at ~1e-2 (bf16) before any update (mean reduction)."""
    gen = DiffusionGenerator.from_pipeline(_pipe("sd")).to(dtype=dtype)
    options = SamplingOptions(num_inference_steps=6, guidance_scale=3.0, eta=1.0, log_prob_reduction="mean")
    traj = gen.sample(PROMPTS * 2, options, seeds=list(range(6))).trajectory
    recomputed = gen.log_prob(traj, torch.arange(6))
    assert (recomputed.double() - traj.log_probs.double()).abs().max() < 1e-4 / 10  # a tenth of DDPO's ε
    assert traj.states.dtype == dtype and traj.log_probs.dtype == torch.float64


def test_summed_log_prob_of_an_sd_sized_latent_is_exact_to_float64():
    """A 4×64×64 latent summed: |log p| ≈ 1e4, where float32 resolves only ~1e-3 (ten times PPO's ε)."""
    torch.manual_seed(0)
    mean = torch.randn(2, 4, 64, 64)
    std = torch.full((2, 1, 1, 1), 0.05)
    sample = mean + std * torch.randn_like(mean)
    ours = gaussian_log_prob(sample, mean, std, "sum")
    exact = torch.distributions.Normal(mean.double(), std.double()).log_prob(sample.double()).flatten(1).sum(1)
    assert ours.dtype == torch.float64
    assert (ours - exact).abs().max() < 1e-8


def test_model_index_cannot_import_arbitrary_modules(tmp_path, monkeypatch):
    """model_index.json names a library and class per component; only diffusers/transformers/genalign may be
    imported from it, so a downloaded folder cannot run code from another installed module."""
    import json
    import sys

    package = tmp_path / "pkgs"
    package.mkdir()
    (package / "planted_module.py").write_text(
        "IMPORTED = True\nclass Planted:\n    @classmethod\n    def from_pretrained(cls, *a, **k):\n        raise SystemExit('ran')\n"
    )
    monkeypatch.syspath_prepend(str(package))
    _pipe("sd").save_pretrained(tmp_path / "model")
    index_path = tmp_path / "model" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["vae"] = ["planted_module", "Planted"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="may only come from diffusers, transformers, genalign"):
        DiffusionGenerator.from_pretrained(tmp_path / "model")
    assert "planted_module" not in sys.modules


class _CallRecorder:
    """Counts denoiser forward calls and whether each ran with gradients enabled."""

    def __init__(self, module):
        self.grad_enabled = []
        module.register_forward_pre_hook(lambda *_: self.grad_enabled.append(torch.is_grad_enabled()))


@pytest.mark.parametrize("checkpoint", [False, True])
def test_differentiable_sampling_runs_early_steps_without_grad_and_recomputes_checkpointed_ones(checkpoint):
    gen = DiffusionGenerator.from_pipeline(_pipe("sd"))
    gen.denoiser.requires_grad_(False)
    gen.denoiser.conv_out.requires_grad_(True)
    calls = _CallRecorder(gen.denoiser)
    options = SamplingOptions(num_inference_steps=5, guidance_scale=1.0, eta=0.0)
    out = gen.sample_differentiable(PROMPTS, options, grad_steps=2, seeds=SEEDS, checkpoint=checkpoint)
    # Forward: 3 untracked steps without autograd, then the 2 tracked ones with it.
    assert calls.grad_enabled == [False, False, False, True, True]
    out.outputs.mean().backward()
    # Backward: each checkpointed denoiser call runs once more (recomputation); without checkpointing none.
    assert len(calls.grad_enabled) == 5 + (2 if checkpoint else 0)
    assert gen.denoiser.conv_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("lora", [True, False])
def test_reference_computes_with_the_pretrained_denoiser(tmp_path, lora):
    """KL terms need π_pre without a second model under LoRA (adapters off) and with a frozen copy when fully
    fine-tuned; outside the context the trained weights are back."""
    from genalign.trainer import LoRAConfig, Trainer, TrainerConfig

    gen = DiffusionGenerator.from_pipeline(_pipe("sd"))
    options = SamplingOptions(num_inference_steps=3, guidance_scale=2.0)
    traj = gen.sample(PROMPTS, options, seeds=SEEDS).trajectory
    pretrained = gen.step_log_prob(traj, torch.zeros(3, dtype=torch.long)).detach()
    trainer = Trainer(gen, TrainerConfig(output_dir=str(tmp_path), progress=False, lora=LoRAConfig(enabled=lora)),
                      keep_reference=True)
    with torch.no_grad():
        for p in trainer.parameters:
            p.add_(0.05 * torch.randn_like(p))
    trained = gen.step_log_prob(traj, torch.zeros(3, dtype=torch.long)).detach()
    with gen.reference():
        reference = gen.step_log_prob(traj, torch.zeros(3, dtype=torch.long)).detach()
    assert (trained - pretrained).abs().max() > 1e-3
    assert torch.allclose(reference, pretrained, atol=1e-9)
    assert torch.equal(gen.step_log_prob(traj, torch.zeros(3, dtype=torch.long)).detach(), trained)


def test_conditions_carry_tensors_and_stable_keys():
    from genalign.generators.base import Conditions

    c = Conditions(["a", "b", "a"], {"control": torch.tensor([[1.0], [2.0], [1.0]])})
    assert c.keys[0] == c.keys[2] != c.keys[1]  # same text and tensor → same key
    assert Conditions(["a", "a"], {"control": torch.tensor([[1.0], [2.0]])}).keys[0] != c.keys[1]
    assert Conditions(["a", "b"]).keys == ["a", "b"]
    picked = c[torch.tensor([2, 0])]
    assert picked.texts == ["a", "a"] and picked.tensors["control"].tolist() == [[1.0], [1.0]]
    assert len(Conditions.cat([c, picked])) == 5
    with pytest.raises(ValueError, match="2 rows for 3 conditions"):
        Conditions(["a", "b", "c"], {"control": torch.zeros(2, 1)})
    with pytest.raises(TypeError, match="not a single string"):
        Conditions.coerce("a red circle")
