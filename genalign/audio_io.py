"""WAV files in and out: generated clips to disk, reference clips from disk (no audio library needed).

Waveforms are float tensors in [-1, 1], as audio generators and rewards use them (see
`genalign.generators.base`): ``[samples]`` or ``[channels, samples]``. Files are written as 16-bit PCM, which
every browser and audio tool plays; reading takes 8/16/24/32-bit PCM and 32/64-bit float WAVs, including the
WAVE_FORMAT_EXTENSIBLE header that most tools write for 24-bit and multichannel audio.

Reading parses the RIFF chunks itself instead of using the standard library's `wave`: before Python 3.12
`wave` rejects WAVE_FORMAT_EXTENSIBLE files ("unknown format: 65534"), i.e. most 24-bit WAVs from ffmpeg,
DAWs and recorders. Writing uses `wave`, whose plain 16-bit PCM header every reader accepts.

PCM full scale is symmetric, ``2**(bits - 1) - 1`` both ways: ±1.0 is written as ±32767 and read back as
±1.0, so a write/read round trip is exact to half a quantisation step; the one code below it (−32768 in
16-bit) reads as −1.0.
"""

from __future__ import annotations

import operator
import struct
import wave
from pathlib import Path

import numpy as np
import torch

from genalign.gallery import _atomic_write

__all__ = ["AudioFileError", "write_wav", "read_wav", "load_audio"]

_FORMAT_PCM = 0x0001
_FORMAT_FLOAT = 0x0003
_FORMAT_EXTENSIBLE = 0xFFFE


class AudioFileError(ValueError):
    """An audio file that cannot be read or does not fit what was asked for; the message names the file and
    the fix."""


def _check_rate(sample_rate: object, what: str = "sample_rate") -> int:
    """A positive int sample rate (numpy ints accepted; floats and bools are not, a rate is a whole number)."""
    if isinstance(sample_rate, bool):
        raise ValueError(f"{what} must be a positive int (Hz), got {sample_rate!r}")
    try:
        rate = operator.index(sample_rate)
    except TypeError:
        raise ValueError(f"{what} must be a positive int (Hz), got {sample_rate!r}") from None
    if rate <= 0:
        raise ValueError(f"{what} must be a positive int (Hz), got {rate}")
    return rate


# --------------------------------------------------------------------------------------------- writing


def write_wav(path: str | Path, waveform: torch.Tensor, sample_rate: int) -> Path:
    """Write a waveform as a 16-bit PCM WAV file and return its path.

    Args:
        path: the file to write (its folder must exist); an existing file is replaced.
        waveform: ``[samples]`` (mono) or ``[channels, samples]`` float, nominally in [-1, 1].
        sample_rate: in Hz.

    Values outside [-1, 1] are clipped to it and NaNs written as 0: 16-bit PCM has no codes beyond full
    scale, and converting without clipping would wrap 1.2 around to a large negative sample (a loud click).
    Generators may overshoot slightly (vocoders without a final tanh); the file then holds the clipped clip.

    The file is written to a temporary name in the same folder and moved into place in one step, so a
    browser or copy reading it while a gallery is rewritten never sees a truncated file.
    """
    rate = _check_rate(sample_rate)
    if not isinstance(waveform, torch.Tensor) or waveform.ndim not in (1, 2):
        shape = tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform).__name__
        raise ValueError(f"expected a waveform [samples] or [channels, samples], got {shape}")
    frames = waveform.detach().to("cpu", torch.float64)
    frames = frames[None] if frames.ndim == 1 else frames  # [channels, samples]
    if frames.shape[0] < 1:
        raise ValueError("the waveform has no channels; pass [samples] or [channels, samples]")
    pcm = (torch.nan_to_num(frames, nan=0.0).clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16)
    # WAV interleaves channels per frame: [samples, channels] row-major, little-endian.
    data = pcm.T.contiguous().numpy().astype("<i2").tobytes()
    path = Path(path)

    def write(tmp: str) -> None:
        with wave.open(tmp, "wb") as out:
            out.setnchannels(int(pcm.shape[0]))
            out.setsampwidth(2)
            out.setframerate(rate)
            out.writeframes(data)

    _atomic_write(path, write)
    return path


# --------------------------------------------------------------------------------------------- reading


