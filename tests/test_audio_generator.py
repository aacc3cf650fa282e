"""The text-to-audio generator (AudioLDM / MusicLDM layout): parity with diffusers' AudioLDMPipeline, exact
per-step log-probs, ratios of 1, the differentiable path through the vocoder, loading and bad input."""

import json
import math
import warnings

import pytest
import torch
from diffusers import AudioLDMPipeline

from genalign.generators import detect_family
from genalign.generators.audio import AudioDiffusionGenerator, AudioSamplingOptions
from genalign.generators.base import ModelLoadError
from genalign.generators.griffin_lim import GriffinLimVocoder
from genalign.worlds.tiny_audio import build_tiny_text_to_audio

PROMPTS = ["a loud fast flute melody", "a quiet slow plucked tune", ""]
SEEDS = [3, 4, 5]
warnings.filterwarnings("ignore", message=".*AudioLDMPipeline has been deprecated.*")


@pytest.fixture(scope="module", params=["griffin_lim", "hifigan"])
def pipe(request):
    pipe = build_tiny_text_to_audio(vocoder=request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_audio(pipe, options: AudioSamplingOptions, seeds):
    return torch.as_tensor(pipe(
        PROMPTS, num_inference_steps=options.num_inference_steps, guidance_scale=options.guidance_scale,
        eta=options.eta, audio_length_in_s=options.audio_length_in_s,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    ).audios)


@pytest.mark.parametrize("eta, guidance, seconds", [(1.0, 2.5, None), (0.0, 1.0, 0.37)])
def test_sampling_matches_diffusers_audioldm_pipeline(pipe, eta, guidance, seconds):
    """Fails if text encoding (normalisation, padding), the class-embedding call, CFG, the step formulas, the
    noise draws, the length rounding or the vocoder call differ from diffusers'."""
    generator = AudioDiffusionGenerator.from_pipeline(pipe)
    options = AudioSamplingOptions(num_inference_steps=8, guidance_scale=guidance, eta=eta, audio_length_in_s=seconds)
    ours = generator.sample(PROMPTS, options, seeds=SEEDS).outputs
    theirs = _diffusers_audio(pipe, options, SEEDS).clamp(-1, 1)
    assert ours.shape == theirs.shape == (3, generator.num_samples(options))
    # Griffin-Lim's iterations amplify float32 round-off; the mel it inverts agrees to ~1e-6.
    assert torch.allclose(ours, theirs, atol=5e-5, rtol=0), (ours - theirs).abs().max()
    assert ours.abs().max() > 1e-5  # not trivially equal silence


def test_recorded_log_prob_equals_diffusers_step_density_and_ratio_is_one():
    """Fails if a recorded log-prob is not the Gaussian density of diffusers' own DDIM step (mean from
    scheduler.step with zero noise, σ = η·√variance) or if re-evaluation under unchanged weights differs."""
    pipe = build_tiny_text_to_audio()
    generator = AudioDiffusionGenerator.from_pipeline(pipe)
    options = AudioSamplingOptions(num_inference_steps=6, guidance_scale=2.0, eta=1.0)
    rollout = generator.sample(PROMPTS, options, seeds=SEEDS)
    trajectory = rollout.trajectory
    steps = trajectory.trainable_steps
    assert trajectory.states.shape[:2] == (3, 7) and len(steps) == 6
    recomputed = generator.log_prob(trajectory, steps)
    assert torch.equal(recomputed, trajectory.log_probs[:, steps])  # ratio exactly 1 in the same batch

    scheduler = pipe.scheduler
    scheduler.set_timesteps(6)
    cond = generator.encode_prompts(PROMPTS).embeds
    uncond = generator.encode_prompts([""] * 3).embeds
    for i in (0, 3, 5):
        x_t, x_next = trajectory.states[:, i], trajectory.states[:, i + 1]
        t = scheduler.timesteps[i]
        with torch.no_grad():
            eps = pipe.unet(torch.cat([x_t, x_t]), t, encoder_hidden_states=None,
                            class_labels=torch.cat([uncond, cond])).sample
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + 2.0 * (eps_c - eps_u)
        mean = scheduler.step(eps, t, x_t, eta=1.0, variance_noise=torch.zeros_like(x_t)).prev_sample
        prev_t = t - scheduler.config.num_train_timesteps // 6
        std = math.sqrt(float(scheduler._get_variance(t, prev_t)))
        reference = torch.distributions.Normal(mean.double(), std).log_prob(x_next.double()).flatten(1).sum(1)
        assert torch.allclose(trajectory.log_probs[:, i], reference, rtol=1e-5), i


def test_a_clip_does_not_depend_on_its_batch():
    """Fails if the vocoder's initial phase (or any noise) were drawn per batch instead of per sample."""
    generator = AudioDiffusionGenerator.from_pipeline(build_tiny_text_to_audio())
    together = generator.sample(PROMPTS, seeds=SEEDS, return_trajectory=False).outputs
    alone = generator.sample(PROMPTS[1:2], seeds=SEEDS[1:2], return_trajectory=False).outputs
    assert torch.allclose(together[1:2], alone, atol=1e-5)


def test_differentiable_sampling_carries_reward_gradients_through_the_vocoder():
    """Fails if decoding (VAE → mel → Griffin-Lim) cut the graph, or if steps before the last K were tracked."""
    generator = AudioDiffusionGenerator.from_pipeline(build_tiny_text_to_audio())
    options = AudioSamplingOptions(num_inference_steps=4)
    rollout = generator.sample_differentiable(PROMPTS[:2], options, grad_steps=1, seeds=SEEDS[:2])
    assert rollout.outputs.shape == (2, generator.num_samples(options)) and rollout.modality == "audio"
    rollout.outputs.pow(2).mean().backward()
    grads = [p.grad for p in generator.denoiser.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    with torch.no_grad():
        plain = generator.sample(PROMPTS[:2], options, seeds=SEEDS[:2], return_trajectory=False).outputs
    assert torch.allclose(rollout.outputs.detach(), plain, atol=1e-5)


def test_save_load_round_trip_in_audioldm_layout(tmp_path):
    """Fails if save_pretrained wrote a folder that diffusers' AudioLDMPipeline or our loader cannot read back
    to the same model (e.g. the vocoder's module path, the scheduler, the tokenizer)."""
    generator = AudioDiffusionGenerator.from_pipeline(build_tiny_text_to_audio())
    generator.save_pretrained(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "AudioLDMPipeline"
    assert index["vocoder"] == ["genalign.generators.griffin_lim", "GriffinLimVocoder"]
    assert detect_family(str(tmp_path / "model")) == "audio"
    loaded = AudioDiffusionGenerator.from_pretrained(tmp_path / "model")
    options = AudioSamplingOptions(num_inference_steps=4)
    before = generator.sample(PROMPTS, options, seeds=SEEDS).outputs
    # Loaded text encoders may pick another attention kernel (sdpa vs eager): equal to float round-off.
    assert torch.allclose(loaded.sample(PROMPTS, options, seeds=SEEDS).outputs, before, atol=2e-5)
    diffusers_pipe = AudioLDMPipeline.from_pretrained(tmp_path / "model")
    assert isinstance(diffusers_pipe.vocoder, GriffinLimVocoder)


def test_musicldm_layout_conditions_on_clap_text_features(tmp_path):
    """Fails if a MusicLDM folder (whole ClapModel as text encoder, feature extractor) did not load, or if its
    embedding were not get_text_features' (MusicLDM's conditioning) or not used as the class label."""
    pipe = build_tiny_text_to_audio("musicldm")
    pipe.save_pretrained(tmp_path / "musicldm")
    generator = AudioDiffusionGenerator.from_pretrained(tmp_path / "musicldm")
    embeds = generator.encode_prompts(PROMPTS[:2]).embeds
    tokens = generator.tokenizer(PROMPTS[:2], padding="max_length", max_length=generator.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt")
    with torch.no_grad():
        features = generator.text_encoder.get_text_features(tokens.input_ids, attention_mask=tokens.attention_mask)
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    assert torch.allclose(embeds, features)
    rollout = generator.sample(PROMPTS[:2], AudioSamplingOptions(num_inference_steps=3), seeds=SEEDS[:2])
    assert rollout.outputs.shape[0] == 2 and torch.isfinite(rollout.outputs).all()
    assert json.loads((tmp_path / "musicldm" / "model_index.json").read_text())["_class_name"] == "MusicLDMPipeline"


def test_bad_models_and_lengths_are_one_clear_error_each(tmp_path):
    """Fails if an AudioLDM2 folder, a folder without a vocoder or a clip shorter than the VAE's downsampling
    produced a deep traceback instead of a message naming the problem and the fix."""
    folder = tmp_path / "audioldm2"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDM2Pipeline"}))
    with pytest.raises(ModelLoadError, match="AudioLDM2"):
        AudioDiffusionGenerator.from_pretrained(folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDMPipeline", "unet": ["diffusers", "x"]}))
    with pytest.raises(ModelLoadError, match="lacks vae"):
        AudioDiffusionGenerator.from_pretrained(folder)
    with pytest.raises(ModelLoadError, match="does not exist"):
        AudioDiffusionGenerator.from_pretrained(tmp_path / "nowhere")
    generator = AudioDiffusionGenerator.from_pipeline(build_tiny_text_to_audio())
    with pytest.raises(ValueError, match="too short.*at least 0.03 s"):
        generator.sample(PROMPTS, AudioSamplingOptions(audio_length_in_s=0.02), seeds=SEEDS)


def test_vocoder_inverts_its_own_log_mel():
    """Fails if the Griffin-Lim vocoder's filter-bank inverse, phase iterations or framing were wrong: a tone's
    log-mel, vocoded and re-analysed, keeps its spectral peak and the clip's length."""
    vocoder = GriffinLimVocoder(n_iter=16)
    t = torch.arange(16_000) / 16_000
    tone = 0.5 * torch.sin(2 * math.pi * 1000 * t)
    mel = vocoder.log_mel(tone.unsqueeze(0))
    assert mel.shape == (1, 100, 64)
    audio = vocoder(mel)
    assert audio.shape == (1, 16_000)
    again = vocoder.log_mel(audio)
    assert again[0, 10:-10].mean(0).argmax() == mel[0, 10:-10].mean(0).argmax()
    spectrum = torch.fft.rfft(audio[0]).abs()
    assert abs(int(spectrum.argmax()) - 1000) <= 60  # within one mel bin of 1 kHz
