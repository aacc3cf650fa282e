"""The attention switch (`genalign.attention`, `trainer.attention`): every backend that runs on the CPU computes
the same thing on every model family, naive really leaves torch's SDPA, errors name the fix, and a configured
pipeline runs (and trains LoRA) on the chosen backend."""

import sys
import types
import typing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from genalign.attention import (
    BACKENDS,
    AttentionBackendError,
    apply_attention_backend,
    attention,
    check_attention_backend,
    sdpa_kernels,
    set_attention_backend,
)
from genalign.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHAPES_T2I = ROOT / "genalign" / "worlds" / "assets" / "shapes" / "t2i"
CPU_BACKENDS = ["sdpa", "sdpa_flash", "sdpa_math", "naive"]
TOLERANCE = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts calls of torch's scaled_dot_product_attention, wherever they come from (diffusers' and transformers'
    SDPA paths and ours all look it up on torch.nn.functional at call time)."""
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


# ----------------------------------------------------------------------------------- the function and the flags


def test_backend_names_are_the_trainer_configs():
    """Bug caught: a backend added to `TrainerConfig.attention` but not to `genalign.attention` (or the reverse),
    which a config would accept and the run would then refuse or ignore."""
    from genalign.trainer import TrainerConfig

    assert typing.get_args(typing.get_type_hints(TrainerConfig)["attention"]) == BACKENDS


@pytest.mark.parametrize("case", ["plain", "causal", "causal, fewer queries", "bool mask", "float mask"])
def test_naive_attention_matches_sdpa(case):
    """Bug caught: the explicit path with other semantics than SDPA's: a missing 1/√d, a causal mask aligned to
    the bottom right when queries and keys differ in length, or a bool mask read the wrong way round."""
    g = torch.Generator().manual_seed(0)
    length = 3 if case == "causal, fewer queries" else 7
    q = torch.randn(2, 3, length, 8, generator=g)
    k, v = torch.randn(2, 3, 7, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    kwargs = {}
    if case.startswith("causal"):
        kwargs["is_causal"] = True
    if case == "bool mask":
        kwargs["attn_mask"] = torch.rand(2, 1, length, 7, generator=g) > 0.3
        kwargs["attn_mask"][..., 0] = True  # every query sees a key
    if case == "float mask":
        kwargs["attn_mask"] = torch.randn(length, 7, generator=g)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert max_difference(attention(q, k, v, backend="naive", **kwargs), expected) < 1e-5
    assert max_difference(attention(q, k, v, backend="sdpa", **kwargs), expected) == 0


def test_the_xformers_path_hands_xformers_its_layout_and_causal_mask(monkeypatch):
    """Bug caught: [B, H, L, D] tensors passed to xformers unchanged (it reads [B, L, H, D], so heads would be
    attended over as positions), or the causal flag dropped. xformers is not installed (and has no CPU kernels), so a
    stand-in `xformers.ops` with its documented semantics receives the call."""

    class LowerTriangularMask:
        pass

    def memory_efficient_attention(q, k, v, attn_bias=None):  # [B, L, H, D], as xformers takes them
        assert q.shape == (2, 5, 3, 8), q.shape
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=isinstance(attn_bias, LowerTriangularMask)).transpose(1, 2)

    ops = types.SimpleNamespace(LowerTriangularMask=LowerTriangularMask,
                                memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", types.SimpleNamespace(ops=ops))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    for causal in (False, True):
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert max_difference(attention(q, k, v, backend="xformers", is_causal=causal), expected) < 1e-6


def test_pinned_kernels_govern_cpu_dispatch_and_are_restored():
    """Bug caught: pinning that does not reach the CPU dispatcher (then sdpa_math would silently run the flash
    kernel), or a context that leaves the process pinned after it exits."""
    flags = torch.backends.cuda
    before = (flags.flash_sdp_enabled(), flags.mem_efficient_sdp_enabled(), flags.math_sdp_enabled(),
              flags.cudnn_sdp_enabled())
    q = torch.randn(1, 2, 4, 8)
    with sdpa_kernels("sdpa_math"):
        assert (flags.flash_sdp_enabled(), flags.math_sdp_enabled()) == (False, True)
        F.scaled_dot_product_attention(q, q, q)
    with sdpa_kernels("sdpa_flash"):
        assert (flags.flash_sdp_enabled(), flags.math_sdp_enabled()) == (True, False)
        F.scaled_dot_product_attention(q, q, q)
    with sdpa_kernels("sdpa_efficient"), pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, q, q)  # CUDA-only kernel: nothing left to run on the CPU
    assert (flags.flash_sdp_enabled(), flags.mem_efficient_sdp_enabled(), flags.math_sdp_enabled(),
            flags.cudnn_sdp_enabled()) == before


# ----------------------------------------------------------------------------------- errors that name the fix


@pytest.mark.parametrize("backend, device, expected", [
    ("xformers", "cpu", ["no CPU kernels", "trainer.attention=sdpa"]),
    ("sdpa_efficient", "cpu", ["CUDA-only", "trainer.attention=sdpa"]),
    ("sdpa_cudnn", "cpu", ["CUDA-only", "trainer.attention=sdpa"]),
    ("sdpa_flsh", "cpu", ["unknown attention backend 'sdpa_flsh'", "did you mean 'sdpa_flash'"]),
    ("Naive", "cuda", ["did you mean 'naive'"]),
])
def test_a_backend_that_cannot_run_is_refused_with_the_fix(backend, device, expected):
    """Bug caught: a backend accepted where it cannot run (the run would fail later inside a kernel with torch's
    'No available kernel'), or a message without the setting to change."""
    with pytest.raises(AttentionBackendError) as error:
        check_attention_backend(backend, device)
    assert isinstance(error.value, ConfigError)  # the command line prints it as a configuration error
    for part in expected:
        assert part in str(error.value)


def test_cuda_backends_check_what_is_installed(monkeypatch):
    """Bug caught: xformers chosen on a GPU machine without the package (an ImportError deep in the first forward
    pass), or flash attention pinned where torch has no flash kernel. Checked without a GPU: the checks read
    what is installed before they touch the device."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "xformers" else real_find_spec(name, *args))
    with pytest.raises(AttentionBackendError, match=r"pip install genalign\[gpu\]"):
        check_attention_backend("xformers", "cuda")
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)
    with pytest.raises(AttentionBackendError, match="no CUDA flash-attention kernel.*trainer.attention=sdpa"):
        check_attention_backend("sdpa_flash", "cuda")
    for backend in ("sdpa", "sdpa_flash", "sdpa_math", "naive"):
        check_attention_backend(backend, "cpu")


