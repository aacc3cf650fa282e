"""Static HTML gallery of before/after samples (images, audio clips, or sequences as text) with training-metric
plots.

The page is meant to be copied around and opened straight from disk (from a
cluster, in a CI artifact, attached to a report), so it is a single HTML file
with inline CSS, no JavaScript and only relative links to the PNGs and WAVs
written beside it. Audio clips play in the browser's own ``<audio controls>``
player (no script needed) next to a spectrogram image of the clip.
"""

from __future__ import annotations

import html
import json
import math
import numbers
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

__all__ = [
    "AudioClip",
    "GallerySample",
    "PromptRow",
    "read_metrics",
    "plot_metrics",
    "write_gallery",
]


@dataclass
class AudioClip:
    """A mono audio sample for the gallery: ``waveform`` ``[samples]`` float in [-1, 1] at ``sample_rate`` Hz.

    The gallery writes it as a 16-bit WAV (values beyond [-1, 1] clipped, see `genalign.audio_io.write_wav`)
    and draws its spectrogram.
    """

    waveform: torch.Tensor
    sample_rate: int

    def __post_init__(self) -> None:
        # Checked here rather than when the page is written, so that a wrong shape fails where it was made.
        samples = self.waveform
        if not isinstance(samples, torch.Tensor) or samples.ndim != 1 or samples.numel() == 0:
            shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
            raise ValueError(f"AudioClip expects a non-empty mono waveform [samples], got {shape}; "
                             "pass one row of a [B, samples] batch")
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, numbers.Integral) \
                or self.sample_rate <= 0:
            raise ValueError(f"AudioClip sample_rate must be a positive int (Hz), got {self.sample_rate!r}")
        self.sample_rate = int(self.sample_rate)

    @property
    def duration_s(self) -> float:
        return self.waveform.shape[0] / self.sample_rate


@dataclass
class GallerySample:
    """One sample: an image (a ``[3, H, W]`` float tensor in ``[0, 1]`` or a PIL image), an `AudioClip`
    (a player and its spectrogram), or text (a decoded sequence, shown in a monospace box).

    ``labels`` carries extra per-sample text shown under the sample, e.g.
    ``{"seed": "3", "gold": "correct"}``.
    """

    image: torch.Tensor | Image.Image | AudioClip | str
    reward: float | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class PromptRow:
    """All samples for one prompt, from the model before and after fine-tuning, and figures about them (e.g.
    sequence logos of each side), as (caption, image) pairs shown above the grids."""

    prompt: str
    before: list[GallerySample]
    after: list[GallerySample]
    figures: list[tuple[str, Image.Image]] = field(default_factory=list)
    # The two grids' headings (also the stems of their files: keep them to letters, digits and _), e.g.
    # ("positive", "negative") for a round's demonstrations.
    sides: tuple[str, str] = ("before", "after")
    # Further (heading, samples) grids shown after those two, e.g. a third method beside a baseline.
    more: list[tuple[str, list[GallerySample]]] = field(default_factory=list)


