"""WAV writing and reading, and loading clips at a model's rate and channel count (genalign.audio_io)."""

import math
import struct
import wave

import numpy as np
import pytest
import torch

from genalign.audio_io import AudioFileError, load_audio, read_wav, write_wav

# Half a 16-bit quantisation step: the most a write/read round trip may change a sample in [-1, 1].
HALF_STEP = 0.5 / 32767 + 1e-7


def _tone(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(round(rate * seconds), dtype=torch.float64) / rate
    return (amplitude * torch.sin(2 * math.pi * freq * t)).float()


def _raw_wav(path, frames: bytes, *, tag: int, channels: int, rate: int, width: int, extensible: bool = False):
    """A WAV file written byte by byte, for encodings `write_wav` does not produce."""
    bits = 8 * width
    if extensible:
        # WAVE_FORMAT_EXTENSIBLE: cbSize 22, valid bits, channel mask, SubFormat GUID starting with the real tag.
        guid = struct.pack("<H", tag) + bytes.fromhex("000000001000800000aa00389b71")
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * channels * width, channels * width, bits,
                          22, bits, 0) + guid
    else:
        fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * width, channels * width, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(frames)) + frames
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def test_mono_round_trip_is_exact_to_16_bit_quantisation(tmp_path):
    # Catches a wrong scale (e.g. 32768 one way and 32767 the other), byte order or sample width.
    x = torch.rand(4001, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x[:2] = torch.tensor([1.0, -1.0])  # full scale both ways
    path = write_wav(tmp_path / "x.wav", x, 16000)
    y, rate = read_wav(path)
    assert rate == 16000 and y.dtype == torch.float32 and y.shape == (1, 4001)
    assert (y[0] - x).abs().max() <= HALF_STEP
    assert y[0, 0] == 1.0 and y[0, 1] == -1.0
    with wave.open(str(path)) as f:  # a plain 16-bit PCM file any reader accepts
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()) == (1, 2, 16000, 4001)


def test_values_beyond_full_scale_are_clipped_not_wrapped(tmp_path):
    # Without the clip, 1.5 * 32767 overflows int16 and wraps to a large negative sample.
    x = torch.tensor([1.5, -3.0, 0.25, float("nan"), 1.0001])
    y, _ = read_wav(write_wav(tmp_path / "clip.wav", x, 8000))
    assert torch.allclose(y[0], torch.tensor([1.0, -1.0, 0.25, 0.0, 1.0]), atol=HALF_STEP)


def test_stereo_round_trip_keeps_channel_order(tmp_path):
    # Catches writing channels one after the other instead of interleaved per frame (or swapped).
    left, right = _tone(440, 16000, 0.1), -_tone(1000, 16000, 0.1, amplitude=0.25)
    y, _ = read_wav(write_wav(tmp_path / "st.wav", torch.stack([left, right]), 16000))
    assert y.shape == (2, 1600)
    assert (y[0] - left).abs().max() <= HALF_STEP and (y[1] - right).abs().max() <= HALF_STEP


def test_write_is_atomic(tmp_path, monkeypatch):
    # A failure while writing must leave the previous file whole and no temp file behind.
    path = write_wav(tmp_path / "a.wav", _tone(440, 8000, 0.5), 8000)
    before = path.read_bytes()

    def fail(self, data):
        raise OSError("disk full")

    monkeypatch.setattr(wave.Wave_write, "writeframes", fail)
    with pytest.raises(OSError, match="disk full"):
        write_wav(path, torch.zeros(100), 8000)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 4), torch.zeros(0, 10)])
def test_write_rejects_bad_shapes(tmp_path, bad):
    with pytest.raises(ValueError, match="samples"):
        write_wav(tmp_path / "bad.wav", bad, 16000)
    with pytest.raises(ValueError, match="sample_rate"):
        write_wav(tmp_path / "bad.wav", torch.zeros(10), 16000.0)


@pytest.mark.parametrize("extensible", [False, True])
def test_reads_8_24_32_bit_pcm_and_float(tmp_path, extensible):
    # 8-bit is unsigned around 128; 24-bit is 3-byte two's complement (sign extension is the usual bug);
    # extensible headers are what ffmpeg writes for 24-bit (Python 3.11's wave module rejects them).
    expected = [-1.0, 0.0, 1.0, 0.5]
    u8 = bytes([1, 128, 255, 128 + 64])  # 64 / 127 ~ 0.5
    i24 = b"".join(struct.pack("<i", v)[:3] for v in (-8388607, 0, 8388607, 4194304))
    i32 = struct.pack("<4i", -2147483647, 0, 2147483647, 1073741824)
    f32 = struct.pack("<4f", -1.0, 0.0, 2.0, 0.5)  # 2.0: floats beyond full scale are clipped
    for name, data, tag, width, tol in [("u8", u8, 1, 1, 0.5 / 127), ("i24", i24, 1, 3, 1e-6),
                                        ("i32", i32, 1, 4, 1e-6), ("f32", f32, 3, 4, 0.0)]:
        path = _raw_wav(tmp_path / f"{name}.wav", data, tag=tag, channels=1, rate=11025, width=width,
                        extensible=extensible)
        y, rate = read_wav(path)
        assert rate == 11025 and y.shape == (1, 4), name
        assert np.allclose(y[0].numpy(), expected, atol=tol + 1e-7), (name, y)