def test_pyproject_offers_xformers_as_the_gpu_extra():
    """Bug caught: the error message's `pip install genalign[gpu]` pointing at an extra that does not exist."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(requirement.startswith("xformers") for requirement in extras["gpu"])


# ----------------------------------------------------------------------------------- every model family


@pytest.fixture(scope="module")
def shapes_generator():
    from genalign.generators.diffusion import DiffusionGenerator

    return DiffusionGenerator.from_pretrained(SHAPES_T2I)


def shapes_outputs(generator) -> dict[str, torch.Tensor]:
    """The text encoder's states, one UNet forward (cross-attention to them) and a VAE round trip (its
    mid-block attention on both sides)."""
    g = torch.Generator().manual_seed(0)
    size = generator.denoiser.config.sample_size
    latents = torch.randn(4, generator.latent_channels, size, size, generator=g)
    images = torch.rand(2, 3, size * generator.vae_scale_factor, size * generator.vae_scale_factor, generator=g)
    with torch.no_grad():
        text = generator.encode_prompts(["a red circle", "two green stars", "", "a blue square"], 32, 32)
        unet = generator.denoiser(latents, torch.tensor([10, 300, 600, 900]),
                                  encoder_hidden_states=text.embeds).sample
        vae = generator.vae.decode(generator.vae.encode(images).latent_dist.mean).sample
    return {"text_encoder": text.embeds, "unet": unet, "vae": vae}


def test_every_cpu_backend_computes_the_same_text_to_image_model(shapes_generator):
    """The shapes world's UNet, VAE and CLIP text encoder give the same outputs (1e-4) under sdpa, sdpa_flash,
    sdpa_math and naive. Bug caught: a processor of the wrong variant or scale, or a transformers implementation
    that is not the same attention; the report checks that each backend really was set."""
    generator = shapes_generator
    reference = shapes_outputs(generator)
    try:
        for backend in CPU_BACKENDS:
            with sdpa_kernels(backend):
                report = generator.set_attention_backend(backend)
                processor = "AttnProcessor" if backend == "naive" else "AttnProcessor2_0"
                assert report["denoiser"] == f"diffusers {processor} ×14"
                assert report["vae"] == f"diffusers {processor} ×2"
                implementation = "eager" if backend == "naive" else "sdpa"
                assert report["text_encoder"] == f"transformers {implementation} (CLIPTextModel)"
                for name, value in shapes_outputs(generator).items():
                    assert max_difference(value, reference[name]) < TOLERANCE, (backend, name)
    finally:
        generator.set_attention_backend("sdpa")


def test_naive_leaves_sdpa_and_switching_back_restores_it(shapes_generator, sdpa_calls):
    """Bug caught: a model that stays on torch's SDPA under naive (a forgotten VAE or text encoder, a processor
    that is only renamed), so "naive" would compare SDPA with itself; and a switch that cannot be undone."""
    generator = shapes_generator
    try:
        generator.set_attention_backend("naive")
        shapes_outputs(generator)
        assert sdpa_calls == []
        generator.set_attention_backend("sdpa")
        with torch.no_grad():
            generator.encode_prompts(["a red circle"], 32, 32)
        assert len(sdpa_calls) == 2  # the text encoder's two layers
        shapes_outputs(generator)
        assert len(sdpa_calls) > 2 + 2 + 14  # the UNet's 14 and the VAE's 2 layers come back too
    finally:
        generator.set_attention_backend("sdpa")


def tiny_masked_transformer():
    from genalign.generators.masked import MaskedDiffusionConfig, MaskedDiffusionGenerator

    torch.manual_seed(0)
    generator = MaskedDiffusionGenerator.from_config(MaskedDiffusionConfig(
        alphabet="ACGT", length=24, backbone="transformer", hidden_size=32, num_layers=2, num_heads=4))
    for parameter in generator.backbone.parameters():  # past the zero-initialised output layer
        torch.nn.init.normal_(parameter, std=0.3)
    return generator


def test_every_cpu_backend_computes_the_same_masked_transformer(sdpa_calls):
    """The masked-diffusion transformer's logits agree (1e-4) under every CPU backend, and naive makes no SDPA
    call. Bug caught: a block that ignores its `attention_backend`, or a naive path with other semantics."""
    generator = tiny_masked_transformer()
    x = torch.randint(0, 5, (3, 24), generator=torch.Generator().manual_seed(1))  # 4 = MASK
    with torch.no_grad():
        reference = generator.logits(x)
    for backend in CPU_BACKENDS:
        with sdpa_kernels(backend):
            assert generator.set_attention_backend(backend) == {"backbone": f"{backend} (TransformerBlock) ×2"}
            sdpa_calls.clear()
            with torch.no_grad():
                assert max_difference(generator.logits(x), reference) < TOLERANCE, backend
            assert (len(sdpa_calls) == 0) == (backend == "naive"), backend


def test_every_cpu_backend_gives_the_same_gflownet_rollouts(sdpa_calls):
    """The GFlowNet sequence policy's cached and uncached rollouts are the same trajectories under every CPU
    backend, with log P_F within 1e-4, and naive makes no SDPA call on either path. Bug caught: the key–value
    cached path (one query against many keys) calling SDPA directly, or a causal mask that a one-query step would
    apply wrongly."""
    from pipelines.gfn.environments import ngrams_task
    from pipelines.gfn.policies import SequencePolicy, sample_trajectories

    env = ngrams_task(alphabet="ABC", bigrams=("AB",), max_length=9, min_length=2)
    torch.manual_seed(0)
    policy = SequencePolicy(env, condition_size=3, hidden=16, layers=2, heads=2)
    condition = torch.rand(6, 3, generator=torch.Generator().manual_seed(1))
    uniforms = torch.rand(6, env.max_steps, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reference = sample_trajectories(env, policy, uniforms, condition, cached=False)
    with torch.no_grad():
        reference_log_pf = policy(reference.states, reference.actions, reference.lengths, condition)[0]
    for backend in CPU_BACKENDS:
        with sdpa_kernels(backend):
            assert set_attention_backend(policy, backend) == {"SequencePolicy": f"{backend} (_CausalBlock) ×2"}
            sdpa_calls.clear()
            for cached in (False, True):
                rollout = sample_trajectories(env, policy, uniforms, condition, cached=cached)
                assert torch.equal(rollout.actions, reference.actions), (backend, cached)
            with torch.no_grad():
                log_pf = policy(rollout.states, rollout.actions, rollout.lengths, condition)[0]
            assert max_difference(log_pf, reference_log_pf) < TOLERANCE, backend
            assert (len(sdpa_calls) == 0) == (backend == "naive"), backend


def test_the_mutation_policy_computes_the_same_under_every_cpu_backend():
    """The GFlowNet mutation policy (bidirectional blocks) gives the same logits (1e-4) under every CPU backend.
    Bug caught: a non-causal block passed is_causal=True on some path, or a block the switch does not reach."""
    from pipelines.gfn.environments import MutationTask
    from pipelines.gfn.policies import MutationPolicy

    env = MutationTask(parent="ABCAB", alphabet="ABC", max_edits=2, score=lambda x: torch.ones(len(x)),
                       objective_names=("one",))
    torch.manual_seed(0)
    policy = MutationPolicy(env, hidden=16, layers=2, heads=2)
    states = env.initial_states(3)
    reference = policy.step_logits(states, None)
    for backend in CPU_BACKENDS:
        with sdpa_kernels(backend):
            assert set_attention_backend(policy, backend) == {"MutationPolicy": f"{backend} (_CausalBlock) ×2"}
            assert max_difference(policy.step_logits(states, None), reference) < TOLERANCE, backend


def test_every_cpu_backend_samples_the_same_audio(sdpa_calls):
    """The tones world's text-to-audio model (UNet, VAE, CLAP text tower, Griffin-Lim vocoder) samples the same
    latents and decodes the same mel spectrograms under every CPU backend, and under naive nothing (sampling to
    waveforms included) calls SDPA. Bug caught: the audio generator's own module list missing a model (its UNet or
    VAE left on SDPA), or the CLAP text tower, which transformers gives no SDPA path, breaking the switch."""
    import dataclasses

    from genalign.generators.audio import AudioDiffusionGenerator

    generator = AudioDiffusionGenerator.from_pretrained(ROOT / "genalign" / "worlds" / "assets" / "tones" / "t2a")
    options = dataclasses.replace(generator.default_options(), num_inference_steps=2)
    prompts = ["a piano playing a rising melody", "a fast flute"]

    def sample() -> torch.Tensor:
        """The sampled latents (sampling decodes to waveforms too, so the SDPA count covers the vocoder)."""
        return generator.sample(prompts, options, seeds=[0, 1]).trajectory.states

    def mel(latents: torch.Tensor) -> torch.Tensor:
        """The VAE's decoding, compared instead of waveforms: the Griffin-Lim vocoder's 32 phase iterations turn
        1e-6 differences into ~1e-3 ones, with no attention involved."""
        with torch.no_grad():
            return generator.decode_mel(latents)

    reference_states = sample()
    reference_mel = mel(reference_states[:, -1])
    for backend in CPU_BACKENDS:
        with sdpa_kernels(backend):
            report = generator.set_attention_backend(backend)
            assert report["vocoder"] == "no attention layers"
            assert report["text_encoder"].startswith("transformers eager (ClapTextModelWithProjection")
            sdpa_calls.clear()
            assert max_difference(sample(), reference_states) < TOLERANCE, backend
            assert max_difference(mel(reference_states[:, -1]), reference_mel) < TOLERANCE, backend
            assert (len(sdpa_calls) == 0) == (backend == "naive"), backend


def test_a_transformers_clip_model_computes_the_same_under_every_cpu_backend():
    """A transformers CLIP model (the shapes world's reward CLIP, text and vision towers) gives the same features
    (1e-4) whichever backend. Bug caught: a transformers model left on its load-time implementation, or switched
    to one that changes its outputs."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(ROOT / "genalign" / "worlds" / "assets" / "shapes" / "clip").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.text_config.vocab_size, (2, 8), generator=g)
    pixels = torch.randn(2, 3, model.config.vision_config.image_size, model.config.vision_config.image_size,
                         generator=g)

    def features():
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=pixels)
        return torch.cat([out.text_embeds, out.image_embeds])

    reference = features()
    for backend in CPU_BACKENDS:
        with sdpa_kernels(backend):
            report = set_attention_backend({"clip": model}, backend)
            assert report == {"clip": f"transformers {'eager' if backend == 'naive' else 'sdpa'} (CLIPModel)"}
            assert model.text_model.config._attn_implementation == ("eager" if backend == "naive" else "sdpa")
            assert max_difference(features(), reference) < TOLERANCE, backend


