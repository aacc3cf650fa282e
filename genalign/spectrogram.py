"""Spectrograms of audio samples as images, for galleries (one per clip, beside its player).

The level scale is absolute, in dB relative to full scale (dBFS: a full-scale sine is 0 dB), and the colour
range is fixed (−100…0 dBFS by default) rather than stretched per clip, so that the spectrograms of the
before and after samples of one prompt can be compared by eye: a quieter clip looks darker.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

__all__ = ["hz_to_mel", "mel_to_hz", "mel_filter_bank", "log_spectrogram", "spectrogram_image"]

# A colour map whose lightness rises monotonically, so brighter always means louder (also in greyscale).
_CMAP = "magma"


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: ``2595 * log10(1 + f / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of `hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filter_bank(n_fft: int, sample_rate: int, n_mels: int) -> tuple[torch.Tensor, np.ndarray]:
    """Triangular mel filters from 0 Hz to the Nyquist rate.

    Returns:
        ``(weights [n_mels, n_fft // 2 + 1] float32, centres [n_mels] Hz)``. Each triangle peaks at 1 at its
        centre (no area normalisation), so a tone at a band's centre keeps its level in dBFS.
    """
    bins = np.arange(n_fft // 2 + 1) * sample_rate / n_fft  # [F] Hz
    points = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))  # [n_mels + 2]
    lower, centre, upper = points[:-2, None], points[1:-1, None], points[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    weights = np.clip(np.minimum(rising, falling), 0.0, None)  # [n_mels, F]
    # Low bands narrower than an FFT bin would catch no bin and show as a black stripe: give such a band the
    # bin nearest its centre instead.
    for band in np.flatnonzero(weights.sum(axis=1) == 0):
        weights[band, int(np.argmin(np.abs(bins - centre[band, 0])))] = 1.0
    return torch.from_numpy(weights.astype(np.float32)), points[1:-1]


def log_spectrogram(
    waveform: torch.Tensor,
    sample_rate: int,
    *,
    n_fft: int = 1024,
    hop: int = 160,
    n_mels: int | None = 64,
    floor_db: float = -100.0,
) -> tuple[torch.Tensor, np.ndarray]:
    """Log-power spectrogram in dBFS.

    Args:
        waveform: ``[samples]`` float in [-1, 1] (NaNs count as silence).
        sample_rate: in Hz.
        n_fft: STFT window length (Hann) in samples.
        hop: samples between frames.
        n_mels: mel bands; None for the linear-frequency STFT bins.
        floor_db: the level of silence; powers below it are raised to it, so that silence is finite.

    Returns:
        ``(dB [bands, frames] float32, band centre frequencies [bands] in Hz)``, bands from low to high,
        frames ``1 + samples // hop`` (frames are centred on multiples of ``hop``).
    """
    if not isinstance(waveform, torch.Tensor) or waveform.ndim != 1:
        shape = tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform).__name__
        raise ValueError(f"expected a mono waveform [samples], got {shape}")
    if waveform.numel() == 0:
        raise ValueError("the waveform is empty (0 samples); there is nothing to draw")
    if n_fft < 2 or hop < 1 or (n_mels is not None and n_mels < 1):
        raise ValueError(f"need n_fft >= 2, hop >= 1 and n_mels >= 1 or None; got {n_fft}, {hop}, {n_mels}")
    x = torch.nan_to_num(waveform.detach().to("cpu", torch.float64), nan=0.0)
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    # Zero padding (not reflect) at the ends: reflect needs a clip longer than half a window.
    spec = torch.stft(x, n_fft=n_fft, hop_length=hop, window=window, center=True, pad_mode="constant",
                      return_complex=True)  # [F, frames]
    # A full-scale sine has magnitude sum(window) / 2 in its bin; dividing by that makes it 0 dBFS.
    power = (spec.real.square() + spec.imag.square()) / (window.sum() / 2) ** 2
    if n_mels is None:
        freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    else:
        weights, freqs = mel_filter_bank(n_fft, sample_rate, n_mels)
        power = weights.double() @ power
    db = 10.0 * torch.log10(power.clamp_min(10.0 ** (floor_db / 10.0)))
    return db.float(), freqs


def spectrogram_image(
    waveform: torch.Tensor,
    sample_rate: int,
    *,
    n_fft: int = 1024,
    hop: int = 160,
    n_mels: int | None = 64,
    db_range: tuple[float, float] = (-100.0, 0.0),
    title: str = "",
    size_px: tuple[int, int] = (400, 240),
) -> Image.Image:
    """A log-power spectrogram (see `log_spectrogram`) drawn with time (s) and frequency (Hz) axes and a dBFS
    colour bar.

    Args:
        waveform: ``[samples]`` float in [-1, 1].
        sample_rate: in Hz.
        n_fft, hop, n_mels: as in `log_spectrogram` (mel bands are drawn evenly spaced, labelled in Hz).
        db_range: the levels mapped to the darkest and brightest colours; the same for every clip so that
            clips compare (see the module docstring).
        title: drawn above the plot when given.
        size_px: (width, height) of the image in pixels.

    Returns:
        An RGB image. ``image.info["plot_box"]`` is the (left, upper, right, lower) pixel box of the
        spectrogram itself inside it (for overlays and tests); silence draws it in the darkest colour.
    """
    # Figure + Agg canvas instead of pyplot, as gallery.plot_metrics: no global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    db, freqs = log_spectrogram(waveform, sample_rate, n_fft=n_fft, hop=hop, n_mels=n_mels,
                                floor_db=min(db_range))
    bands, frames = db.shape
    duration = waveform.shape[0] / sample_rate
    dpi = 100
    width, height = size_px
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    # Fixed margins in pixels (room for the tick labels, axis labels and colour bar) instead of a layout
    # engine: constrained layout would take most of the drawing time, once per clip of a gallery.
    left, right, bottom, top = 72, 78, 42, 10 + (16 if title else 0)
    ax = fig.add_axes((left / width, bottom / height, 1 - (left + right) / width, 1 - (bottom + top) / height))
    colour_bar = fig.add_axes((1 - (right - 6) / width, bottom / height, 9 / width, 1 - (bottom + top) / height))
    frame_s = hop / sample_rate
    if n_mels is None:
        step = sample_rate / n_fft
        low, high = -step / 2, freqs[-1] + step / 2
    else:
        # Bands are evenly spaced in mel: draw them in mel units and label the axis in Hz.
        step = float(hz_to_mel(freqs[1]) - hz_to_mel(freqs[0])) if bands > 1 else float(hz_to_mel(sample_rate / 2))
        low, high = float(hz_to_mel(freqs[0])) - step / 2, float(hz_to_mel(freqs[-1])) + step / 2
    image = ax.imshow(db.numpy(), origin="lower", aspect="auto", cmap=_CMAP, interpolation="nearest",
                      vmin=db_range[0], vmax=db_range[1],
                      extent=(-frame_s / 2, (frames - 0.5) * frame_s, low, high))
    ax.set_xlim(0.0, max(duration, frame_s / 2))
    ax.set_ylim(low, high)
    if n_mels is not None:
        # No 0 Hz tick: the lowest band's lower edge is above 0 Hz, so a "0" at the bottom would be wrong.
        ticks = [f for f in (250, 500, 1000, 2000, 4000, 8000, 16000, 32000) if f <= sample_rate / 2]
        ax.set_yticks([float(hz_to_mel(f)) for f in ticks], [f"{f:g}" for f in ticks])
    ax.set_xlabel("time (s)", fontsize=9)
    ax.set_ylabel("frequency (Hz)", fontsize=9)
    ax.tick_params(labelsize=8)
    fig.colorbar(image, cax=colour_bar).set_label("dBFS", fontsize=9)
    colour_bar.tick_params(labelsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    width, height = canvas.get_width_height()  # what Agg drew (figsize * dpi, rounded)
    rendered = Image.frombuffer("RGBA", (width, height), bytes(canvas.buffer_rgba())).convert("RGB")
    box = ax.get_window_extent()  # display pixels, origin at the bottom left
    rendered.info["plot_box"] = (math.ceil(box.x0), math.ceil(height - box.y1),
                                 math.floor(box.x1), math.floor(height - box.y0))
    return rendered
