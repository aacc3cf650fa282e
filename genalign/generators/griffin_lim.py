"""A Griffin-Lim vocoder with the interface of transformers' `SpeechT5HifiGan`, and its log-mel front end.

Latent audio diffusion models (AudioLDM, MusicLDM) generate a log-mel spectrogram and hand it to a neural
vocoder. A trained HiFi-GAN is the real thing; for the offline tones world a Griffin-Lim vocoder needs no
training and keeps pitch, tempo and timbre recognisable. It is a diffusers `ModelMixin`, so it saves and loads
like any component (`vocoder/config.json`), and diffusers' own `AudioLDMPipeline` runs with it: the pipeline
reads only `config.model_in_dim`, `config.sampling_rate` and `config.upsample_rates` (the hop, as one
"upsampling" factor) and calls the module on [B, frames, mel bins].

The mel convention is AudioLDM's: magnitude STFT (Hann window, centred), Slaney mel filter bank, natural log
of the magnitude clamped at 1e-5. `log_mel` is the forward transform, so world builders compute training
spectrograms with the same parameters the vocoder inverts. Every operation is differentiable (stft/istft,
the filter bank's pseudo-inverse, a fixed number of iterations), so reward gradients reach the latents.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from transformers.audio_utils import mel_filter_bank

# AudioLDM's floor on the mel magnitude before the log.
LOG_MEL_FLOOR = 1e-5
# The initial phase is one fixed draw, shared by every clip, so a clip's waveform does not depend on its batch.
_PHASE_SEED = 0


class GriffinLimVocoder(ModelMixin, ConfigMixin):
    """Log-mel [B, frames, n_mels] → waveform [B, frames·hop] by fast Griffin-Lim (Perraudin et al., 2013).

    The linear magnitude is recovered with the filter bank's pseudo-inverse (clamped at 0), then `n_iter`
    alternating projections between consistent spectrograms and the target magnitude, with `momentum`.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        sampling_rate: int = 16_000,
        model_in_dim: int = 64,
        n_fft: int = 1024,
        hop_length: int = 160,
        f_min: float = 0.0,
        f_max: float = 8_000.0,
        n_iter: int = 32,
        momentum: float = 0.99,
        upsample_rates: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if upsample_rates is not None and math.prod(upsample_rates) != hop_length:
            raise ValueError(f"upsample_rates {upsample_rates} must multiply to hop_length={hop_length}")
        # Read by diffusers' AudioLDMPipeline to convert seconds to spectrogram frames.
        self.register_to_config(upsample_rates=[hop_length])
        filters = mel_filter_bank(
            num_frequency_bins=n_fft // 2 + 1,
            num_mel_filters=model_in_dim,
            min_frequency=f_min,
            max_frequency=f_max,
            sampling_rate=sampling_rate,
            norm="slaney",
            mel_scale="slaney",
        )  # [n_freq, n_mels]
        mel = torch.from_numpy(np.ascontiguousarray(filters.T)).float()
        # Saved (ModelMixin checkpoints need a weights file), though the config alone determines it.
        self.register_buffer("mel_basis", mel)  # [n_mels, n_freq]
        self.register_buffer("inverse_basis", torch.linalg.pinv(mel.double()).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def _stft(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.stft(
            waveform,
            self.config.n_fft,
            hop_length=self.config.hop_length,
            window=self.window.to(waveform.dtype),
            center=True,
            return_complex=True,
        )

    def log_mel(self, waveform: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """Waveforms [B, samples] → log-mel [B, frames, n_mels] (`frames` defaults to samples // hop, the
        count the vocoder turns back into exactly `samples` samples)."""
        squeeze = waveform.ndim == 1
        waveform = waveform.reshape(1, -1) if squeeze else waveform
        frames = frames or waveform.shape[-1] // self.config.hop_length
        magnitude = self._stft(waveform.float()).abs()[..., :frames]  # [B, n_freq, frames]
        mel = torch.matmul(self.mel_basis, magnitude).clamp_min(LOG_MEL_FLOOR).log().transpose(1, 2)
        return mel[0] if squeeze else mel

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """Log-mel [B, frames, n_mels] (or [frames, n_mels]) → waveform [B, frames·hop] (or [frames·hop])."""
        if spectrogram.shape[-1] != self.config.model_in_dim:
            raise ValueError(
                f"the vocoder expects {self.config.model_in_dim} mel bins in the last dimension, got a spectrogram "
                f"of shape {tuple(spectrogram.shape)}; pass [batch, frames, {self.config.model_in_dim}]"
            )
        squeeze = spectrogram.ndim == 2
        log_mel = spectrogram.unsqueeze(0) if squeeze else spectrogram
        frames = log_mel.shape[1]
        length = frames * self.config.hop_length
        dtype = torch.float32
        magnitude = torch.matmul(log_mel.to(dtype).exp(), self.inverse_basis.T).clamp_min(0).transpose(1, 2)
        generator = torch.Generator(device="cpu").manual_seed(_PHASE_SEED)
        phase = torch.rand(magnitude.shape[1:], generator=generator, dtype=dtype).to(magnitude.device)
        angles = torch.polar(torch.ones_like(phase), 2 * math.pi * phase)  # [n_freq, frames], shared by clips
        previous = torch.zeros_like(magnitude, dtype=torch.complex64)
        for _ in range(self.config.n_iter):
            waveform = self._istft(magnitude * angles, length)
            rebuilt = self._stft(waveform)[..., :frames]
            accelerated = rebuilt - (self.config.momentum / (1 + self.config.momentum)) * previous
            angles = accelerated / accelerated.abs().clamp_min(1e-16)
            previous = rebuilt
        waveform = self._istft(magnitude * angles, length)
        return waveform[0] if squeeze else waveform

    def _istft(self, spectrum: torch.Tensor, length: int) -> torch.Tensor:
        # istft wants the centred frame count (length // hop + 1); the last frame is rebuilt from silence.
        missing = length // self.config.hop_length + 1 - spectrum.shape[-1]
        if missing > 0:
            spectrum = torch.nn.functional.pad(spectrum, (0, missing))
        return torch.istft(
            spectrum,
            self.config.n_fft,
            hop_length=self.config.hop_length,
            window=self.window,
            center=True,
            length=length,
        )
