"""Audio in galleries and sample folders: spectrogram images, WAVs beside the page with players, writers'
audio branch, and `genalign sample` writing WAVs."""

import json
import math
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from genalign.audio_io import read_wav
from genalign.gallery import AudioClip, GallerySample, PromptRow, write_gallery
from genalign.generators.base import Conditions, Rollout
from genalign.spectrogram import hz_to_mel, log_spectrogram, spectrogram_image
from genalign.writers import displayable, gallery_samples, sample_figures, write_samples

RATE = 16000


def _tone(freq: float, seconds: float, amplitude: float = 0.5, rate: int = RATE) -> torch.Tensor:
    t = torch.arange(round(rate * seconds), dtype=torch.float64) / rate
    return (amplitude * torch.sin(2 * math.pi * freq * t)).float()


def _plot(image: Image.Image) -> np.ndarray:
    """The spectrogram area of a `spectrogram_image` as [rows, cols, 3] floats, 2 px inside its frame."""
    left, upper, right, lower = image.info["plot_box"]
    return np.asarray(image.convert("RGB"), dtype=np.float64)[upper + 2 : lower - 2, left + 2 : right - 2]


# ------------------------------------------------------------------------------------------- spectrograms


def test_silence_is_finite_and_draws_a_uniform_dark_plot():
    # log(0) must not give -inf/NaN (matplotlib would draw those as blank or fail).
    db, freqs = log_spectrogram(torch.zeros(RATE), RATE)
    assert db.shape == (64, 1 + RATE // 160) and len(freqs) == 64
    assert torch.isfinite(db).all() and (db == -100.0).all()
    image = spectrogram_image(torch.zeros(RATE), RATE)
    assert image.mode == "RGB" and image.size == (400, 240)
    plot = _plot(image)
    assert plot.size and plot.std(axis=(0, 1)).max() == 0  # one colour: the colour map's darkest
    assert plot.mean() < 40
    assert np.asarray(image.convert("L"), dtype=np.float64).std() > 0  # axes and labels are drawn


@pytest.mark.parametrize("n_mels", [64, None])
def test_a_tone_is_the_brightest_row_at_its_frequency(n_mels):
    db, freqs = log_spectrogram(_tone(440, 1.0), RATE, n_mels=n_mels)
    band = int(db.mean(dim=1).argmax())
    spacing = freqs[band + 1] - freqs[band]
    assert abs(freqs[band] - 440) <= spacing  # the loudest band is the tone's
    # 0.5 amplitude is -6 dBFS; between two band centres a little less.
    assert -9.0 < float(db[band].median()) < -5.0

    low = spectrogram_image(_tone(440, 1.0), RATE, n_mels=n_mels)
    high = spectrogram_image(_tone(3000, 1.0), RATE, n_mels=n_mels)
    rows = []
    for image in (low, high):
        brightness = _plot(image).mean(axis=(1, 2))  # per pixel row, top to bottom
        row = int(brightness.argmax())
        others = np.delete(brightness, range(max(0, row - 8), min(len(brightness), row + 9)))
        assert brightness[row] > others.max() + 50, "the tone's row must stand out"
        rows.append(row)
    # Higher frequencies are drawn higher up (a flipped axis would put 3 kHz below 440 Hz), at the right height.
    assert rows[1] < rows[0]
    height = _plot(low).shape[0]
    scale = hz_to_mel if n_mels else (lambda f: f)
    expected = 1 - (scale(3000) - scale(440)) / (scale(RATE / 2) - scale(0))
    assert abs((rows[0] - rows[1]) / height - (1 - expected)) < 0.05


def test_spectrogram_rejects_multichannel_and_empty_input():
    with pytest.raises(ValueError, match="mono waveform"):
        spectrogram_image(torch.zeros(2, 100), RATE)
    with pytest.raises(ValueError, match="empty"):
        spectrogram_image(torch.zeros(0), RATE)
    assert spectrogram_image(torch.zeros(10), RATE).size == (400, 240)  # shorter than one window


# ---------------------------------------------------------------------------------------------- gallery


class _Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.tags if name == tag]


def _parse(index: Path) -> _Page:
    page = _Page()
    page.feed(index.read_text(encoding="utf-8"))
    return page


