"""Audio rewards: CLAP text–audio similarity.

Waveforms arrive as float tensors ``[B, T]`` or ``[B, C, T]`` in [-1, 1]
(checked by :class:`rewards.base.Reward`) at a sampling rate the user states.
The CLAP feature pipeline (resampling, padding/cropping, STFT, mel filter
bank, dB) is re-implemented in torch so that the reward is differentiable with
respect to the waveform; transformers' ``ClapFeatureExtractor`` works in
numpy and would cut the graph.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import Reward, RewardError, register_reward

__all__ = ["DEFAULT_CLAP_CHECKPOINT", "ClapLogMel", "ClapScore", "resample"]

DEFAULT_CLAP_CHECKPOINT = "laion/clap-htsat-unfused"

# Generated audio may overshoot [-1, 1] a little (vocoders without a final
# tanh); only reject values that are clearly on another scale (int16 PCM, ...).
_MAX_ABS_AMPLITUDE = 1.5

# The padding patterns ClapFeatureExtractor implements for short clips.
_PADDING_MODES = ("repeatpad", "repeat", "pad")

# HF's power_to_db / mel_floor default: clip the mel power at -100 dB.
_MEL_FLOOR = 1e-10

# Nearly coprime rates (e.g. 44101 -> 48000 Hz) would need a polyphase kernel
# with billions of taps; 2**22 float64 taps (32 MB) covers every common pair.
_MAX_KERNEL_TAPS = 2**22


# ------------------------------------------------------------- resampling


@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, zero_crossings: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc low-pass kernel for ``orig -> new`` (both reduced by their gcd).

    Time is measured in blocks: one block holds ``orig`` input and ``new``
    output samples, so input ``m * orig + i`` sits at ``m + i / orig`` and
    output ``m * new + j`` at ``m + j / new``.

    Returns:
        ``([new, 1, orig + 2 * pad] float64 kernel, pad)``; row ``j`` produces
        output phase ``j`` from inputs ``m * orig - pad ... m * orig + orig + pad - 1``.
    """
    # The cut-off sits just below the lower of the two Nyquist rates.
    base = min(orig, new) * rolloff
    pad = math.ceil(zero_crossings * orig / base)
    taps = torch.arange(-pad, orig + pad, dtype=torch.float64) / orig  # input times within a block
    phases = torch.arange(new, dtype=torch.float64)[:, None] / new  # output times within a block
    tau = phases - taps[None, :]  # [new, orig + 2 * pad]
    # Hann taper over +-zero_crossings lobes of the sinc.
    scaled = (tau * base / zero_crossings).clamp(-1.0, 1.0)
    window = torch.cos(scaled * math.pi / 2) ** 2
    # base / orig makes the DC gain 1: the input has `orig` samples per block.
    kernel = torch.sinc(tau * base) * window * (base / orig)
    return kernel[:, None, :], pad


def resample(
    waveform: torch.Tensor,
    orig_sr: int,
    new_sr: int,
    zero_crossings: int = 16,
    rolloff: float = 0.945,
) -> torch.Tensor:
    """Band-limited resampling with a windowed-sinc filter, differentiable in torch.

    Args:
        waveform: ``[..., T]`` float.
        orig_sr: sampling rate of ``waveform`` in Hz.
        new_sr: target sampling rate in Hz.
        zero_crossings: sinc lobes on each side of the filter (quality vs cost).
        rolloff: cut-off as a fraction of the lower Nyquist rate (anti-aliasing margin).

    Returns:
        ``[..., ceil(T * new_sr / orig_sr)]`` with ``waveform``'s dtype and device.

    Raises:
        ValueError: the rates share too small a common divisor for a polyphase kernel.
    """
    if orig_sr == new_sr:
        return waveform
    gcd = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // gcd, int(new_sr) // gcd
    taps = new * (orig + 2 * math.ceil(zero_crossings * orig / (min(orig, new) * rolloff)))
    if taps > _MAX_KERNEL_TAPS:
        raise ValueError(
            f"resampling {orig_sr} -> {new_sr} Hz needs a {taps}-tap polyphase kernel (the rates' "
            f"greatest common divisor is only {gcd}); resample to a standard rate first"
        )
    kernel, pad = _sinc_kernel(orig, new, zero_crossings, rolloff)
    kernel = kernel.to(device=waveform.device, dtype=waveform.dtype)
    lead, length = waveform.shape[:-1], waveform.shape[-1]
    flat = waveform.reshape(-1, 1, length)
    # Zero-pad so that every output up to the last full block has all its taps.
    flat = F.pad(flat, (pad, pad + orig))
    phases = F.conv1d(flat, kernel, stride=orig)  # [N, new, blocks]
    out = phases.transpose(1, 2).reshape(flat.shape[0], -1)  # interleave the phases
    out_length = math.ceil(length * new / orig)
    return out[:, :out_length].reshape(*lead, out_length)