def test_a_transformers_model_without_sdpa_stays_eager():
    """Bug caught: asking transformers for SDPA on a model it has none for (ClapModel, the text tower of every
    audio world) raises, which would stop every audio run at its default setting."""
    from transformers import ClapModel

    model = ClapModel.from_pretrained(ROOT / "genalign" / "worlds" / "assets" / "tones" / "clap")
    report = set_attention_backend({"clap": model}, "sdpa")
    assert report == {"clap": "transformers eager (ClapModel: transformers has no sdpa implementation for it)"}
    assert set_attention_backend({"clap": model}, "naive") == {"clap": "transformers eager (ClapModel)"}


def test_diffusers_layers_keep_their_processor_variant():
    """Bug caught: an added-key/value attention layer (UnCLIP-style UNets) given the plain AttnProcessor, which
    drops the extra keys and values; and a processor this switch does not know replaced under naive instead of
    refused."""
    from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor2_0, SlicedAttnProcessor

    torch.manual_seed(0)
    layer = Attention(query_dim=16, heads=2, dim_head=8, added_kv_proj_dim=12, norm_num_groups=4,
                      processor=AttnAddedKVProcessor2_0())
    hidden, context = torch.randn(2, 16, 3, 3), torch.randn(2, 5, 12)
    with torch.no_grad():
        reference = layer(hidden, encoder_hidden_states=context)
        assert set_attention_backend({"layer": layer}, "naive") == {"layer": "diffusers AttnAddedKVProcessor"}
        assert max_difference(layer(hidden, encoder_hidden_states=context), reference) < 1e-5
    assert set_attention_backend({"layer": layer}, "sdpa") == {"layer": "diffusers AttnAddedKVProcessor2_0"}

    sliced = Attention(query_dim=16, heads=2, dim_head=8, processor=SlicedAttnProcessor(slice_size=1))
    assert set_attention_backend({"sliced": sliced}, "sdpa_math") == {"sliced": "diffusers SlicedAttnProcessor, "
                                                                                "unchanged"}
    with pytest.raises(AttentionBackendError, match="SlicedAttnProcessor.*trainer.attention=sdpa"):
        set_attention_backend({"sliced": sliced}, "naive")