def _chunks(raw: bytes, path: Path) -> dict[bytes, bytes]:
    """The first chunk of each id in a RIFF/WAVE file (``fmt ``, ``data``, …)."""
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        head = raw[:4]
        hint = " (an RF64 file: larger than 4 GB; split it)" if head == b"RF64" else ""
        raise AudioFileError(f"{path} is not a WAV file (it does not start with a RIFF/WAVE header){hint}; "
                             "pass a .wav file or convert it, e.g. `ffmpeg -i IN OUT.wav`")
    chunks: dict[bytes, bytes] = {}
    pos = 12
    while pos + 8 <= len(raw):
        cid = raw[pos : pos + 4]
        (size,) = struct.unpack_from("<I", raw, pos + 4)
        # A data size beyond the file is what streaming writers leave when interrupted (or 0xFFFFFFFF on
        # purpose): keep the bytes that are there, as players do.
        chunks.setdefault(cid, raw[pos + 8 : pos + 8 + size])
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    return chunks


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """Read a WAV file.

    Args:
        path: a PCM (8/16/24/32-bit integer) or IEEE-float (32/64-bit) WAV file.

    Returns:
        ``(waveform [channels, samples] float32 in [-1, 1], sample_rate)``. Integer samples are divided by the
        symmetric full scale ``2**(bits - 1) - 1`` (8-bit WAVs are unsigned around 128); float samples beyond
        [-1, 1] are clipped to it.

    Raises:
        AudioFileError: the file is missing, is not a WAV file, or has an encoding other than PCM or float.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"audio file {path} does not exist" if not path.exists()
                             else f"{path} is not a file; pass a .wav file")
    raw = path.read_bytes()
    chunks = _chunks(raw, path)
    fmt = chunks.get(b"fmt ")
    if fmt is None or len(fmt) < 16:
        raise AudioFileError(f"{path} is not a valid WAV file: it has no (complete) 'fmt ' chunk")
    if b"data" not in chunks:
        raise AudioFileError(f"{path} is not a valid WAV file: it has no 'data' chunk")
    tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _FORMAT_EXTENSIBLE and len(fmt) >= 26:
        # The real format is the first two bytes of the SubFormat GUID (after cbSize, valid bits, channel mask).
        (tag,) = struct.unpack_from("<H", fmt, 24)
    if channels < 1 or rate < 1 or block_align < 1 or block_align % channels:
        raise AudioFileError(f"{path} has a corrupt WAV header ({channels} channels, {rate} Hz, "
                             f"{block_align}-byte frames)")
    width = block_align // channels  # bytes per sample as stored (e.g. 20-bit audio in 3-byte containers)
    data = chunks[b"data"]
    data = data[: len(data) - len(data) % block_align]  # whole frames only (a truncated file's tail)
    if tag == _FORMAT_PCM and width in (1, 2, 3, 4):
        if width == 1:
            ints = np.frombuffer(data, np.uint8).astype(np.float64) - 128.0
        elif width == 3:
            b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
            # Little-endian 3-byte two's complement: assemble in the top 24 bits, then shift the sign down.
            ints = (((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)) >> 8).astype(np.float64)
        else:
            ints = np.frombuffer(data, f"<i{width}").astype(np.float64)
        values = ints / float(2 ** (8 * width - 1) - 1)
    elif tag == _FORMAT_FLOAT and width in (4, 8):
        values = np.nan_to_num(np.frombuffer(data, f"<f{width}").astype(np.float64), nan=0.0)
    else:
        kind = {_FORMAT_PCM: "PCM", _FORMAT_FLOAT: "float"}.get(tag, f"format tag 0x{tag:04x}")
        raise AudioFileError(f"{path} is a {kind} WAV with {8 * width}-bit samples ({bits} bits declared); "
                             "only 8/16/24/32-bit PCM and 32/64-bit float WAVs can be read — convert it, e.g. "
                             "`ffmpeg -i IN -c:a pcm_s16le OUT.wav`")
    frames = np.clip(values, -1.0, 1.0).reshape(-1, channels).T  # [channels, samples]
    return torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)), int(rate)


def load_audio(
    path: str | Path,
    *,
    sample_rate: int,
    channels: int = 1,
    min_samples: int = 0,
    resample: bool = True,
) -> torch.Tensor:
    """A WAV file as a waveform at the rate and channel count a model or reward expects.

    Args:
        path: a WAV file (see `read_wav`).
        sample_rate: the rate wanted, in Hz. A file at another rate is resampled with the band-limited
            windowed-sinc resampler of `rewards.audio.resample`; resampled values are clipped to [-1, 1]
            (band-limiting can add inter-sample peaks a little above full scale).
        channels: channels wanted. A file with more channels is down-mixed to mono by averaging them when
            ``channels == 1``; any other mismatch (e.g. stereo asked of a mono file) is an error rather than a
            guess at how to up-mix.
        min_samples: the shortest acceptable clip, in samples at ``sample_rate`` (checked after resampling).
        resample: with False, a file at another rate is an error instead of being resampled.

    Returns:
        ``[channels, samples]`` float32 in [-1, 1].

    Raises:
        AudioFileError: see `read_wav`, and a rate mismatch with ``resample=False``, a channel mismatch, or a
            clip shorter than ``min_samples``; each message names the file and the fix.
    """
    rate = _check_rate(sample_rate)
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    waveform, file_rate = read_wav(path)
    file_channels = waveform.shape[0]
    if file_channels != channels:
        if channels != 1:
            raise AudioFileError(
                f"{path} has {file_channels} channel{'s' if file_channels != 1 else ''} but {channels} were "
                f"asked for (mono/stereo mismatch): only down-mixing to mono (channels=1) is done on load; "
                f"pass channels={file_channels} or convert the file, e.g. `ffmpeg -i IN -ac {channels} OUT.wav`"
            )
        waveform = waveform.mean(dim=0, keepdim=True)
    if file_rate != rate:
        if not resample:
            raise AudioFileError(
                f"{path} is sampled at {file_rate} Hz, not the {rate} Hz asked for; pass resample=True to "
                f"resample it on load, or convert the file, e.g. `ffmpeg -i IN -ar {rate} OUT.wav`"
            )
        from rewards.audio import resample as resample_waveform

        waveform = resample_waveform(waveform, file_rate, rate).clamp(-1.0, 1.0)
    length = int(waveform.shape[-1])
    if length < min_samples:
        raise AudioFileError(
            f"{path} is too short: {length} samples ({length / rate:.3f} s at {rate} Hz) but at least "
            f"{min_samples} samples ({min_samples / rate:.3f} s) are needed; pass a longer clip"
            + (f" (the file holds {file_rate} Hz audio, resampled to {rate} Hz)" if file_rate != rate else "")
        )
    return waveform.contiguous()