# ------------------------------------------------------------ features


class ClapLogMel(torch.nn.Module):
    """Torch re-implementation of ``ClapFeatureExtractor`` (differentiable, deterministic).

    Follows the extractor step by step: clips shorter than ``max_length_s``
    are padded with its ``padding`` pattern; a centred Hann-window STFT
    (reflect padding) gives the power spectrum; the extractor's own mel filter
    bank (Slaney for ``rand_trunc``, HTK for ``fusion``) is applied; power is
    converted to dB with a -100 dB floor.

    Two deliberate differences, both for a reward that must not be random:
    longer clips are centre-cropped (``rand_trunc``) or cropped at the middle
    of each third (``fusion``) instead of at random offsets, and short clips
    for fusion models get ``is_longer = False`` (the extractor marks one random
    clip of such a batch as longer).
    """

    def __init__(self, extractor: Any, fusion: bool) -> None:
        """
        Args:
            extractor: a loaded ``transformers.ClapFeatureExtractor``; only its
                settings and filter banks are used.
            fusion: match a model with ``audio_config.enable_fusion`` (4-channel
                input and ``is_longer``); otherwise 1-channel ``rand_trunc`` input.
        """
        super().__init__()
        self.fusion = bool(fusion)
        self.n_fft = int(extractor.fft_window_size)
        self.hop_length = int(extractor.hop_length)
        self.max_samples = int(extractor.nb_max_samples)
        self.padding = str(extractor.padding)
        if self.padding not in _PADDING_MODES:
            raise RewardError(
                f"ClapFeatureExtractor has padding={self.padding!r}; clap_score supports "
                f"{list(_PADDING_MODES)} — fix `padding` in the checkpoint's preprocessor_config.json"
            )
        # The extractor pairs HTK filters with fusion and Slaney ones with rand_trunc.
        filters = extractor.mel_filters if self.fusion else extractor.mel_filters_slaney
        self.register_buffer(
            "mel_filters", torch.as_tensor(np.asarray(filters), dtype=torch.float32), persistent=False
        )  # [n_fft // 2 + 1, n_mels]
        self.register_buffer("window", torch.hann_window(self.n_fft, periodic=True), persistent=False)

    @property
    def n_mels(self) -> int:
        """Number of mel bins (the extractor's ``feature_size``)."""
        return int(self.mel_filters.shape[1])

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """Log-mel spectrogram in dB.

        Args:
            waveform: ``[B, N]`` float at the extractor's sampling rate.

        Returns:
            ``[B, 1 + N // hop_length, n_mels]`` (time first, as the extractor returns it).
        """
        spec = torch.stft(
            waveform,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=self.window.to(waveform.dtype),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )  # [B, n_fft // 2 + 1, frames]
        # real^2 + imag^2 rather than abs()**2: abs has a NaN gradient at 0.
        power = spec.real.square() + spec.imag.square()
        mel = torch.einsum("fm,bft->btm", self.mel_filters.to(power.dtype), power)
        return 10.0 * torch.log10(mel.clamp_min(_MEL_FLOOR))

    def _pad(self, waveform: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` with ``T < max_samples`` -> ``[B, max_samples]``, as the extractor pads."""
        length = waveform.shape[-1]
        repeats = self.max_samples // length
        if self.padding == "repeat":
            return waveform.repeat(1, repeats + 1)[:, : self.max_samples]
        if self.padding == "repeatpad":
            waveform = waveform.repeat(1, repeats)
        return F.pad(waveform, (0, self.max_samples - waveform.shape[-1]))

    def _fusion_of_long(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fusion input for clips longer than ``max_samples``: ``[B, 4, chunk, n_mels]``, ``[B, 1]``."""
        mel = self.log_mel(waveform)  # [B, total, n_mels]
        batch, total = mel.shape[:2]
        chunk = self.max_samples // self.hop_length + 1
        if chunk == total:
            # Longer than max_samples by less than a hop: the extractor uses it whole.
            return mel[:, None].expand(-1, 4, -1, -1), torch.zeros(batch, 1, dtype=torch.bool, device=mel.device)
        thirds = [part.tolist() or [0] for part in np.array_split(np.arange(total - chunk + 1), 3)]
        crops = [mel[:, third[len(third) // 2] : third[len(third) // 2] + chunk] for third in thirds]
        overview = F.interpolate(mel[:, None], size=(chunk, self.n_mels), mode="bilinear", align_corners=False)[:, 0]
        features = torch.stack([overview, *crops], dim=1)
        return features, torch.ones(batch, 1, dtype=torch.bool, device=mel.device)

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLAP audio-model inputs for mono clips at the extractor's sampling rate.

        Args:
            waveform: ``[B, T]`` float.

        Returns:
            ``input_features`` ``[B, C, frames, n_mels]`` with ``C = 4`` for
            fusion models and 1 otherwise, ``frames = max_samples // hop_length + 1``;
            ``is_longer`` ``[B, 1]`` bool.
        """
        length = waveform.shape[-1]
        if length > self.max_samples and self.fusion:
            return self._fusion_of_long(waveform)
        if length > self.max_samples:
            start = (length - self.max_samples) // 2
            waveform = waveform[:, start : start + self.max_samples]
        elif length < self.max_samples:
            waveform = self._pad(waveform)
        mel = self.log_mel(waveform)[:, None]
        if self.fusion:
            mel = mel.expand(-1, 4, -1, -1)
        return mel, torch.zeros(mel.shape[0], 1, dtype=torch.bool, device=mel.device)


# --------------------------------------------------------------- loading


def _looks_like_path(name: str) -> bool:
    """True for strings that can only be a local folder, never a hub id ("org/name")."""
    return (
        name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).expanduser().exists()
    )


def _load_clap(checkpoint: str) -> tuple[Any, Any]:
    """Load ``(ClapModel, ClapProcessor)`` from a hub id, a folder or a laion-clap ``.pt`` file.

    A ``.pt`` file is converted once by :func:`rewards.laion_clap.converted_folder`
    into ``<name>.transformers/`` beside it (or a folder under the temp dir when
    that is not writable) and loaded from there. Raises one helpful RewardError.
    """
    if checkpoint.lower().endswith(".pt"):
        from .laion_clap import LaionClapError, converted_folder

        try:
            checkpoint = str(converted_folder(checkpoint))
        except LaionClapError as exc:
            raise RewardError(f"reward 'clap_score' cannot use the laion-clap checkpoint {checkpoint!r}: {exc}") from exc
    how = (
        f"pass model='/path/to/folder' holding a transformers CLAP checkpoint (config.json, "
        f"model.safetensors, preprocessor_config.json and tokenizer files); make one on a machine "
        f"with network access with `hf download {DEFAULT_CLAP_CHECKPOINT} --local-dir FOLDER`, or "
        f"ClapModel.from_pretrained(id).save_pretrained(FOLDER) and the same for ClapProcessor"
    )
    if _looks_like_path(checkpoint) and not Path(checkpoint).expanduser().is_dir():
        raise RewardError(f"reward 'clap_score': CLAP checkpoint folder {checkpoint!r} does not exist; {how}")
    from transformers import ClapModel, ClapProcessor

    source = str(Path(checkpoint).expanduser()) if _looks_like_path(checkpoint) else checkpoint
    try:
        processor = ClapProcessor.from_pretrained(source)
        model = ClapModel.from_pretrained(source)
    # The hub client, the file system and the config parsers raise many unrelated
    # exception types; whichever it is, the user needs the same advice.
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no details"
        raise RewardError(
            f"reward 'clap_score' could not load the CLAP checkpoint {checkpoint!r} "
            f"({type(exc).__name__}: {detail}); offline machines cannot download hub ids — {how}"
        ) from exc
    return model, processor


def _pooled(output: Any) -> torch.Tensor:
    """Projected embeddings from ``get_*_features``: a tensor in transformers 4, pooler_output in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ---------------------------------------------------------------- reward


@register_reward("clap_score")
class ClapScore(Reward):
    """Cosine similarity between CLAP embeddings of each clip and its text prompt.

    ``score = cos(audio_embedding(waveform_b), text_embedding(prompt_b))`` in
    [-1, 1], using transformers' ``ClapModel`` and ``ClapProcessor``. Waveforms
    are down-mixed to mono, resampled to the feature extractor's rate (48 kHz
    for LAION CLAP) and turned into features by :class:`ClapLogMel`, so
    gradients flow back to the waveform. Models with
    ``audio_config.enable_fusion`` get fusion features, others ``rand_trunc``
    ones (feeding a non-fusion model the extractor's default fusion features
    fails with a channel mismatch).

    Example::

        reward = ClapScore(sampling_rate=16_000)     # laion/clap-htsat-unfused
        reward(waveforms, ["a dog barking"] * B).rewards   # [B]
        ClapScore("ckpts/630k-audioset-best.pt", sampling_rate=16_000)   # laion-clap file
    """

    modality = "audio"
    kind = "instance"
    # ClapLogMel matches ClapFeatureExtractor to < 1e-4 dB in bins above -40 dB
    # and to 1e-3 relative everywhere (tests/test_audio_text_rewards.py).
    differentiable = True

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_CLAP_CHECKPOINT,
        sampling_rate: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        """
        Args:
            model: hub id or local folder of a transformers CLAP checkpoint
                (model and processor files together), or a laion-clap ``.pt``
                file (``630k-audioset-best.pt``, ...), converted on first use into
                ``<name>.transformers/`` beside it (a temp folder if that is not
                writable; see :mod:`rewards.laion_clap`). The ``.pt`` files hold
                no tokenizer: put RoBERTa tokenizer files (roberta-base's) in a
                ``tokenizer/`` folder beside the checkpoint, or have roberta-base
                in the local Hugging Face cache.
            sampling_rate: required; rate in Hz of the waveforms you will score
                (e.g. 16000 for AudioLDM). They are resampled to the model's rate.
            device: where the CLAP model runs; None keeps it on the CPU.
                Rewards are returned on the waveforms' device.
        """
        super().__init__()
        if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int) or sampling_rate <= 0:
            raise RewardError(
                f"reward 'clap_score' needs sampling_rate= the rate in Hz of the waveforms you will "
                f"score (e.g. 16000 for AudioLDM, 48000 for LAION CLAP's own rate); got {sampling_rate!r}"
            )
        self.checkpoint = str(model)
        clap, processor = _load_clap(self.checkpoint)
        extractor, audio_config = processor.feature_extractor, clap.config.audio_config
        if int(extractor.feature_size) != int(audio_config.num_mel_bins):
            raise RewardError(
                f"reward 'clap_score': checkpoint {self.checkpoint!r} has a feature extractor with "
                f"{extractor.feature_size} mel bins but an audio model expecting "
                f"{audio_config.num_mel_bins}; fix feature_size in preprocessor_config.json"
            )
        self.sampling_rate = sampling_rate
        self.model_sampling_rate = int(extractor.sampling_rate)
        try:
            resample(torch.zeros(1, 1), sampling_rate, self.model_sampling_rate)
        except ValueError as exc:
            raise RewardError(f"reward 'clap_score' cannot use sampling_rate={sampling_rate}: {exc}") from None
        self.tokenizer = processor.tokenizer
        self.features = ClapLogMel(extractor, fusion=bool(audio_config.enable_fusion))
        self.model = clap.eval().requires_grad_(False)
        if device is not None:
            self.to(device)

    @property
    def device(self) -> torch.device:
        """Device of the CLAP model."""
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> ClapScore:
        """Keep CLAP in eval mode whatever the caller asks.

        The audio encoder has BatchNorm: train mode would score with batch
        statistics and overwrite the running ones during reward-gradient steps.
        """
        super().train(mode)
        self.model.eval()
        return self

    def embed_audio(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Unit-norm CLAP audio embeddings.

        Args:
            waveforms: ``[B, T]`` or ``[B, C, T]`` float at ``self.sampling_rate``.

        Returns:
            ``[B, D]`` on the model's device (differentiable w.r.t. ``waveforms``).
        """
        audio = waveforms.to(device=self.device, dtype=torch.float32)
        if audio.ndim == 3:
            audio = audio.mean(dim=1)  # CLAP is mono: down-mix the channels
        audio = resample(audio, self.sampling_rate, self.model_sampling_rate)
        # Features stay float32 (dB of half-precision power is coarse); the
        # model may run in half precision.
        features, is_longer = self.features(audio)
        output = self.model.get_audio_features(input_features=features.to(self.model.dtype), is_longer=is_longer)
        return F.normalize(_pooled(output), dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm CLAP text embeddings.

        Args:
            texts: ``B`` strings.

        Returns:
            ``[B, D]`` on the model's device.
        """
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        output = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        return F.normalize(_pooled(output), dim=-1)

    def validate_outputs(self, outputs: Any) -> int:
        """Base audio checks plus finite values on the [-1, 1] scale."""
        batch = super().validate_outputs(outputs)
        if outputs.shape[-1] == 0:
            raise RewardError(f"reward '{self.name}' got clips with 0 samples; score non-empty waveforms")
        with torch.no_grad():
            if not bool(torch.isfinite(outputs).all()):
                raise RewardError(
                    f"reward '{self.name}' got NaN/inf audio samples; the generator or vocoder "
                    f"produced invalid values"
                )
            peak = float(outputs.detach().abs().max())
        if peak > _MAX_ABS_AMPLITUDE:
            raise RewardError(
                f"reward '{self.name}' expects waveforms in [-1, 1]; got a peak of {peak:.4g} — "
                f"int16 PCM needs / 32768, otherwise peak-normalise or clamp(-1, 1)"
            )
        return batch

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        """``[B, T]`` or ``[B, C, T]`` waveforms + ``B`` prompts -> ``[B]`` cosine similarity."""
        if conditions is None or not all(isinstance(c, str) for c in conditions):
            got = "no prompts" if conditions is None else f"{[type(c).__name__ for c in conditions]}"
            raise RewardError(
                f"reward '{self.name}' compares each clip with its text prompt; pass one prompt "
                f"string per clip as conditions, e.g. reward(waveforms, prompts); got {got}"
            )
        audio = self.embed_audio(outputs)
        text = self.embed_texts(conditions)
        return (audio * text).sum(dim=-1).to(outputs.device)

    def extra_repr(self) -> str:
        return (
            f"checkpoint={self.checkpoint!r}, sampling_rate={self.sampling_rate}, "
            f"model_sampling_rate={self.model_sampling_rate}, " + super().extra_repr()
        )
