"""Latent text-to-audio diffusion as a `Generator` (modality "audio"): diffusers' AudioLDM / MusicLDM layout.

A UNet2DConditionModel denoises latents of a log-mel spectrogram; an AutoencoderKL maps latents [B, C, h, w]
to mels [B, 1, frames, mel bins]; a vocoder (transformers' `SpeechT5HifiGan`, or our `GriffinLimVocoder`)
turns mels [B, frames, bins] into waveforms [B, samples]. The text conditions through a CLAP text tower whose
pooled projection is the UNet's *class* embedding (`class_embed_type="simple_projection"`, concatenated to the
time embedding), not through cross-attention (diffusers passes no encoder states):

- AudioLDM: `ClapTextModelWithProjection`, embedding L2-normalised;
- MusicLDM: the whole `ClapModel`, `get_text_features` as it is (transformers normalises it already).

The sampling loop, per-step log-probs, re-evaluation and the differentiable path are the image generator's
(`DiffusionGenerator`); this class changes what differs: text encoding, the denoiser call, the size (seconds
of audio instead of pixels) and decoding (VAE → mel → vocoder → waveform cut to the asked length). Sampling
reproduces diffusers' `AudioLDMPipeline` up to float rounding for the same seeds.

AudioLDM2 is not this family: its conditioning is a GPT-2 that generates "memory" tokens from CLAP and
T5/Flan-T5 features, fed to a UNet with two cross-attentions (`AudioLDM2UNet2DConditionModel`), so loading one
fails with a message saying so.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from genalign.attention import AttentionBackend, set_attention_backend
from genalign.generators.base import ModelLoadError
from genalign.generators.diffusion import (
    _MASK_FLAG,
    _SCHEDULERS,
    DiffusionGenerator,
    PromptEmbeds,
    check_model_source,
    load_component,
    read_model_index,
)
from genalign.sampling import LogProbReduction

# model_index.json class names of the audio pipelines (family detection sends all three here; AudioLDM2 is
# then refused with its reason).
AUDIO_PIPELINES = frozenset({"AudioLDMPipeline", "MusicLDMPipeline", "AudioLDM2Pipeline"})


@dataclass
class AudioSamplingOptions:
    """How to sample audio: steps, CFG, stochasticity (`eta`), log-prob convention, and the clip length.

    `audio_length_in_s` None means the UNet's native length (its `sample_size` in latent frames); a length
    whose spectrogram is not a multiple of the VAE's downsampling is sampled longer and cut, as diffusers does.
    """

    num_inference_steps: int = 20
    guidance_scale: float = 2.5
    eta: float = 1.0
    log_prob_reduction: LogProbReduction = "sum"
    negative_prompt: str = ""
    audio_length_in_s: float | None = None
    expansion_guidance_scale: float = 0.0


@dataclass
class AudioDiffusionGenerator(DiffusionGenerator):
    """A latent text-to-audio diffusion model (AudioLDM or MusicLDM layout) as a stochastic policy.

    Outputs are waveforms [B, samples] at `sample_rate` Hz, float in [−1, 1].
    Only the UNet is trained; VAE, text encoder and vocoder stay frozen.
    """

    modality = "audio"

    vocoder: torch.nn.Module | None = None
    feature_extractor: object | None = None

    def __post_init__(self) -> None:
        if self.vocoder is None:
            raise ValueError("a text-to-audio model needs a vocoder (mel spectrogram → waveform)")
        super().__post_init__()
        self.vocoder.requires_grad_(False)
        self.vocoder.eval()
        bins = int(self.vocoder.config.model_in_dim)
        if bins % self.vae_scale_factor:
            raise ValueError(f"the vocoder's {bins} mel bins must be divisible by the VAE's downsampling factor "
                             f"{self.vae_scale_factor}")
        if getattr(self.denoiser.config, "class_embed_type", None) != "simple_projection":
            raise ValueError("an AudioLDM-style UNet takes the CLAP text embedding as its class embedding; set "
                             "class_embed_type='simple_projection' and projection_class_embeddings_input_dim")

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
    ) -> "AudioDiffusionGenerator":
        """Load an AudioLDM or MusicLDM diffusers folder or hub id (e.g. 'cvssp/audioldm-s-full-v2').

        Args:
            scheduler: "ddim" or "ddpm" replaces the stored scheduler with the same noise schedule (None: DDPM
                if stored, else DDIM), so every step has an exact Gaussian density.
        """
        source = str(path_or_id)
        check_model_source(source, "'cvssp/audioldm-s-full-v2'")
        kwargs = dict(revision=revision)
        if local_files_only is not None:
            kwargs["local_files_only"] = local_files_only
        try:
            index = read_model_index(source, **kwargs)
            pipeline = index.get("_class_name")
            if pipeline == "AudioLDM2Pipeline":
                raise ModelLoadError(
                    f"'{source}' is an AudioLDM2 pipeline, which this family does not cover: its GPT-2 'memory' "
                    "conditioning and two-cross-attention UNet differ from AudioLDM's class-embedding UNet. Use an "
                    "AudioLDM or MusicLDM checkpoint (e.g. 'cvssp/audioldm-s-full-v2', 'ucsd-reach/musicldm')"
                )
            missing = [name for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "vocoder")
                       if name not in index]
            if missing:
                raise ModelLoadError(f"'{source}' is not an AudioLDM/MusicLDM pipeline folder: model_index.json "
                                     f"({pipeline}) lacks {', '.join(missing)}")
            stored = index["scheduler"][1]
            chosen = scheduler or ("ddpm" if stored == "DDPMScheduler" else "ddim")
            if chosen not in _SCHEDULERS:
                raise ModelLoadError(f"scheduler must be 'ddim' or 'ddpm', got {chosen!r}")

            def load(name: str, with_dtype: bool = True):
                return load_component(source, index, name, torch_dtype if with_dtype else None, kwargs)

            has_extractor = index.get("feature_extractor", [None])[0] is not None
            generator = cls(
                denoiser=load("unet"),
                vae=load("vae"),
                text_encoder=load("text_encoder"),
                tokenizer=load("tokenizer", with_dtype=False),
                scheduler=_SCHEDULERS[chosen].from_pretrained(source, subfolder="scheduler", **kwargs),
                vocoder=load("vocoder"),
                feature_extractor=load("feature_extractor", with_dtype=False) if has_extractor else None,
                source=source,
            )
        except ModelLoadError:
            raise
        except (OSError, ValueError, KeyError, AttributeError) as error:
            raise ModelLoadError(
                f"could not load a text-to-audio model from '{source}': {error}\n"
                "Pass a local AudioLDM/MusicLDM diffusers folder (model_index.json, unet/, vae/, text_encoder/, "
                "tokenizer/, scheduler/, vocoder/) or a hub id that is in the local cache."
            ) from error
        return generator

    @classmethod
    def from_pipeline(cls, pipe) -> "AudioDiffusionGenerator":
        """Wrap an in-memory diffusers AudioLDM / MusicLDM pipeline, sharing its modules (no copies)."""
        return cls(
            denoiser=pipe.unet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            scheduler=pipe.scheduler,
            vocoder=pipe.vocoder,
            feature_extractor=getattr(pipe, "feature_extractor", None),
        )

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write a diffusers folder in the AudioLDMPipeline layout (MusicLDMPipeline when the text encoder is a
        whole ClapModel), which diffusers' own pipeline class loads too."""
        import diffusers

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        components = {
            "unet": self.denoiser,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "scheduler": self.scheduler,
            "vocoder": self.vocoder,
            "feature_extractor": self.feature_extractor,
        }
        pipeline = "MusicLDMPipeline" if self._is_musicldm else "AudioLDMPipeline"
        index: dict = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__}
        for name, component in components.items():
            if component is None:
                continue
            component.save_pretrained(path / name)
            index[name] = [type(component).__module__.split(".")[0], type(component).__name__]
        vocoder_class = type(self.vocoder)
        if vocoder_class.__module__.split(".")[0] == "genalign":
            # diffusers imports a component's class from the library named here; ours lives in a submodule.
            index["vocoder"] = [vocoder_class.__module__, vocoder_class.__name__]
        index[_MASK_FLAG] = False
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
        return path

    # ------------------------------------------------------------------ basics
    @property
    def sample_rate(self) -> int:
        """Samples per second of the waveforms this model outputs (the vocoder's rate)."""
        return int(self.vocoder.config.sampling_rate)

    @property
    def hop_length(self) -> int:
        """Waveform samples per spectrogram frame."""
        return int(math.prod(self.vocoder.config.upsample_rates))

    @property
    def _is_musicldm(self) -> bool:
        return hasattr(self.text_encoder, "get_text_features")

    def _modules(self) -> list[torch.nn.Module]:
        return super()._modules() + [self.vocoder]

    def set_attention_backend(self, backend: AttentionBackend) -> dict[str, str]:
        """As the image generator's, with the CLAP text tower as text encoder, plus the vocoder (a HiFi-GAN or
        Griffin-Lim, neither with attention layers: listed so that the report shows every module)."""
        return set_attention_backend({
            "denoiser": self.denoiser,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "reference_copy": self._reference_copy,
            "vocoder": self.vocoder,
        }, backend)

    def default_options(self) -> AudioSamplingOptions:
        return AudioSamplingOptions()

    def default_length_in_s(self) -> float:
        """The UNet's native clip length: sample_size latent frames."""
        return int(self.denoiser.config.sample_size) * self.vae_scale_factor * self.hop_length / self.sample_rate

    def num_samples(self, options: AudioSamplingOptions) -> int:
        """Waveform length in samples of clips sampled with `options`."""
        seconds = options.audio_length_in_s or self.default_length_in_s()
        return int(seconds * self.sample_rate)

    def output_size(self, options: AudioSamplingOptions) -> tuple[int, int]:
        """(frames, mel bins) of the spectrogram the VAE decodes: the asked length rounded up to a multiple of
        the VAE's downsampling (the waveform is cut back afterwards)."""
        seconds = options.audio_length_in_s or self.default_length_in_s()
        frames = int(seconds * self.sample_rate / self.hop_length)
        # The VAE downsamples frames; a Griffin-Lim vocoder's centred STFT needs more than half a window.
        window = int(getattr(self.vocoder.config, "n_fft", 0))
        fewest = max(self.vae_scale_factor, window // (2 * self.hop_length) + 1)
        if frames < fewest:
            shortest = fewest * self.hop_length / self.sample_rate
            raise ValueError(f"audio_length_in_s={seconds} is too short for this model: it makes {frames} "
                             f"spectrogram frames and the model needs at least {fewest}; "
                             f"ask for at least {shortest:.3g} s")
        frames = math.ceil(frames / self.vae_scale_factor) * self.vae_scale_factor
        return frames, int(self.vocoder.config.model_in_dim)

    # ------------------------------------------------------------------ text conditioning
    def encode_prompts(self, prompts: Sequence[str], height: int = 0, width: int = 0) -> PromptEmbeds:
        """CLAP text embeddings (see `clap_text_embeddings`); `embeds` are [B, D], not per-token states."""
        return PromptEmbeds(clap_text_embeddings(self.text_encoder, self.tokenizer, prompts).to(self.dtype))

    # ------------------------------------------------------------------ denoiser and decoding
    def _call_denoiser(self, latents: torch.Tensor, timesteps: torch.Tensor, text: PromptEmbeds,
                       control: torch.Tensor | None = None, control_scale: float = 1.0) -> torch.Tensor:
        if control is not None:
            raise ValueError("audio models take no control images (ControlNets here are for image models)")
        return self._denoiser_forward()(
            latents, timesteps, encoder_hidden_states=None, class_labels=text.embeds, return_dict=False
        )[0]

    def decode_mel(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] → log-mel spectrograms [B, frames, mel bins] (differentiable)."""
        mel = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype), return_dict=False)[0]
        return mel.squeeze(1)

    def decode(self, latents: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        """Latents [B, C, h, w] → float32 waveforms [B, samples] (cut to `num_samples` when given)."""
        waveform = self.vocoder(self.decode_mel(latents).to(self.vocoder.dtype))
        return waveform.float()[:, :num_samples]

    def outputs_from_latents(self, latents: torch.Tensor, options: AudioSamplingOptions) -> torch.Tensor:
        """Waveforms [B, samples] clamped to [−1, 1], the protocol's audio range (a vocoder's overshoot is
        clipping in any file or player anyway); diffusers returns the raw vocoder output, equal when in range."""
        return self.decode(latents, self.num_samples(options)).clamp(-1.0, 1.0)


@torch.no_grad()
def clap_text_embeddings(text_encoder: torch.nn.Module, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """[B, D] CLAP text embeddings of `prompts` as diffusers' pipelines compute them: AudioLDM's
    ClapTextModelWithProjection L2-normalised, MusicLDM's whole ClapModel through `get_text_features`."""
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    device = next(text_encoder.parameters()).device
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    if hasattr(text_encoder, "get_text_features"):
        output = text_encoder.get_text_features(ids, attention_mask=mask)
        return output if isinstance(output, torch.Tensor) else output.pooler_output
    return F.normalize(text_encoder(ids, attention_mask=mask).text_embeds, dim=-1)