def audio_rows() -> list[PromptRow]:
    """Two prompts, each with two clips per side, of different lengths and rates."""
    gen = torch.Generator().manual_seed(0)

    def clip(i: int, side: str) -> GallerySample:
        rate = (RATE, 22050)[i % 2]
        seconds = 0.5 + 0.25 * i
        noise = 0.05 * torch.randn(round(rate * seconds), generator=gen)
        wave = _tone(300 * (i + 1), seconds, rate=rate) + noise
        return GallerySample(AudioClip(wave, rate), reward=0.25 * i + (side == "after"),
                             labels={"seed": str(i), "side": side})

    return [PromptRow(prompt, [clip(i, "before") for i in range(2)], [clip(i, "after") for i in range(2)])
            for prompt in ("a dog barking", "rain on a <tin> roof")]


def test_gallery_has_a_player_and_a_spectrogram_per_clip(tmp_path):
    rows = audio_rows()
    index = write_gallery(tmp_path / "site", rows, title="audio gallery")
    page = _parse(index)
    clips = [s.image for row in rows for s in (*row.before, *row.after)]
    audios, imgs = page.all("audio"), page.all("img")
    assert len(audios) == len(clips) == 8 and len(imgs) == 8
    for attrs, clip in zip(audios, clips):
        assert "controls" in attrs and attrs["preload"] == "metadata"
        src = attrs["src"]
        assert src.endswith(".wav") and not src.startswith(("/", "http:", "https:", "file:", "data:"))
        waveform, rate = read_wav(index.parent / src)
        assert rate == clip.sample_rate and waveform.shape == (1, clip.waveform.shape[0])
        assert (waveform[0] - clip.waveform.clamp(-1, 1)).abs().max() < 1e-4
    assert len({a["src"] for a in audios}) == 8 and len({i["src"] for i in imgs}) == 8  # no clip overwrites another
    for attrs in imgs:
        assert "spectrogram" in attrs["class"] and attrs["alt"].startswith("spectrogram of")
        with Image.open(index.parent / attrs["src"]) as im:
            assert im.format == "PNG" and (int(attrs["width"]), int(attrs["height"])) == im.size
            assert np.asarray(im.convert("L"), dtype=np.float32).std() > 0
    text = "".join(page.text)
    for row in rows:
        assert row.prompt in text
        for s in (*row.before, *row.after):
            assert f"reward {s.reward:.4g}" in text and f"seed: {s.labels['seed']}" in text
    assert "0.75 s, 22050 Hz" in text and "0.50 s, 16000 Hz" in text
    assert "mean reward 1.125" in text
    assert not page.all("script") and "rain on a &lt;tin&gt; roof" in index.read_text()


def test_audio_gallery_rewrite_overwrites_the_same_files(tmp_path):
    site = tmp_path / "site"
    write_gallery(site, audio_rows()[:1], title="one")
    files = sorted(p.relative_to(site) for p in site.rglob("*"))
    assert not [p for p in files if p.name.endswith(".tmp")]
    assert sum(p.suffix == ".wav" for p in files) == 4 and all(p.parts[0] in ("audio", "images", "index.html")
                                                                 for p in files)
    write_gallery(site, audio_rows()[:1], title="two")
    assert sorted(p.relative_to(site) for p in site.rglob("*")) == files


def test_image_galleries_get_no_audio_folder(tmp_path):
    write_gallery(tmp_path, [PromptRow("p", [GallerySample(torch.rand(3, 8, 8))], [])], title="t")
    assert not (tmp_path / "audio").exists()


@pytest.mark.parametrize("waveform, rate, message", [
    (torch.zeros(1, 100), RATE, "mono waveform"),
    (torch.zeros(0), RATE, "non-empty"),
    (torch.zeros(100), 16000.0, "positive int"),
    (torch.zeros(100), 0, "positive int"),
])
def test_audio_clip_checks_its_input(waveform, rate, message):
    with pytest.raises(ValueError, match=message):
        AudioClip(waveform, rate)


# ---------------------------------------------------------------------------------------------- writers


def _rollout(batch: int = 3, seconds: float = 0.25) -> Rollout:
    waves = torch.stack([_tone(220 * (i + 1), seconds) for i in range(batch)])
    waves[0, :10] = 1.3  # an overshoot: written clipped
    return Rollout(outputs=waves, modality="audio", conditions=Conditions(texts=[f"prompt {i}" for i in range(batch)]))