# --------------------------------------------------------------------------- io


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Run ``write(tmp_path)`` and move the result over ``path`` in one step.

    A browser or rsync looking at the gallery while training rewrites it must
    never see a truncated file, so every output goes through a temp file in the
    same directory (os.replace is only atomic within one filesystem).
    """
    # Not mkstemp: its 0600 mode would make a gallery on a shared or served
    # directory unreadable to others; the writer creates the file under the umask.
    tmp = str(path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp"))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metrics(path: str | Path) -> list[dict]:
    """Read a JSONL metrics log: one JSON object per line, blank lines skipped.

    Records are expected to hold ``"step"`` plus numeric fields; this is not
    enforced here because plotting simply ignores records lacking what it needs.
    Raises ValueError naming the file and 1-based line number of a line that is
    not a JSON object.
    """
    path = Path(path)
    records: list[dict] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                )
            records.append(record)
    return records


def _is_number(value: object) -> bool:
    # bool is an int subclass, but a True/False flag is not a curve.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def plot_metrics(
    records: list[dict], keys: Sequence[str], out_png: str | Path, title: str = ""
) -> Path:
    """Plot each key in ``keys`` against ``"step"`` in its own subplot and save a PNG.

    Keys with no numeric value in any record are skipped; if none remain the PNG
    just says "no metrics yet", so a gallery written before the first log line
    still has a valid image. Returns the PNG path.
    """
    # Figure + Agg canvas instead of pyplot: no global backend switch or figure
    # registry, so this is safe to call from training code that also uses pyplot
    # and never needs a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)

    series: dict[str, tuple[list[float], list[float]]] = {}
    for key in keys:
        points = sorted(
            (float(r["step"]), float(r[key]))
            for r in records
            if _is_number(r.get("step")) and _is_number(r.get(key))
        )
        if points:
            steps, values = zip(*points)
            series[key] = (list(steps), list(values))

    if series:
        ncols = min(3, len(series))
        nrows = math.ceil(len(series) / ncols)
        fig = Figure(figsize=(4.0 * ncols, 3.0 * nrows), dpi=100, layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, (key, (steps, values)) in zip(axes, series.items()):
            ax.plot(steps, values, marker="." if len(steps) < 50 else None)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
        for ax in axes[len(series):]:
            ax.set_visible(False)
    else:
        fig = Figure(figsize=(4.0, 3.0), dpi=100)
        fig.text(0.5, 0.5, "no metrics yet", ha="center", va="center", fontsize=14)
    if title:
        fig.suptitle(title)

    FigureCanvasAgg(fig)
    _atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png"))
    return out_png


# ----------------------------------------------------------------------- images


def to_pil(image: torch.Tensor | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        # PNG cannot store e.g. CMYK or float modes.
        return image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGB")
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"expected a [3, H, W] tensor or a PIL image, got {shape}")
    # NaNs would become arbitrary bytes in the uint8 cast; show them as black.
    pixels = torch.nan_to_num(image.detach().float().cpu(), nan=0.0).clamp(0.0, 1.0)
    array = (pixels * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def _upscale(img: Image.Image, min_side: int) -> Image.Image:
    # Whole-number nearest-neighbour factor keeps every model pixel a crisp
    # square; smoothing would hide exactly the artefacts one looks for in 16 px
    # samples.
    factor = max(1, math.ceil(min_side / min(img.size)))
    if factor == 1:
        return img
    return img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)


# ------------------------------------------------------------------------- html

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; background: #fafafa; }
h1 { margin-top: 0; }
table.summary { border-collapse: collapse; margin-bottom: 1.5em; }
table.summary th, table.summary td {
  border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: left;
}
table.summary td { font-variant-numeric: tabular-nums; }
section.prompt { border-top: 1px solid #ddd; padding-top: 1em; margin-top: 1.5em; }
.prompt-text { font-family: ui-monospace, monospace; white-space: pre-wrap; background: #fff;
  border: 1px solid #e3e3e3; padding: 0.5em; }
.side { display: inline-block; vertical-align: top; margin-right: 2.5em; }
.mean { font-weight: normal; color: #555; font-size: 0.85em; margin-left: 0.5em; }
.grid { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; text-align: center; font-size: 0.85em; }
figcaption { margin-top: 0.2em; }
.label { color: #666; }
img { max-width: 100%; height: auto; image-rendering: pixelated; border: 1px solid #ddd; }
img.curves { image-rendering: auto; border: none; }
img.spectrogram { image-rendering: auto; display: block; }
audio { display: block; width: 100%; min-width: 16em; margin-bottom: 0.3em; }
pre.sequence { font-family: ui-monospace, monospace; font-size: 0.8em; max-width: 40em; white-space: pre-wrap;
  word-break: break-all; text-align: left; background: #fff; border: 1px solid #ddd; padding: 0.4em; margin: 0; }
.empty { color: #888; font-style: italic; }
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: object) -> str:
    """Numbers to 4 significant digits, anything else as text."""
    return f"{value:.4g}" if _is_number(value) else str(value)


def _img_tag(src: str, alt: str, size: tuple[int, int], css_class: str = "") -> str:
    cls = f' class="{css_class}"' if css_class else ""
    return (
        f'<img src="{_esc(src)}" alt="{_esc(alt)}" width="{size[0]}" height="{size[1]}"{cls}>'
    )


def _audio_html(clip: AudioClip, stem: str, description: str, out_dir: Path) -> str:
    """Write ``audio/{stem}.wav`` and ``images/{stem}_spectrogram.png``; return a player above the spectrogram."""
    from genalign.audio_io import write_wav
    from genalign.spectrogram import spectrogram_image

    # Only galleries with audio get an audio/ folder.
    (out_dir / "audio").mkdir(exist_ok=True)
    wav = f"audio/{stem}.wav"
    write_wav(out_dir / wav, clip.waveform, clip.sample_rate)
    figure = spectrogram_image(clip.waveform, clip.sample_rate)
    png = f"images/{stem}_spectrogram.png"
    _atomic_write(out_dir / png, lambda tmp: figure.save(tmp, format="PNG"))
    # preload="metadata": the page shows every clip's length without fetching all the audio up front. The
    # link inside is only shown by browsers that cannot play WAV.
    player = (f'<audio controls preload="metadata" src="{_esc(wav)}" aria-label="{_esc(description)}">'
              f'<a href="{_esc(wav)}">{_esc(wav)}</a></audio>')
    return player + _img_tag(png, f"spectrogram of {description}", figure.size, "spectrogram")


def _grid_html(
    side: str,
    samples: Sequence[GallerySample],
    prompt_idx: int,
    prompt: str,
    out_dir: Path,
    upscale_to: int,
) -> str:
    rewards = [float(s.reward) for s in samples if s.reward is not None]
    mean = ""
    if rewards:
        mean = f'<span class="mean">mean reward {_fmt(sum(rewards) / len(rewards))}</span>'
    parts = [f'<div class="side"><h3>{_esc(side)}{mean}</h3><div class="grid">']
    for i, sample in enumerate(samples):
        caption = []
        if sample.reward is not None:
            caption.append(f'<div class="reward">reward {_fmt(float(sample.reward))}</div>')
        caption.extend(
            f'<div class="label">{_esc(k)}: {_esc(v)}</div>' for k, v in sample.labels.items()
        )
        # Names depend only on position, so re-running overwrites instead of
        # piling up copies.
        stem = f"p{prompt_idx:03d}_{side}_{i:02d}"
        if isinstance(sample.image, str):
            shown = f'<pre class="sequence">{_esc(sample.image)}</pre>'
        elif isinstance(sample.image, AudioClip):
            shown = _audio_html(sample.image, stem, f"{side} sample {i + 1} for prompt: {prompt}", out_dir)
            caption.append(f'<div class="label">{sample.image.duration_s:.2f} s, {sample.image.sample_rate} Hz</div>')
        else:
            img = _upscale(to_pil(sample.image), upscale_to)
            name = f"{stem}.png"
            _atomic_write(out_dir / "images" / name, lambda tmp, img=img: img.save(tmp, format="PNG"))
            shown = _img_tag(f"images/{name}", f"{side} sample {i + 1} for prompt: {prompt}", img.size)
        parts.append(f"<figure>{shown}<figcaption>{''.join(caption)}</figcaption></figure>")
    if not samples:
        parts.append('<p class="empty">no samples</p>')
    parts.append("</div></div>")
    return "".join(parts)


def write_gallery(
    out_dir: str | Path,
    rows: Sequence[PromptRow],
    *,
    title: str,
    summary: Mapping[str, float | str] | None = None,
    metrics_path: str | Path | None = None,
    plot_keys: Sequence[str] = ("reward_mean",),
    upscale_to: int = 128,
) -> Path:
    """Write ``out_dir/index.html`` plus its images and return the index path.

    Every image sample is saved as ``images/pNNN_{before,after}_MM.png``, upscaled
    (nearest neighbour, whole-number factor) so its shorter side is at least
    ``upscale_to`` px. Every audio sample (`AudioClip`) is saved as
    ``audio/pNNN_{before,after}_MM.wav`` (16-bit PCM) with its spectrogram in
    ``images/pNNN_{before,after}_MM_spectrogram.png`` and shown as an
    ``<audio controls>`` player above the spectrogram. If ``metrics_path`` (a
    JSONL log, see ``read_metrics``) is given, ``plot_keys`` are plotted into
    ``curves.png``. Numbers in
    ``summary`` and all rewards are shown to 4 significant digits. Re-running
    with the same ``out_dir`` overwrites the same files.
    """
    if upscale_to < 1:
        raise ValueError(f"upscale_to must be >= 1, got {upscale_to}")
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    body = [f"<h1>{_esc(title)}</h1>"]

    if summary:
        cells = "".join(
            f"<tr><th>{_esc(k)}</th><td>{_esc(_fmt(v))}</td></tr>" for k, v in summary.items()
        )
        body.append(f'<table class="summary">{cells}</table>')

    if metrics_path is not None:
        curves = plot_metrics(
            read_metrics(metrics_path), plot_keys, out_dir / "curves.png", title="training metrics"
        )
        with Image.open(curves) as im:
            size = im.size
        tag = _img_tag(curves.name, "training curves", size, "curves")
        body.append(f"<h2>Training curves</h2><p>{tag}</p>")

    for idx, row in enumerate(rows):
        figures = []
        for k, (caption, figure) in enumerate(row.figures):
            name = f"p{idx:03d}_figure_{k:02d}.png"
            _atomic_write(images_dir / name, lambda tmp, figure=figure: figure.save(tmp, format="PNG"))
            tag = _img_tag(f"images/{name}", caption, figure.size, "figure")
            figures.append(f"<figure>{tag}<figcaption>{_esc(caption)}</figcaption></figure>")
        grids = "".join(
            _grid_html(side, samples, idx, row.prompt, out_dir, upscale_to)
            for side, samples in [*zip(row.sides, (row.before, row.after)), *row.more]
        )
        body.append(
            f'<section class="prompt" id="prompt-{idx}"><h2>Prompt {idx + 1}</h2>'
            f'<p class="prompt-text">{_esc(row.prompt)}</p>{"".join(figures)}{grids}</section>'
        )

    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
    index = out_dir / "index.html"
    _atomic_write(index, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return index
