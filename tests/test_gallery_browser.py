"""A written gallery opens in a real browser: every image loads, the numbers show, the page is not blank."""

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from genalign.gallery import GallerySample, PromptRow, write_gallery

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
