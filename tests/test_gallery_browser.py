"""A written gallery opens in a real browser: every image loads, every audio player reads its clip, the numbers
show, the page is not blank."""

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from genalign.gallery import GallerySample, PromptRow, write_gallery
from tests.test_gallery_audio import audio_rows

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs Debian's chromium for CI)"
)

# The flags a root, offline, headless machine needs (no sandbox, no background network calls).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--allow-file-access-from-files",
    "--virtual-time-budget=5000",
]

# Loads the gallery in a same-origin iframe and reports, in its own DOM, how many images decoded.
CHECKER = """<!doctype html><html><body><iframe id="g" src="{src}" width="1200" height="900"></iframe>
<pre id="result">pending</pre>
<script>
document.getElementById("g").addEventListener("load", () => {{
  const doc = document.getElementById("g").contentDocument;
  const imgs = Array.from(doc.images);
  const loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.getElementById("result").textContent =
    "images=" + imgs.length + " loaded=" + loaded + " text=" + doc.body.innerText.replace(/\\s+/g, " ");
}});
</script></body></html>"""


def _run(args, tmp_path):
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


@pytest.fixture
def gallery(tmp_path):
    gen = torch.Generator().manual_seed(0)
    rows = [
        PromptRow(
            prompt=prompt,
            before=[GallerySample(torch.rand(3, 16, 16, generator=gen), reward=0.1234 + i) for i in range(2)],
            after=[GallerySample(torch.rand(3, 16, 16, generator=gen), reward=0.5678 + i) for i in range(2)],
        )
        for prompt in ("a red circle", "two green stars")
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(f'{{"step": {s}, "reward_mean": {0.1 * s}}}\n' for s in range(10)))
    index = write_gallery(
        tmp_path / "gallery", rows, title="browser check", summary={"mean reward after": 1.5678},
        metrics_path=metrics,
    )
    return index


def test_gallery_renders_in_headless_chromium(gallery, tmp_path):
    checker = tmp_path / "gallery" / "check.html"
    checker.write_text(CHECKER.format(src=gallery.name))
    dom = _run(["--dump-dom", checker.as_uri()], tmp_path).stdout
    match = re.search(r"images=(\d+) loaded=(\d+) text=(.*)</pre>", dom, re.S)
    assert match, dom[-2000:]
    total, loaded, text = int(match.group(1)), int(match.group(2)), match.group(3)
    assert total == 1 + 2 * 2 * 2  # the curves plot + before/after grids of two prompts
    assert loaded == total
    for expected in ("a red circle", "two green stars", "0.1234", "1.568", "mean reward after"):
        assert expected in text

    shot = tmp_path / "shot.png"
    _run([f"--screenshot={shot}", "--window-size=1000,800", gallery.as_uri()], tmp_path)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 5  # not a blank page


# Loads an audio gallery in a same-origin iframe and reports every player's readyState, duration and error, and
# every image's decoded width and pixel spread (drawn into a canvas; --allow-file-access-from-files keeps file://
# images from tainting it). Audio metadata arrives asynchronously, so it polls until no player is still loading
# (--virtual-time-budget advances the timers) and reports what it has after 100 tries either way.
AUDIO_CHECKER = """<!doctype html><html><body><iframe id="g" src="{src}" width="1200" height="900"></iframe>
<pre id="result">pending</pre>
<script>
const frame = document.getElementById("g");
function spread(img) {{
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  if (!canvas.width) return 0;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  try {{
    const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let sum = 0, sq = 0, n = 0;
    for (let i = 0; i < d.length; i += 4) {{ const v = d[i] + d[i + 1] + d[i + 2]; sum += v; sq += v * v; n++; }}
    return Math.sqrt(Math.max(0, sq / n - (sum / n) ** 2));
  }} catch (e) {{ return "canvas-" + e.name; }}
}}
frame.addEventListener("load", () => {{
  const doc = frame.contentDocument;
  const audios = Array.from(doc.querySelectorAll("audio"));
  function report(tries) {{
    if (audios.some(a => a.readyState < 1 && !a.error) && tries < 100) {{
      setTimeout(() => report(tries + 1), 50);
      return;
    }}
    const players = audios.map(a => [a.getAttribute("src"), a.readyState, a.duration, a.error ? a.error.code : 0]);
    const images = Array.from(doc.images).map(i => [i.getAttribute("src"), i.naturalWidth, spread(i)]);
    document.getElementById("result").textContent = "RESULT" + JSON.stringify({{tries, players, images}}) + "END";
  }}
  report(0);
}});
</script></body></html>"""


def test_audio_gallery_plays_in_headless_chromium(tmp_path):
    # Fails for a WAV Chromium cannot decode (wrong header sizes, float samples it rejects), a wrong rate in
    # the header (the duration is off), a src that does not resolve from the page, or a blank spectrogram.
    rows = audio_rows()
    index = write_gallery(tmp_path / "gallery", rows, title="audio browser check")
    checker = index.parent / "check.html"
    checker.write_text(AUDIO_CHECKER.format(src=index.name))
    dom = _run(["--dump-dom", checker.as_uri()], tmp_path).stdout
    match = re.search(r'<pre id="result">RESULT(.*?)END</pre>', dom, re.S)
    assert match, dom[-2000:]
    result = json.loads(html.unescape(match.group(1)))
    clips = [s.image for row in rows for s in (*row.before, *row.after)]
    assert len(result["players"]) == len(clips) == 8
    for (src, ready, duration, error), clip in zip(result["players"], clips):
        assert error == 0 and ready >= 1, f"{src} did not load in Chromium (readyState {ready}, error {error})"
        assert duration == pytest.approx(clip.duration_s, rel=0.01), src
    assert len(result["images"]) == 8
    for src, width, spread in result["images"]:
        assert src.endswith("_spectrogram.png") and width > 0, src
        assert isinstance(spread, (int, float)) and spread > 0, f"{src}: {spread}"