# ----------------------------------------------------------------------------------- a configured pipeline


def test_a_pipeline_runs_its_generator_and_reward_on_the_configured_backend_and_lora_trains(tmp_path, sdpa_calls):
    """DDPO on the shapes world (configs/ddpo_shapes.yaml) with trainer.attention=naive: the UNet, VAE, text
    encoder and CLIP reward all run naive, the gold judge (a CNN, not a module) is reported unchanged, and LoRA
    added afterwards as the Trainer does gets gradients through the naive processors with no SDPA call. Bugs
    caught: the engine not applying trainer.attention (or only to the generator), and processors that bypass
    the LoRA-wrapped projections."""
    from genalign.config import build_config, load_yaml
    from genalign.trainer import prepare_trainable_modules
    from pipelines.ddpo import DDPOConfig, DDPOPipeline

    overrides = [f"trainer.output_dir={tmp_path / 'run'}", "trainer.attention=naive", "sampling.num_inference_steps=2",
                 "sampling.batch_size=2"]
    config = build_config(DDPOConfig, load_yaml(ROOT / "configs" / "ddpo_shapes.yaml"), overrides)
    pipeline = DDPOPipeline(config)
    generator = pipeline.generator
    assert pipeline.attention == {
        "generator.denoiser": "diffusers AttnProcessor ×14",
        "generator.vae": "diffusers AttnProcessor ×2",
        "generator.text_encoder": "transformers eager (CLIPTextModel)",
        "reward": "transformers eager (CLIPModel)",
        "gold": "not a module (ShapesGold), unchanged",
    }
    modules = prepare_trainable_modules(generator, config.trainer)
    assert {type(p).__name__ for p in generator.denoiser.attn_processors.values()} == {"AttnProcessor"}
    rollout = generator.sample(["a red circle", "two green stars"], pipeline.options, seeds=[0, 1])
    step = int(pipeline.trainable_steps()[0])
    log_prob = generator.step_log_prob(rollout.trajectory, torch.tensor([step, step]))
    log_prob.sum().backward()
    lora_b = [p.grad for name, p in modules["denoiser"].named_parameters() if "lora_B" in name]
    assert lora_b and all(g is not None for g in lora_b)
    assert sum(float(g.abs().sum()) for g in lora_b) > 0
    pipeline.reward(rollout.outputs, rollout.texts)
    assert sdpa_calls == []