def test_write_samples_writes_a_wav_and_a_record_per_sample(tmp_path):
    rollout = _rollout()
    generator = SimpleNamespace(sample_rate=RATE)
    records = [{"prompt": text, "seed": i, "clap_score": 0.1 * i} for i, text in enumerate(rollout.texts)]
    index = write_samples(rollout, generator, tmp_path / "out", records)
    lines = [json.loads(line) for line in index.read_text().splitlines()]
    assert [line["file"] for line in lines] == ["00000.wav", "00001.wav", "00002.wav"]
    for i, line in enumerate(lines):
        assert line["sample_rate"] == RATE and line["duration_s"] == pytest.approx(0.25)
        assert line["prompt"] == f"prompt {i}" and line["seed"] == i and line["clap_score"] == pytest.approx(0.1 * i)
        waveform, rate = read_wav(tmp_path / "out" / line["file"])
        assert rate == RATE and (waveform[0] - rollout.outputs[i].clamp(-1, 1)).abs().max() < 1e-4
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.wav", "00001.wav", "00002.wav",
                                                                   "samples.jsonl"]


def test_gallery_samples_and_figures_for_audio():
    rollout = _rollout()
    generator = SimpleNamespace(sample_rate=RATE)
    samples = gallery_samples(rollout, generator, [0.5, 1.5, 2.5], [{"seed": str(i)} for i in range(3)])
    assert [type(s.image) for s in samples] == [AudioClip] * 3
    assert [s.image.sample_rate for s in samples] == [RATE] * 3 and samples[2].reward == 2.5
    assert torch.equal(samples[1].image.waveform, rollout.outputs[1])
    assert sample_figures({"before": rollout, "after": rollout}, generator) == []


@pytest.mark.parametrize("generator", [SimpleNamespace(), SimpleNamespace(sample_rate=16000.0),
                                       SimpleNamespace(sample_rate=None)])
def test_audio_generator_without_a_sample_rate_is_a_clear_error(generator):
    with pytest.raises(ValueError, match="makes audio but has no positive int `sample_rate`"):
        displayable(_rollout(), generator)


class _ToneGenerator:
    """Enough of an audio generator for `genalign sample`: a tone per condition, its pitch set by the seed."""

    modality = "audio"
    sample_rate = 8000

    def to(self, device=None, dtype=None):
        return self

    def sample(self, conditions, options=None, *, seeds=None, batch_size=None, return_trajectory=True,
               progress=False):
        waves = torch.stack([_tone(200 + 100 * s, 0.5, rate=self.sample_rate) for s in seeds])
        return Rollout(outputs=waves, modality="audio", conditions=Conditions.coerce(conditions))


def test_genalign_sample_writes_wavs(tmp_path, monkeypatch):
    # The command itself, with the run loading and the reward stubbed: no audio-specific code in cli.py.
    from genalign import cli, engine

    config = SimpleNamespace(
        pipeline="ddpo", sampling=SimpleNamespace(options=lambda generator: None, batch_size=2),
        reward=SimpleNamespace(name="loudness"), eval=SimpleNamespace(gold=None),
    )
    monkeypatch.setattr(cli, "load_run_generator", lambda *args, **kwargs: (_ToneGenerator(), config))
    monkeypatch.setattr(engine, "build_reward", lambda cfg: lambda outputs, texts: SimpleNamespace(
        rewards=outputs.abs().mean(dim=1)))
    monkeypatch.setattr(engine, "build_gold", lambda cfg: None)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a whistle\na hum\n")
    out = tmp_path / "samples"
    assert cli.main(["sample", "--run", str(tmp_path), "--prompts", str(prompts), "--n", "2", "--out", str(out),
                     "--seed", "1"]) == 0
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(l["file"], l["prompt"], l["seed"]) for l in lines] == [
        ("00000.wav", "a whistle", 1), ("00001.wav", "a whistle", 2), ("00002.wav", "a hum", 3),
        ("00003.wav", "a hum", 4)]
    for line in lines:
        waveform, rate = read_wav(out / line["file"])
        assert rate == 8000 and waveform.shape == (1, 4000) and line["duration_s"] == 0.5
        spectrum = torch.fft.rfft(waveform[0].double()).abs()
        assert int(spectrum.argmax()) == (200 + 100 * line["seed"]) // 2  # 0.5 s: bin k is 2k Hz
        assert line["loudness"] == pytest.approx(float(_tone(200 + 100 * line["seed"], 0.5, rate=8000).abs().mean()))