def test_reads_a_stereo_24_bit_file(tmp_path):
    frames = b"".join(struct.pack("<i", v)[:3] for v in (8388607, -8388607, 0, 4194304))  # L R L R
    y, _ = read_wav(_raw_wav(tmp_path / "s24.wav", frames, tag=1, channels=2, rate=48000, width=3))
    assert np.allclose(y.numpy(), [[1.0, 0.0], [-1.0, 0.5]], atol=1e-6)


def test_missing_file_error_names_the_path(tmp_path):
    with pytest.raises(AudioFileError, match=r"nowhere\.wav does not exist"):
        read_wav(tmp_path / "nowhere.wav")
    with pytest.raises(AudioFileError, match="nowhere"):
        load_audio(tmp_path / "nowhere.wav", sample_rate=16000)


@pytest.mark.parametrize("content", [b"", b"hello, not audio\n", b"\x89PNG\r\n\x1a\n" + bytes(40)])
def test_not_a_wav_is_a_clear_error(tmp_path, content):
    path = tmp_path / "fake.wav"
    path.write_bytes(content)
    with pytest.raises(AudioFileError, match=r"fake\.wav is not a WAV file"):
        read_wav(path)


def test_unsupported_encoding_is_a_clear_error(tmp_path):
    # A-law (tag 6) is a real WAV encoding that must not be misread as 8-bit PCM.
    path = _raw_wav(tmp_path / "alaw.wav", bytes(8), tag=6, channels=1, rate=8000, width=1)
    with pytest.raises(AudioFileError, match="alaw.wav is a format tag 0x0006 WAV.*ffmpeg"):
        read_wav(path)


def test_load_resamples_keeping_pitch_and_length(tmp_path):
    # A 440 Hz tone at 22050 Hz loaded at 16 kHz: still 440 Hz (a resampler that just reinterprets the samples
    # would move it to 319 Hz) and 16000 samples per second.
    path = write_wav(tmp_path / "tone.wav", _tone(440, 22050, 1.0), 22050)
    y = load_audio(path, sample_rate=16000)
    assert y.shape == (1, 16000)
    spectrum = torch.fft.rfft(y[0].double() * torch.hann_window(16000, dtype=torch.float64)).abs()
    assert int(spectrum.argmax()) == 440  # 1 s of audio: bin k is k Hz
    assert y.abs().max() <= 1.0


def test_load_refuses_other_rate_without_resample(tmp_path):
    path = write_wav(tmp_path / "tone.wav", _tone(440, 22050, 0.1), 22050)
    with pytest.raises(AudioFileError, match=r"tone\.wav is sampled at 22050 Hz, not the 16000 Hz.*resample=True"):
        load_audio(path, sample_rate=16000, resample=False)
    assert load_audio(path, sample_rate=22050, resample=False).shape == (1, 2205)


def test_load_downmixes_stereo_to_mono(tmp_path):
    left, right = _tone(440, 16000, 0.1), _tone(1000, 16000, 0.1, amplitude=0.3)
    path = write_wav(tmp_path / "st.wav", torch.stack([left, right]), 16000)
    mono = load_audio(path, sample_rate=16000)
    assert mono.shape == (1, 1600)
    assert (mono[0] - (left + right) / 2).abs().max() <= 2 * HALF_STEP
    assert load_audio(path, sample_rate=16000, channels=2).shape == (2, 1600)


def test_load_refuses_stereo_from_a_mono_file(tmp_path):
    path = write_wav(tmp_path / "mono.wav", _tone(440, 16000, 0.1), 16000)
    with pytest.raises(AudioFileError, match=r"mono\.wav has 1 channel but 2 were asked for \(mono/stereo"):
        load_audio(path, sample_rate=16000, channels=2)


def test_too_short_clip_names_its_length_and_the_minimum(tmp_path):
    path = write_wav(tmp_path / "short.wav", _tone(440, 16000, 0.05), 16000)  # 800 samples
    with pytest.raises(AudioFileError, match=r"short\.wav is too short: 800 samples \(0\.050 s at 16000 Hz\) "
                                             r"but at least 1600 samples \(0\.100 s\)"):
        load_audio(path, sample_rate=16000, min_samples=1600)
    assert load_audio(path, sample_rate=16000, min_samples=800).shape == (1, 800)


def test_minimum_length_is_checked_after_resampling(tmp_path):
    # 1000 samples at 22050 Hz are 726 at 16 kHz: too short for 800, although the file holds 1000.
    path = write_wav(tmp_path / "r.wav", _tone(440, 22050, 1000 / 22050), 22050)
    with pytest.raises(AudioFileError, match=r"726 samples .*resampled to 16000 Hz"):
        load_audio(path, sample_rate=16000, min_samples=800)