def test_a_pipeline_refuses_a_backend_its_device_lacks(tmp_path):
    """Bug caught: a run configured with xformers on a CPU machine starting anyway (and failing in the first
    forward pass) instead of stopping at start-up with the fix."""
    from genalign.config import build_config, load_yaml
    from pipelines.ddpo import DDPOConfig, DDPOPipeline

    overrides = [f"trainer.output_dir={tmp_path / 'run'}", "trainer.attention=xformers"]
    config = build_config(DDPOConfig, load_yaml(ROOT / "configs" / "ddpo_shapes.yaml"), overrides)
    with pytest.raises(AttentionBackendError, match="trainer.attention=sdpa"):
        DDPOPipeline(config)
    assert not (tmp_path / "run").exists()


def test_the_gflownet_pipeline_sets_its_policy(tmp_path):
    """Bug caught: the GFlowNet pipeline (which builds its own policy, outside `Pipeline`) ignoring
    trainer.attention."""
    from genalign.config import build_config, load_yaml
    from pipelines.gflownet import GFlowNetConfig, GFlowNetPipeline

    overrides = [f"trainer.output_dir={tmp_path / 'run'}", "trainer.attention=sdpa_math"]
    config = build_config(GFlowNetConfig, load_yaml(ROOT / "configs" / "gflownet_ngrams.yaml"), overrides)
    with sdpa_kernels("sdpa"):  # the pipeline pins the process to math; restore afterwards
        pipeline = GFlowNetPipeline(config)
        assert pipeline.attention == {"policy": "sdpa_math (_CausalBlock) ×3"}
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert all(block.attention_backend == "sdpa_math" for block in pipeline.policy.blocks)


