"""Latent text-to-image diffusion as a `Generator` (modality "image"): sampling with exact per-step log-probs.

`DiffusionGenerator` wraps diffusers components (a UNet2DConditionModel or a 2-D transformer denoiser,
AutoencoderKL, one or two CLIP text encoders with tokenizers, a DDIM/DDPM scheduler). It is the only code
that knows this model family; pipelines talk to it through the protocol of `genalign.generators.base`:
`sample`, `step_log_prob`, `sample_differentiable`, `trainable_modules`, `reference`, `save_adapter`.

A trajectory's states are the latents x_T … x_0 [B, T+1, C, h, w]; its conditioning holds the text embeddings
(`embeds`, `attention_mask`, `pooled`, `time_ids`, and `uncond_*` for classifier-free guidance) and, with a
ControlNet, the control images (`control`); its options are the `SamplingOptions` it was drawn with, from which
the step schedule is rebuilt for re-evaluation.

With a ControlNet attached (`from_pretrained(..., controlnet=...)`, genalign.generators.controlnet) the
ControlNet is what trains and the UNet is frozen; sampling reproduces StableDiffusionControlNetPipeline.

Sampling reproduces diffusers' StableDiffusion(XL)Pipeline bit for bit up to float rounding: same noise
draws (one `randn_tensor` call per step, per-sample generators allowed), same CFG, same step formulas.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.utils.checkpoint
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTokenizer

from genalign.attention import AttentionBackend, set_attention_backend
from genalign.generators.base import (
    Conditions,
    ModelLoadError,
    Rollout,
    Trajectory,
    adapter_layers,
    adapters_disabled,
    per_sample_generators,
)
from genalign.generators.controlnet import CONTROL_KEY, check_control_image, check_controlnet_matches, load_controlnet
from genalign.sampling import (
    LogProbReduction,
    StepSchedule,
    compute_dtype,
    gaussian_log_prob,
    predicted_x0_and_eps,
    step_mean,
)

GeneratorArg = torch.Generator | list[torch.Generator] | None
_SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
# model_index.json key recording whether the denoiser attends with the text padding mask.
_MASK_FLAG = "_genalign_use_encoder_attention_mask"


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch.

    Attributes:
        embeds: [B, L, D] token embeddings fed to the denoiser's cross-attention.
        attention_mask: [B, L] (1 = token) or None; passed to the denoiser only if the generator asks.
        pooled: [B, P] pooled text embedding (SDXL) or None.
        time_ids: [B, 6] SDXL size/crop conditioning or None.
    """

    embeds: torch.Tensor
    attention_mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "PromptEmbeds":
        return PromptEmbeds(*(None if t is None else fn(t) for t in self._tensors()))

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.embeds, self.attention_mask, self.pooled, self.time_ids)

    def __getitem__(self, index) -> "PromptEmbeds":
        return self.map(lambda t: t[index])

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    _NAMES = ("embeds", "attention_mask", "pooled", "time_ids")

    def as_conditioning(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors by name (`prefix` + field), as a trajectory's conditioning dict holds them."""
        return {prefix + name: t for name, t in zip(self._NAMES, self._tensors()) if t is not None}

    @classmethod
    def from_conditioning(cls, conditioning: dict[str, torch.Tensor], prefix: str = "") -> "PromptEmbeds | None":
        if prefix + "embeds" not in conditioning:
            return None
        return cls(*(conditioning.get(prefix + name) for name in cls._NAMES))

    @staticmethod
    def cat(items: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        columns = zip(*(item._tensors() for item in items))
        return PromptEmbeds(*(None if col[0] is None else torch.cat(col) for col in columns))


@dataclass
class _Branches:
    """What every denoiser call of one batch is conditioned on: text c, ∅ (None without guidance), the
    expansion ĉ (None without original-prompt-centred guidance) and the control images (None without a
    ControlNet, else [B, 3, H, W] in [0, 1])."""

    cond: PromptEmbeds
    uncond: PromptEmbeds | None = None
    expanded: PromptEmbeds | None = None
    control: torch.Tensor | None = None

    def as_conditioning(self) -> dict[str, torch.Tensor]:
        conditioning = self.cond.as_conditioning()
        for prefix, text in (("uncond_", self.uncond), ("expanded_", self.expanded)):
            if text is not None:
                conditioning.update(text.as_conditioning(prefix))
        if self.control is not None:
            conditioning[CONTROL_KEY] = self.control
        return conditioning

    @classmethod
    def from_conditioning(cls, conditioning: dict[str, torch.Tensor]) -> "_Branches":
        return cls(PromptEmbeds.from_conditioning(conditioning), PromptEmbeds.from_conditioning(conditioning, "uncond_"),
                   PromptEmbeds.from_conditioning(conditioning, "expanded_"), conditioning.get(CONTROL_KEY))


@dataclass
class SamplingOptions:
    """How to sample: steps, CFG, stochasticity and log-prob convention ("sum" over latent elements, the true
    density, or their "mean").

    `expansion_guidance_scale` is w2 of Parrot's original-prompt-centred guidance, used when the conditions
    carry `expanded_texts` ĉ: ε̄ = w1·ε(c) + (1 − w1 − w2)·ε(∅) + w2·ε(ĉ) with w1 = `guidance_scale` (Parrot:
    w1 = w2 = 5); with w2 = 0 it is ordinary CFG on c."""

    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    eta: float = 1.0
    log_prob_reduction: LogProbReduction = "sum"
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""
    expansion_guidance_scale: float = 0.0
    controlnet_conditioning_scale: float = 1.0  # multiplies the ControlNet's residuals (diffusers' argument)


@dataclass
class NoisedPrediction:
    """The denoiser's one-step prediction on noised training data (what data-driven objectives such as the
    ControlNet loss and Ctrl-U's reward loss are built from); both fields are differentiable.

    Attributes:
        loss: [B] float32, the ordinary diffusion training loss per sample (mean over elements of the squared
            error against the ε or v target).
        outputs: [B, 3, H, W] in [0, 1], the one-step estimate x̂_0 decoded (what a reward model reads), or None
            when not asked for.
    """

    loss: torch.Tensor
    outputs: torch.Tensor | None


@dataclass
class _TextTower:
    tokenizer: CLIPTokenizer
    encoder: torch.nn.Module


@dataclass
class DiffusionGenerator:
    """A latent text-to-image diffusion model exposed as a stochastic policy.

    Build it with `from_pretrained` (a diffusers folder or hub id with SD 1.x/2.x or SDXL layout) or
    directly from components. Only the denoiser is ever trained (the ControlNet instead, when one is attached);
    VAE and text encoders stay frozen.
    """

    modality = "image"

    denoiser: torch.nn.Module
    vae: AutoencoderKL
    text_encoder: torch.nn.Module
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler | DDPMScheduler
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: CLIPTokenizer | None = None
    force_zeros_for_empty_prompt: bool = False
    use_encoder_attention_mask: bool = False
    source: str | None = None
    controlnet: ControlNetModel | None = None
    # The module forward passes go through: the denoiser, or its distributed wrapper (DDP/FSDP) once a trainer
    # has prepared it (`set_training_modules`). Configs and weights are always read from `denoiser`.
    _forward: torch.nn.Module | None = field(default=None, repr=False)
    _control_forward: torch.nn.Module | None = field(default=None, repr=False)
    _reference_copy: torch.nn.Module | None = field(default=None, repr=False)
    _in_reference: bool = field(default=False, repr=False)
    _empty_cache: dict = field(default_factory=dict, repr=False)
    _schedules: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        frozen = [self.vae, self.text_encoder, self.text_encoder_2]
        if self.controlnet is not None:
            check_controlnet_matches(self.controlnet, self.denoiser)
            frozen.append(self.denoiser)
        for module in frozen:
            if module is not None:
                module.requires_grad_(False)
                module.eval()

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        scheduler: str | None = None,
        controlnet: str | os.PathLike | None = None,
    ) -> "DiffusionGenerator":
        """Load a diffusers text-to-image folder or hub id (SD 1.x/2.x, or SDXL when `text_encoder_2` exists).

        Args:
            scheduler: "ddim" or "ddpm" to replace the stored scheduler (same noise schedule); None keeps
                it if it is DDIM/DDPM and otherwise converts to DDIM.
            controlnet: attach a ControlNet: "unet" initialises one from the UNet (as diffusers'
                `ControlNetModel.from_unet`), or a ControlNetModel folder or hub id. A
                StableDiffusionControlNetPipeline folder brings its own; passing one here replaces it.
        """
        source = str(path_or_id)
        check_model_source(source, "'stable-diffusion-v1-5/stable-diffusion-v1-5'")
        kwargs = dict(revision=revision)
        if local_files_only is not None:
            kwargs["local_files_only"] = local_files_only
        try:
            index = read_model_index(source, **kwargs)
            denoiser_name = "unet" if "unet" in index else "transformer"
            if denoiser_name not in index:
                raise ModelLoadError(f"'{source}' has neither a unet nor a transformer component in model_index.json")

            def load(name: str, with_dtype: bool = True):
                return load_component(source, index, name, torch_dtype if with_dtype else None, kwargs)

            denoiser = load(denoiser_name)
            has_second_tower = index.get("text_encoder_2", [None])[0] is not None
            stored = index.get("scheduler", [None, None])[1]
            chosen = scheduler or ("ddpm" if stored == "DDPMScheduler" else "ddim")
            if chosen not in _SCHEDULERS:
                raise ModelLoadError(f"scheduler must be 'ddim' or 'ddpm', got {chosen!r}")
            vae = load("vae")
            attached = None
            if controlnet is not None:
                scale = 2 ** (len(vae.config.block_out_channels) - 1)
                attached = load_controlnet(str(controlnet), denoiser, scale, torch_dtype, **kwargs)
            elif index.get("controlnet", [None])[0] is not None:
                attached = load("controlnet")
            generator = cls(
                denoiser=denoiser,
                vae=vae,
                text_encoder=load("text_encoder"),
                tokenizer=load("tokenizer", with_dtype=False),
                # Same noise schedule, but a scheduler whose steps have an exact Gaussian density.
                scheduler=_SCHEDULERS[chosen].from_pretrained(source, subfolder="scheduler", **kwargs),
                text_encoder_2=load("text_encoder_2") if has_second_tower else None,
                tokenizer_2=load("tokenizer_2", with_dtype=False) if has_second_tower else None,
                force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", has_second_tower)),
                # PixArt-style transformers attend with the text padding mask; SD UNets do not.
                use_encoder_attention_mask=bool(
                    index.get(_MASK_FLAG, denoiser_name == "transformer")
                ),
                source=source,
                controlnet=attached,
            )
        except ModelLoadError:
            raise
        except (OSError, ValueError, KeyError, AttributeError) as error:
            raise ModelLoadError(
                f"could not load a text-to-image model from '{source}': {error}\n"
                "Pass a local diffusers folder (model_index.json, unet/ or transformer/, vae/, text_encoder/, "
                "tokenizer/, scheduler/) or a hub id that is in the local cache; without network, download it "
                "elsewhere and copy the folder here."
            ) from error
        return generator

    @classmethod
    def from_pipeline(cls, pipe) -> "DiffusionGenerator":
        """Wrap an in-memory diffusers StableDiffusion(XL)(ControlNet) pipeline, sharing its modules (no copies)."""
        text_encoder_2 = getattr(pipe, "text_encoder_2", None)
        return cls(
            denoiser=pipe.unet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            scheduler=pipe.scheduler,
            text_encoder_2=text_encoder_2,
            tokenizer_2=getattr(pipe, "tokenizer_2", None),
            force_zeros_for_empty_prompt=bool(
                getattr(pipe.config, "force_zeros_for_empty_prompt", text_encoder_2 is not None)
            ),
            controlnet=getattr(pipe, "controlnet", None),
        )

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write a diffusers folder (model_index.json + one subfolder per component).

        UNet models are written with the StableDiffusion(XL)Pipeline layout (StableDiffusionControlNetPipeline
        with a ControlNet), so diffusers' own `from_pretrained` loads them too; transformer denoisers with the
        PixArt layout.
        """
        import diffusers

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        is_unet = isinstance(self.denoiser, UNet2DConditionModel)
        components = {
            "unet" if is_unet else "transformer": self.denoiser,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "scheduler": self.scheduler,
            "text_encoder_2": self.text_encoder_2,
            "tokenizer_2": self.tokenizer_2,
            "controlnet": self.controlnet,
        }
        if self.controlnet is not None and (self.text_encoder_2 is not None or not is_unet):
            raise ValueError("saving a ControlNet is supported for SD 1.x/2.x UNet models "
                             "(StableDiffusionControlNetPipeline layout)")
        if self.text_encoder_2 is not None:
            pipeline_class = "StableDiffusionXLPipeline"
        elif self.controlnet is not None:
            pipeline_class = "StableDiffusionControlNetPipeline"
        else:
            pipeline_class = "StableDiffusionPipeline" if is_unet else "PixArtAlphaPipeline"
        index: dict = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__}
        for name, component in components.items():
            if component is None:
                continue
            component.save_pretrained(path / name)
            library = type(component).__module__.split(".")[0]
            index[name] = [library, type(component).__name__]
        if pipeline_class in ("StableDiffusionPipeline", "StableDiffusionControlNetPipeline"):
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        if pipeline_class == "StableDiffusionXLPipeline":
            index["force_zeros_for_empty_prompt"] = self.force_zeros_for_empty_prompt
        index[_MASK_FLAG] = self.use_encoder_attention_mask
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
        return path

    def save_adapter(self, path: str | os.PathLike) -> Path:
        """Write the denoiser's LoRA adapter as `pytorch_lora_weights.safetensors` in diffusers' format,
        so a plain diffusers pipeline of the same base model loads it with `pipe.load_lora_weights(path)`.

        With a ControlNet (diffusers has no LoRA loader for ControlNets) the adapter goes to
        `controlnet_lora.safetensors` in peft's naming; `genalign sample` and the gallery load it from the
        checkpoint either way."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        if self.controlnet is not None:
            Path(path).mkdir(parents=True, exist_ok=True)
            layers = {k: v.detach().float().cpu().contiguous()
                      for k, v in get_peft_model_state_dict(self.controlnet).items()}
            save_file(layers, str(Path(path) / "controlnet_lora.safetensors"))
            return Path(path)

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.denoiser))
        layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
        pipeline_class = StableDiffusionXLPipeline if self.text_encoder_2 is not None else StableDiffusionPipeline
        metadata = self.denoiser.peft_config["default"].to_dict()
        pipeline_class.save_lora_weights(path, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)
        return Path(path)

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "DiffusionGenerator":
        # Passing dtype=None makes diffusers warn about casting; only pass what changes.
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in self._modules():
            module.to(**kwargs)
        self._empty_cache.clear()
        return self

    def _modules(self) -> list[torch.nn.Module]:
        modules = (self.denoiser, self.vae, self.text_encoder, self.text_encoder_2, self.controlnet,
                   self._reference_copy)
        return [m for m in modules if m is not None]

    def set_attention_backend(self, backend: AttentionBackend) -> dict[str, str]:
        """Every diffusers model (denoiser, VAE, ControlNet, the frozen reference copy) gets `backend`'s attention
        processors, the text encoders (transformers) its attention implementation (`genalign.attention`)."""
        return set_attention_backend({
            "denoiser": self.denoiser,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "controlnet": self.controlnet,
            "reference_copy": self._reference_copy,
        }, backend)

    # ------------------------------------------------------------------ what trains, and the reference
    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """{"denoiser": UNet/transformer}, or {"controlnet": ControlNet} when one is attached (UNet frozen)."""
        if self.controlnet is not None:
            return {"controlnet": self.controlnet}
        return {"denoiser": self.denoiser}

    def set_training_modules(self, modules: dict[str, torch.nn.Module]) -> None:
        (expected,) = self.trainable_modules()
        if set(modules) != {expected}:
            raise KeyError(f"unknown training modules {sorted(set(modules) - {expected})}; this generator trains "
                           f"'{expected}'")
        if expected == "controlnet":
            self._control_forward = modules["controlnet"]
        else:
            self._forward = modules["denoiser"]

    def keep_reference_copy(self) -> None:
        """Freeze a copy of the trained module for `reference()` under full fine-tuning (LoRA needs none)."""
        if not adapter_layers(self.trainable_modules()):
            (trained,) = self.trainable_modules().values()
            self._reference_copy = copy.deepcopy(trained).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Compute with the pretrained weights of what trains (the denoiser, or the ControlNet): LoRA adapters
        disabled, or the frozen copy."""
        if self._reference_copy is None:
            with adapters_disabled(self.trainable_modules()):
                yield
            return
        previous, self._in_reference = self._in_reference, True
        try:
            yield
        finally:
            self._in_reference = previous

    def default_options(self) -> SamplingOptions:
        return SamplingOptions()

    def schedule(self, options: SamplingOptions) -> StepSchedule:
        """The step scalars for these options (cached: re-evaluation rebuilds it for every batch)."""
        key = (options.num_inference_steps, options.eta)
        if key not in self._schedules:
            self._schedules[key] = StepSchedule.from_scheduler(self.scheduler, options.num_inference_steps, options.eta)
        return self._schedules[key]

    def trainable_steps(self, options: SamplingOptions) -> torch.Tensor:
        """[T] bool: the steps that have a density (σ > 0) under these options."""
        return self.schedule(options).stochastic

    def default_size(self) -> tuple[int, int]:
        size = self.denoiser.config.sample_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        return int(size[0]) * self.vae_scale_factor, int(size[1]) * self.vae_scale_factor

    # ------------------------------------------------------------------ text conditioning
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], height: int, width: int) -> PromptEmbeds:
        """Encode prompts exactly as diffusers' SD / SDXL pipelines do. Returns [B, L, D] embeddings."""
        prompts = list(prompts)
        towers = [_TextTower(self.tokenizer, self.text_encoder)]
        if self.text_encoder_2 is not None:
            towers.append(_TextTower(self.tokenizer_2, self.text_encoder_2))
        device = self.device
        hidden, pooled, mask = [], None, None
        for tower in towers:
            tokens = tower.tokenizer(
                prompts,
                padding="max_length",
                max_length=tower.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            ids = tokens.input_ids.to(device)
            if self.text_encoder_2 is None:
                use_mask = getattr(tower.encoder.config, "use_attention_mask", False)
                attention = tokens.attention_mask.to(device) if use_mask else None
                hidden.append(tower.encoder(ids, attention_mask=attention)[0])
                mask = tokens.attention_mask.to(device)
            else:
                out = tower.encoder(ids, output_hidden_states=True)
                if pooled is None and out[0].ndim == 2:
                    pooled = out[0]
                hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1).to(self.dtype)
        if self.text_encoder_2 is None:
            return PromptEmbeds(embeds, attention_mask=mask)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=self.dtype)
        return PromptEmbeds(embeds, pooled=pooled.to(self.dtype), time_ids=time_ids.repeat(len(prompts), 1))

    def negative_embeds(self, batch: int, height: int, width: int, negative_prompt: str = "") -> PromptEmbeds:
        """Unconditional embeddings for CFG: the encoded negative prompt, or zeros (SDXL default)."""
        # Keyed by the autocast state too: embeddings encoded under autocast differ in their last bits, and a
        # cache filled in one context and read in another made resumed runs differ from uninterrupted ones.
        device_type = self.device.type
        autocast = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
        key = (negative_prompt, height, width, autocast)
        if key not in self._empty_cache:
            if self.force_zeros_for_empty_prompt and negative_prompt == "":
                ref = self.encode_prompts([""], height, width)
                self._empty_cache[key] = PromptEmbeds(
                    torch.zeros_like(ref.embeds), None, torch.zeros_like(ref.pooled), ref.time_ids
                )
            else:
                self._empty_cache[key] = self.encode_prompts([negative_prompt], height, width)
        single = self._empty_cache[key]
        return single.map(lambda t: t.expand(batch, *t.shape[1:]))

    # ------------------------------------------------------------------ denoiser
    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: PromptEmbeds | None,
        uncond: PromptEmbeds | None,
        guidance_scale: float,
        expanded: PromptEmbeds | None = None,
        expansion_scale: float = 0.0,
        control: torch.Tensor | None = None,
        control_scale: float = 1.0,
    ) -> torch.Tensor:
        """Guided denoiser output ε̂ = ε(∅) + w1·(ε(c) − ε(∅)) + w2·(ε(ĉ) − ε(∅)), in one batched call.

        That is Parrot's w1·ε(c) + (1 − w1 − w2)·ε(∅) + w2·ε(ĉ) written so that without an expansion (or with
        w2 = 0) it is ordinary CFG ε(∅) + w1·(ε(c) − ε(∅)) to the bit. A branch that is None is left out: no
        `uncond` means no guidance (the one conditional branch is returned).

        Args:
            latents: [B, C, h, w]; timesteps: [B] (samples may be at different timesteps).
            cond, uncond, expanded: text c, the negative/empty text ∅, the expansion ĉ ([B, L, D] embeddings).
            guidance_scale: w1; expansion_scale: w2.
            control: [B, 3, H, W] control images in [0, 1] (with a ControlNet), the same for every branch, as
                StableDiffusionControlNetPipeline feeds them; control_scale multiplies the ControlNet residuals.
        Returns:
            [B, C, h, w] in the denoiser's output dtype.
        """
        branches = [(name, text) for name, text in (("uncond", uncond), ("cond", cond), ("expanded", expanded))
                    if text is not None]
        if not branches:
            raise ValueError("predict needs at least one of cond, uncond and expanded")
        if len(branches) == 1:
            return self._call_denoiser(latents, timesteps, branches[0][1], control, control_scale)
        n = len(branches)
        out = self._call_denoiser(torch.cat([latents] * n), torch.cat([timesteps] * n),
                                  PromptEmbeds.cat([text for _, text in branches]),
                                  None if control is None else torch.cat([control] * n), control_scale)
        outs = dict(zip((name for name, _ in branches), out.chunk(n)))
        if "uncond" not in outs:
            raise ValueError("guidance with two conditional branches needs the unconditional one (uncond)")
        guided = outs["uncond"]
        if "cond" in outs:
            guided = guided + guidance_scale * (outs["cond"] - outs["uncond"])
        if "expanded" in outs:
            guided = guided + expansion_scale * (outs["expanded"] - outs["uncond"])
        return guided

    def _guided(self, latents: torch.Tensor, timesteps: torch.Tensor, branches: _Branches,
                options: SamplingOptions) -> torch.Tensor:
        """`predict` with the guidance and control settings of `options`."""
        return self.predict(latents, timesteps, branches.cond, branches.uncond, options.guidance_scale,
                            branches.expanded, getattr(options, "expansion_guidance_scale", 0.0),
                            branches.control, getattr(options, "controlnet_conditioning_scale", 1.0))

    def denoising_error(self, trajectory: Trajectory, seeds: Sequence[int]) -> torch.Tensor:
        """The denoiser's training error on each trajectory's final sample, at a timestep and noise drawn from the
        sample's seed (what Diffusion-DPO/KTO compare between the policy and `reference()`; equal seeds give equal
        draws, so a winner and a loser can share theirs). From `torch.Generator().manual_seed(seed)`: first t
        (uniform over the training timesteps), then ε of the latent's shape.

        Returns:
            [B] float32, differentiable w.r.t. the denoiser (see `denoising_error_at`).
        """
        latents = trajectory.states[:, -1]
        draws = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(steps, (1,), generator=g) for g in draws])
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in draws])
        return self.denoising_error_at(latents, trajectory.conditioning, timesteps, noise)

    def denoising_error_at(
        self,
        latents: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        timesteps: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """The denoiser's training error on clean `latents` noised to `timesteps` (what Diffusion-DPO/KTO compare
        between the policy and `reference()`): mean over elements of (prediction − target)², the target being
        the noise (ε-prediction) or the velocity (v-prediction), conditioned without guidance.

        Args:
            latents: [B, C, h, w] clean latents (a trajectory's last state).
            conditioning: a trajectory's conditioning (only the conditional embeddings are used).
            timesteps: [B] integer training timesteps in [0, num_train_timesteps).
            noise: [B, C, h, w] standard normal noise.
        Returns:
            [B] float32 errors, differentiable w.r.t. the denoiser.
        """
        latents, noise = latents.to(self.device), noise.to(self.device)
        timesteps = timesteps.to(self.device).long()
        branches = _Branches.from_conditioning({k: v.to(self.device) for k, v in conditioning.items()})
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction = self.predict(noisy.to(self.dtype), timesteps, branches.cond, None, 1.0, control=branches.control)
        target = self._training_target(latents, noise, timesteps)
        return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)

    def _training_target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to output for `clean` noised with `noise`: ε, or the velocity v."""
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(clean, noise, timesteps)
        raise ValueError(f"training on data supports epsilon and v_prediction models, not {kind!r}")

    # ------------------------------------------------------------------ training on data
    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] → clean latents [B, C, h, w] as diffusers' training scripts make them: a
        VAE posterior sample (the mean when no `seeds` are given), scaled by the VAE's scaling factor."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode expects images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        posterior = self.vae.encode(images.to(self.device, self.vae.dtype) * 2 - 1).latent_dist
        latents = posterior.mode() if seeds is None else posterior.sample(per_sample_generators(seeds, len(images)))
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).to(self.dtype)

    def noised_prediction(
        self,
        clean: torch.Tensor,
        conditions: Conditions | Sequence[str],
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        *,
        decode: bool | torch.Tensor = True,
    ) -> NoisedPrediction:
        """Noise clean latents to `timesteps` with `noise` (x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε), predict with the current
        weights conditioned on the texts (and control images) without guidance, and return the training loss and
        the decoded one-step estimate x̂_0 (the scheduler's pred_original_sample).

        Args:
            clean: [B, C, h, w] latents from `encode`; timesteps: [B] integers in [0, num_train_timesteps);
            noise: [B, C, h, w] standard normal.
            decode: whether to decode x̂_0, or a [B] bool mask of the rows to decode (outputs then holds those
                rows only: a reward that reads only some of them need not pay for decoding the rest).
        """
        conditions = Conditions.coerce(conditions)
        clean, noise = clean.to(self.device), noise.to(self.device)
        timesteps = timesteps.to(self.device).long()
        height, width = clean.shape[-2] * self.vae_scale_factor, clean.shape[-1] * self.vae_scale_factor
        control = conditions.tensors.get(CONTROL_KEY)
        check_control_image(control, len(conditions), height, width, self.controlnet is not None)
        cond = self.encode_prompts(conditions.texts, height, width)
        noisy = self.scheduler.add_noise(clean, noise, timesteps).to(self.dtype)
        prediction = self.predict(noisy, timesteps, cond, None, 1.0,
                                  control=None if control is None else control.to(self.device, self.dtype))
        target = self._training_target(clean, noise, timesteps)
        loss = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        outputs = None
        rows = torch.ones(len(clean), dtype=torch.bool) if decode is True else torch.as_tensor(decode, dtype=torch.bool)
        if decode is not False and bool(rows.any()):
            rows = rows.to(self.device)
            alpha = self.scheduler.alphas_cumprod.to(self.device)[timesteps[rows]].view(-1, 1, 1, 1).double()
            x0, _ = predicted_x0_and_eps(prediction[rows].double(), noisy[rows].double(), alpha,
                                         self.scheduler.config.prediction_type)
            outputs = self.decode(x0.to(self.dtype))
        return NoisedPrediction(loss=loss, outputs=outputs)

    def _denoiser_forward(self) -> torch.nn.Module:
        """The module a forward pass goes through: the frozen copy inside `reference()` under full fine-tuning,
        else the distributed wrapper once a trainer prepared one, else the denoiser itself."""
        if self._in_reference and self.controlnet is None:
            return self._reference_copy
        return self._forward if self._forward is not None else self.denoiser

    def _controlnet_forward(self) -> torch.nn.Module:
        """The same choice for the ControlNet (what trains when one is attached)."""
        if self._in_reference:
            return self._reference_copy
        return self._control_forward if self._control_forward is not None else self.controlnet

    def _call_denoiser(self, latents: torch.Tensor, timesteps: torch.Tensor, text: PromptEmbeds,
                       control: torch.Tensor | None = None, control_scale: float = 1.0) -> torch.Tensor:
        added = None
        if text.pooled is not None:
            added = {"text_embeds": text.pooled, "time_ids": text.time_ids}
        mask = text.attention_mask if self.use_encoder_attention_mask else None
        forward = self._denoiser_forward()
        residuals = {}
        if self.controlnet is not None:
            if control is None:
                raise ValueError("this model has a ControlNet; every denoiser call needs the control images")
            down, mid = self._controlnet_forward()(
                latents,
                timesteps,
                encoder_hidden_states=text.embeds,
                controlnet_cond=control.to(latents.dtype),
                conditioning_scale=control_scale,
                return_dict=False,
            )
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        if isinstance(self.denoiser, UNet2DConditionModel):
            return forward(
                latents,
                timesteps,
                encoder_hidden_states=text.embeds,
                encoder_attention_mask=mask,
                added_cond_kwargs=added,
                return_dict=False,
                **residuals,
            )[0]
        # 2-D transformer denoisers (DiT/PixArt-style): a learned-variance head doubles the channels;
        # the DDIM/DDPM policy uses only the mean prediction, as diffusers' PixArt pipeline does.
        out = forward(
            latents,
            encoder_hidden_states=text.embeds,
            timestep=timesteps,
            encoder_attention_mask=mask,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
        if out.shape[1] == 2 * latents.shape[1]:
            out = out[:, : latents.shape[1]]
        return out

    # ------------------------------------------------------------------ sampling
    def _prepare(self, conditions: Conditions, options: SamplingOptions) -> tuple[int, int, _Branches, StepSchedule]:
        """(height, width, the branches every denoiser call is conditioned on, the step schedule)."""
        prompts = conditions.texts
        if len(prompts) == 0:
            raise ValueError("no prompts to sample from; pass at least one prompt")
        w2 = getattr(options, "expansion_guidance_scale", 0.0)
        if conditions.expanded_texts is None and w2 != 0:
            raise ValueError(f"expansion_guidance_scale={w2:g} guides toward prompt expansions, but the conditions "
                             "have none; pass Conditions(texts=prompts, expanded_texts=expansions) (e.g. from a "
                             "PromptExpansionNetwork) or set expansion_guidance_scale=0")
        if conditions.expanded_texts is not None and w2 == 0:
            raise ValueError("the conditions carry expanded_texts but expansion_guidance_scale is 0, so they would be "
                             "ignored; set expansion_guidance_scale (Parrot: 5) for original-prompt-centred guidance, "
                             "or pass the expansions as the texts to condition on them alone")
        height, width = self.output_size(options)
        control = conditions.tensors.get(CONTROL_KEY)
        check_control_image(control, len(prompts), height, width, self.controlnet is not None)
        branches = _Branches(self.encode_prompts(prompts, height, width),
                             control=None if control is None else control.to(self.device, self.dtype))
        if w2 != 0:
            branches.expanded = self.encode_prompts(conditions.expanded_texts, height, width)
        if w2 != 0 or options.guidance_scale > 1.0:
            branches.uncond = self.negative_embeds(len(prompts), height, width, options.negative_prompt)
        return height, width, branches, self.schedule(options)

    def output_size(self, options: SamplingOptions) -> tuple[int, int]:
        """(height, width) in pixels of what these options sample (the VAE's input size)."""
        default_h, default_w = self.default_size()
        height, width = options.height or default_h, options.width or default_w
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}×{width}")
        return height, width

    def initial_noise(self, batch: int, height: int, width: int, generator: GeneratorArg) -> torch.Tensor:
        """x_T ~ N(0, I) drawn as diffusers draws it (so equal seeds give equal images). [B, C, h, w]."""
        shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        return noise * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def sample(
        self,
        conditions: Conditions | Sequence[str],
        options: SamplingOptions | None = None,
        *,
        seeds: Sequence[int] | None = None,
        generator: GeneratorArg = None,
        batch_size: int | None = None,
        return_trajectory: bool = True,
        decode: bool = True,
        progress: bool = False,
    ) -> Rollout:
        """Sample one image per condition (repeat a prompt for several), recording the trajectory.

        Args:
            conditions: B prompts (or `Conditions`; their texts are the prompts).
            seeds: one per sample, which makes each sample independent of batching and of which process draws
                it; or pass `generator` (a torch.Generator or one per sample), as in diffusers.
            batch_size: split into chunks of this size (memory); with per-sample seeds results do not change.
        Returns:
            Rollout with outputs (images) [B, 3, H, W] in [0, 1] (None without `decode`), extras["latents"] the
            final latents [B, C, h, w], and the trajectory (states [B, T+1, C, h, w]).
        """
        options = options or self.default_options()
        conditions = Conditions.coerce(conditions)
        if seeds is not None:
            if generator is not None:
                raise ValueError("pass either generator or seeds, not both")
            generator = per_sample_generators(seeds, len(conditions))
        chunk = batch_size or len(conditions)
        if chunk < len(conditions):
            if generator is not None and not isinstance(generator, list):
                raise ValueError("chunked sampling needs per-sample generators or seeds so chunks stay reproducible")
            return Rollout.cat([
                self.sample(
                    conditions[start : start + chunk],
                    options,
                    generator=None if generator is None else generator[start : start + chunk],
                    return_trajectory=return_trajectory,
                    decode=decode,
                    progress=progress,
                )
                for start in range(0, len(conditions), chunk)
            ])

        prompts = conditions.texts
        height, width, branches, schedule = self._prepare(conditions, options)
        latents = self.initial_noise(len(prompts), height, width, generator)
        states, log_probs = [latents], []
        steps = range(schedule.num_steps)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="sampling", leave=False)
        for i in steps:
            step_index = torch.full((len(prompts),), i, dtype=torch.long)
            t = schedule.timesteps[i].to(self.device).expand(len(prompts))
            model_output = self._guided(latents, t, branches, options)
            mean, std = step_mean(schedule, model_output, latents, step_index)
            next_latents = mean
            if schedule.std[i] > 0:
                # One randn_tensor call per step in the model dtype, as the diffusers schedulers draw it.
                noise = randn_tensor(latents.shape, generator=generator, device=self.device, dtype=model_output.dtype)
                next_latents = mean + std * noise.to(mean.dtype)
            # The density is of the state as stored (rounded to the model dtype), which is what
            # re-evaluation will score; in half precision the rounding alone moves log π by ~1e-2.
            latents = next_latents.to(self.dtype)
            if schedule.stochastic[i]:
                log_probs.append(gaussian_log_prob(latents, mean, std, options.log_prob_reduction))
            else:
                log_probs.append(torch.zeros(len(prompts), device=self.device, dtype=torch.float64))
            if return_trajectory:
                states.append(latents)
        trajectory = None
        if return_trajectory:
            conditioning = branches.as_conditioning()
            trajectory = Trajectory(
                states=torch.stack(states, dim=1),
                log_probs=torch.stack(log_probs, dim=1),
                trainable=schedule.stochastic.clone(),
                conditioning=conditioning,
                options=options,
            )
        return Rollout(
            outputs=self.outputs_from_latents(latents, options) if decode else None,
            modality=self.modality,
            conditions=conditions,
            trajectory=trajectory,
            extras={"latents": latents},
        )

    def outputs_from_latents(self, latents: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
        """The reward-facing outputs of final latents sampled with `options` (images: `decode`)."""
        return self.decode(latents)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] → images [B, 3, H, W] in [0, 1] (differentiable if latents are)."""
        scaled = latents / self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift:
            scaled = scaled + shift
        image = self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ log-probs under current weights
    def step_log_prob(
        self,
        trajectory: Trajectory,
        step_index: torch.Tensor,
        return_mean: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log π_θ(x_{i+1} | x_i, c) under the current weights, one denoiser call for the whole batch, with the
        trajectory's own log-prob reduction.

        Args:
            trajectory: B recorded trajectories.
            step_index: [B] step per sample (each must be a stochastic step).
        Returns:
            [B] float64 log-probs (differentiable w.r.t. the denoiser); with `return_mean`, also the step
            mean [B, C, h, w] and std [B, 1, 1, 1] (for KL terms).
        """
        options: SamplingOptions = trajectory.options
        schedule = self.schedule(options)
        states = trajectory.states
        batch = torch.arange(len(trajectory), device=states.device)
        idx = torch.as_tensor(step_index, device=states.device).long().expand(len(trajectory))
        x_t = states[batch, idx].to(self.device)
        x_next = states[batch, idx + 1].to(self.device)
        t = schedule.timesteps[idx.cpu()].to(self.device)
        conditioning = {name: v.to(self.device) for name, v in trajectory.conditioning.items()}
        model_output = self._guided(x_t, t, _Branches.from_conditioning(conditioning), options)
        mean, std = step_mean(schedule, model_output, x_t, idx)
        log_prob = gaussian_log_prob(x_next, mean, std, options.log_prob_reduction)
        return (log_prob, mean, std) if return_mean else log_prob

    def log_prob(self, trajectory: Trajectory, step_indices: torch.Tensor) -> torch.Tensor:
        """Re-evaluate log-probs on chosen steps. step_indices: [S] (same for all) or [B, S]. Returns [B, S]."""
        if step_indices.ndim == 1:
            step_indices = step_indices.unsqueeze(0).expand(len(trajectory), -1)
        columns = [self.step_log_prob(trajectory, step_indices[:, j]) for j in range(step_indices.shape[1])]
        return torch.stack(columns, dim=1)

    # ------------------------------------------------------------------ reward-gradient sampling
    def sample_differentiable(
        self,
        conditions: Conditions | Sequence[str],
        options: SamplingOptions | None = None,
        *,
        grad_steps: int = 1,
        seeds: Sequence[int] | None = None,
        generator: GeneratorArg = None,
        checkpoint: bool = True,
        lv_rounds: int = 0,
    ) -> Rollout:
        """Sample with gradients through the last `grad_steps` denoiser calls (DRaFT-K / AlignProp).

        The first T−K steps run under no_grad, so memory does not depend on them; each tracked denoiser
        call is wrapped in activation checkpointing (if `checkpoint`), so memory grows slowly with K.
        `lv_rounds` > 0 gives DRaFT-LV: after a no-grad pass to x_0, each round re-noises x_0 to the last
        timestep and denoises it with gradients; images [lv_rounds·B, ...] are returned with the conditions
        repeated.

        Returns:
            Rollout whose outputs (images [B, 3, H, W]) carry gradients (no trajectory).
        """
        options = options or self.default_options()
        conditions = Conditions.coerce(conditions)
        if seeds is not None:
            generator = per_sample_generators(seeds, len(conditions))
        prompts = conditions.texts
        height, width, branches, schedule = self._prepare(conditions, options)
        T = schedule.num_steps
        if not 1 <= grad_steps <= T:
            raise ValueError(f"grad_steps must be between 1 and num_inference_steps={T}, got {grad_steps}")
        latents = self.initial_noise(len(prompts), height, width, generator)
        first_tracked = T if lv_rounds > 0 else T - grad_steps

        def one_step(x: torch.Tensor, i: int, noise: torch.Tensor | None) -> torch.Tensor:
            t = schedule.timesteps[i].to(self.device).expand(x.shape[0])
            out = self._guided(x, t, branches, options)
            mean, std = step_mean(schedule, out, x, torch.full((x.shape[0],), i, dtype=torch.long))
            return mean if noise is None else mean + std * noise.to(mean.dtype)

        for i in range(T):
            noise = None
            if schedule.std[i] > 0:
                noise = randn_tensor(latents.shape, generator=generator, device=self.device, dtype=self.dtype)
            if i < first_tracked:
                with torch.no_grad():
                    latents = one_step(latents, i, noise).to(self.dtype)
            elif checkpoint:
                latents = torch.utils.checkpoint.checkpoint(one_step, latents, i, noise, use_reentrant=False)
            else:
                latents = one_step(latents, i, noise)

        if lv_rounds > 0:
            if branches.expanded is not None:
                raise ValueError("DRaFT-LV (lv_rounds > 0) does not support original-prompt-centred guidance; "
                                 "sample with expansion_guidance_scale=0")
            latents = self._lv_denoise(latents.detach(), schedule, branches, options, lv_rounds, generator)
            conditions = Conditions.cat([conditions] * lv_rounds)
        def decode(x: torch.Tensor) -> torch.Tensor:
            return self.outputs_from_latents(x, options)

        if checkpoint and torch.is_grad_enabled():
            outputs = torch.utils.checkpoint.checkpoint(decode, latents, use_reentrant=False)
        else:
            outputs = decode(latents)
        return Rollout(outputs=outputs, modality=self.modality, conditions=conditions, extras={"latents": latents})

    def _lv_denoise(
        self,
        x0: torch.Tensor,
        schedule: StepSchedule,
        branches: _Branches,
        options: SamplingOptions,
        rounds: int,
        generator: GeneratorArg,
    ) -> torch.Tensor:
        """DRaFT-LV: x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε at the last timestep, then x̂_0 with gradients; [rounds·B, ...]."""
        last = schedule.num_steps - 1
        alpha = schedule.alpha_prod[last].to(device=self.device, dtype=compute_dtype(x0))
        t = schedule.timesteps[last].to(self.device)
        estimates = []
        for _ in range(rounds):
            eps = randn_tensor(x0.shape, generator=generator, device=self.device, dtype=self.dtype).to(alpha.dtype)
            x_t = alpha.sqrt() * x0.to(alpha.dtype) + (1 - alpha).sqrt() * eps
            out = self._guided(x_t.to(self.dtype), t.expand(x0.shape[0]), branches, options)
            x0_hat, _ = predicted_x0_and_eps(out.to(alpha.dtype), x_t, alpha, schedule.prediction_type)
            estimates.append(x0_hat)
        return torch.cat(estimates)


