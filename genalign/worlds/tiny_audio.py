"""Tiny random-initialised text-to-audio models with diffusers' AudioLDM and MusicLDM layouts.

They prove offline every path that loads a real AudioLDM checkpoint: the components are the real classes
(UNet2DConditionModel with a CLAP class embedding, AutoencoderKL over log-mels, ClapTextModelWithProjection or
ClapModel, RobertaTokenizerFast, SpeechT5HifiGan or our GriffinLimVocoder), only tiny. Weights are random;
the UNet and decoder are calibrated so sampled clips have sane levels.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal, Sequence

import torch
from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import (
    ClapConfig,
    ClapModel,
    ClapTextConfig,
    ClapTextModelWithProjection,
    RobertaTokenizerFast,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
)

from genalign.generators.griffin_lim import GriffinLimVocoder

AudioLayout = Literal["audioldm", "musicldm"]
VocoderKind = Literal["griffin_lim", "hifigan"]
# Words the tiny tokenizer is trained on (anything else is spelt from bytes).
_CORPUS = ("a loud fast flute melody", "a quiet slow plucked tune", "rising falling arch low high middle register",
           "brass clarinet organ piano drum beat", "music sound noise")


def byte_level_tokenizer(corpus: Sequence[str] = _CORPUS, model_max_length: int = 16,
                         vocab_size: int = 300) -> RobertaTokenizerFast:
    """A RoBERTa-style byte-level BPE tokenizer (CLAP's tokenizer class) trained offline on `corpus`."""
    from tokenizers import ByteLevelBPETokenizer

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(corpus), vocab_size=vocab_size, min_frequency=1, special_tokens=special)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        return RobertaTokenizerFast(
            vocab_file=os.path.join(tmp, "vocab.json"),
            merges_file=os.path.join(tmp, "merges.txt"),
            model_max_length=model_max_length,
        )


def tiny_clap_text_config(tokenizer: RobertaTokenizerFast, hidden: int = 32, projection: int = 16) -> ClapTextConfig:
    return ClapTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=tokenizer.model_max_length + 2,
        projection_dim=projection,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def audio_unet(latent_frames: int, latent_bins: int, projection_dim: int, widths: Sequence[int] = (16, 32),
               attention: bool = True, latent_channels: int = 4) -> UNet2DConditionModel:
    """A UNet in AudioLDM's layout: the CLAP embedding is a projected class embedding concatenated to the time
    embedding. With `attention`, every level below the first (and the middle) has transformer blocks, as in
    AudioLDM; their "cross"-attention attends to the block itself, since the pipeline passes no text states, so
    each block's cross_attention_dim equals its width."""
    down = ["DownBlock2D"] + ["CrossAttnDownBlock2D" if attention else "DownBlock2D"] * (len(widths) - 1)
    up = ["CrossAttnUpBlock2D" if attention else "UpBlock2D"] * (len(widths) - 1) + ["UpBlock2D"]
    return UNet2DConditionModel(
        sample_size=latent_frames,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DCrossAttn" if attention else None,
        block_out_channels=tuple(widths),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=tuple(widths),
        attention_head_dim=8,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=projection_dim,
        class_embeddings_concat=True,
    )


def mel_vae(widths: Sequence[int] = (16, 32), latent_channels: int = 4) -> AutoencoderKL:
    """An AutoencoderKL over one-channel log-mels [B, 1, frames, bins], downsampling 2^(len(widths) − 1)."""
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=tuple(widths),
        latent_channels=latent_channels,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
    )


def audioldm_scheduler() -> DDIMScheduler:
    """AudioLDM's noise schedule (scaled linear 0.0015 → 0.0195, 1000 steps) as DDIM."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_vocoder(kind: VocoderKind, bins: int, sample_rate: int, hop: int) -> torch.nn.Module:
    if kind == "griffin_lim":
        return GriffinLimVocoder(sampling_rate=sample_rate, model_in_dim=bins, n_fft=4 * hop, hop_length=hop,
                                 f_max=sample_rate / 2, n_iter=8)
    rates = [hop // 4, 4] if hop % 4 == 0 and hop > 4 else [hop]
    config = SpeechT5HifiGanConfig(model_in_dim=bins, sampling_rate=sample_rate, upsample_initial_channel=16,
                                   upsample_rates=rates, upsample_kernel_sizes=[2 * r for r in rates],
                                   resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], normalize_before=False)
    return SpeechT5HifiGan(config)


def build_tiny_text_to_audio(
    layout: AudioLayout = "audioldm",
    vocoder: VocoderKind = "griffin_lim",
    *,
    seed: int = 0,
    sample_rate: int = 8_000,
    hop: int = 80,
    bins: int = 16,
    latent_frames: int = 8,
    attention: bool = True,
):
    """A tiny AudioLDM (or MusicLDM) pipeline: 0.5 s clips at 8 kHz by default. Returns the diffusers pipeline
    (`AudioLDMPipeline`, or `MusicLDMPipeline` for that layout)."""
    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    text_config = tiny_clap_text_config(tokenizer)
    if layout == "audioldm":
        text_encoder = ClapTextModelWithProjection(text_config)
    else:
        audio = dict(spec_size=32, patch_size=4, patch_stride=(4, 4), num_mel_bins=bins, patch_embeds_hidden_size=8,
                     depths=[1, 1], num_attention_heads=[2, 2], window_size=4, hidden_size=16,
                     projection_dim=text_config.projection_dim)
        text_encoder = ClapModel(ClapConfig(text_config=text_config.to_dict(), audio_config=audio,
                                            projection_dim=text_config.projection_dim))
    text_encoder.eval()
    vae = mel_vae()
    unet = audio_unet(latent_frames, bins // 4, text_config.projection_dim, attention=attention)
    _calibrate(unet, vae, latent_frames, bins // 4, text_config.projection_dim)
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=audioldm_scheduler(),
                 vocoder=tiny_vocoder(vocoder, bins, sample_rate, hop))
    if layout == "audioldm":
        return AudioLDMPipeline(**parts)
    from diffusers import MusicLDMPipeline

    return MusicLDMPipeline(**parts, feature_extractor=None)


@torch.no_grad()
def _calibrate(unet: UNet2DConditionModel, vae: AutoencoderKL, frames: int, bins: int, projection: int) -> None:
    """Unit-variance noise predictions (as a trained UNet makes) and log-mels around −4 ± 1 (quiet sound)."""
    x = torch.randn(4, unet.config.in_channels, frames, bins)
    out = unet(x, torch.full((4,), 500), encoder_hidden_states=None, class_labels=torch.randn(4, projection)).sample
    unet.conv_out.weight.div_(out.std())
    unet.conv_out.bias.zero_()
    vae.register_to_config(scaling_factor=1.0)
    mel = vae.decode(torch.randn(4, vae.config.latent_channels, frames, bins)).sample
    vae.decoder.conv_out.weight.mul_(1.0 / mel.std())
    vae.decoder.conv_out.bias.fill_(-4.0)


def save_tiny_text_to_audio(path: str | os.PathLike, layout: AudioLayout = "audioldm", **kwargs) -> Path:
    """Write a tiny text-to-audio model as a diffusers folder (the pipeline's own save_pretrained)."""
    pipe = build_tiny_text_to_audio(layout, **kwargs)
    pipe.save_pretrained(path)
    return Path(path)