def test_apply_reaches_generators_modules_and_skips_what_holds_no_model():
    """Bug caught: a generator target treated as a module (diffusers models have a `set_attention_backend` of
    their own with other backend names, so the order of the checks matters), or a plain callable reward
    crashing the switch."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    generator = tiny_masked_transformer()
    report = apply_attention_backend("sdpa", "cpu", generator=generator, reward=lambda x: x, vae=vae, model=model,
                                     gold=None)
    assert report == {"generator.backbone": "sdpa (TransformerBlock) ×2", "reward": "not a module (function), unchanged",
                      "vae": "diffusers AttnProcessor2_0 ×2", "model": "no attention layers"}


def test_pipelines_that_build_more_models_set_them_too(tmp_path):
    """Parrot's prompt-expansion LM and Ctrl-U's ControlNet and evaluation reward follow trainer.attention too.
    Bug caught: a model a pipeline builds beside the generator and reward (after `Pipeline.__init__` applied the
    switch) left on its load-time attention."""
    from genalign.config import build_config, load_yaml
    from pipelines.ctrl_u import CtrlUConfig, CtrlUPipeline
    from pipelines.parrot import ParrotConfig, ParrotPipeline

    overrides = [f"trainer.output_dir={tmp_path / 'run'}", "trainer.attention=naive"]
    parrot = ParrotPipeline(build_config(ParrotConfig, load_yaml(ROOT / "configs" / "parrot_shapes.yaml"), overrides))
    assert parrot.attention["pen.model"] == "transformers eager (GPT2LMHeadModel)"
    assert parrot.pen.model.config._attn_implementation == "eager"
    ctrl_u = CtrlUPipeline(build_config(CtrlUConfig, load_yaml(ROOT / "configs" / "ctrl_u_shapes_segmentation.yaml"),
                                        overrides))
    assert ctrl_u.attention["generator.controlnet"] == "diffusers AttnProcessor ×6"
    assert ctrl_u.attention["evaluation_reward"] == "no attention layers"  # the shapes world's predictors are CNNs