def check_model_source(source: str, example_id: str) -> None:
    """Fail early, naming the fix, for a path-like source that is not an existing folder (a typo'd path would
    otherwise be tried as a hub id and fail with a network error)."""
    if not os.path.isdir(source) and (
        source.startswith((".", "/", "~")) or os.sep in source.strip("/").split("/", 1)[-1]
    ):
        raise ModelLoadError(
            f"model path '{source}' does not exist; pass an existing diffusers folder "
            f"(with model_index.json) or a hub id such as {example_id}"
        )


def load_component(source: str, index: dict, name: str, torch_dtype: torch.dtype | None, kwargs: dict):
    """Component `name` of a diffusers folder or hub repo, with the class its model_index.json names."""
    library, class_name = index[name]
    component_class = _component_class(source, name, library, class_name)
    extra = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    return component_class.from_pretrained(source, subfolder=name, **extra, **kwargs)


# model_index.json names each component's library and class; only these libraries may be imported from it, so
# that a downloaded folder cannot make us import and run an arbitrary installed module.
_COMPONENT_LIBRARIES = ("diffusers", "transformers", "genalign")


def _component_class(source: str, name: str, library: str, class_name: str) -> type:
    """The class model_index.json names for component `name`, if it is a loadable class of an allowed library."""
    if library.split(".")[0] not in _COMPONENT_LIBRARIES:
        raise ModelLoadError(
            f"'{source}': model_index.json names {library}.{class_name} for '{name}'; components may only come "
            f"from {', '.join(_COMPONENT_LIBRARIES)}. Fix the entry (e.g. [\"diffusers\", \"UNet2DConditionModel\"])"
        )
    component_class = getattr(importlib.import_module(library), class_name, None)
    if not isinstance(component_class, type) or not hasattr(component_class, "from_pretrained"):
        raise ModelLoadError(
            f"'{source}': model_index.json names {library}.{class_name} for '{name}', which is not a model, "
            "tokenizer or scheduler class with from_pretrained"
        )
    return component_class


def read_model_index(source: str, **kwargs) -> dict:
    """model_index.json of a local folder or hub repo (which components exist, pipeline flags)."""
    if os.path.isdir(source):
        index_path = Path(source) / "model_index.json"
        if not index_path.exists():
            raise ModelLoadError(
                f"'{source}' has no model_index.json; it is not a diffusers pipeline folder. "
                "Save one with pipe.save_pretrained(folder) or DiffusionGenerator.save_pretrained(folder)."
            )
        return json.loads(index_path.read_text())
    from huggingface_hub import hf_hub_download

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return json.loads(Path(hf_hub_download(source, "model_index.json", **kwargs)).read_text())
