import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genalign.gallery import (
    GallerySample,
    PromptRow,
    plot_metrics,
    read_metrics,
    write_gallery,
)

PROMPTS = ["a red square", 'tricky <b>bold</b> & "quoted"', "a blue circle on grass"]


class _PageParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.imgs: list[dict[str, str | None]] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def _parse(index: Path) -> _PageParser:
    parser = _PageParser()
    parser.feed(index.read_text(encoding="utf-8"))
    parser.close()
    return parser


def _rows(gen: torch.Generator) -> list[PromptRow]:
    def sample(i: int, gold: str) -> GallerySample:
        reward = torch.rand((), generator=gen).item() * 3.0 - 1.0
        return GallerySample(
            torch.rand(3, 16, 16, generator=gen), reward, {"seed": str(i), "gold": gold}
        )

    return [
        PromptRow(p, [sample(i, "wrong") for i in range(2)], [sample(i, "ok") for i in range(2)])
        for p in PROMPTS
    ]


def _write_metrics(path: Path, n: int = 20) -> None:
    with path.open("w") as f:
        for step in range(n):
            f.write(json.dumps({"step": step, "reward_mean": 0.1 * step, "loss": 1.0 / (step + 1)}))
            f.write("\n\n" if step == 5 else "\n")  # a blank line must be tolerated


@pytest.fixture
def gallery(tmp_path):
    rows = _rows(torch.Generator().manual_seed(0))
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics)
    summary = {"reward before": 0.123456, "reward after": 0.654321, "method": "DDPO <lora>"}
    index = write_gallery(
        tmp_path / "site",
        rows,
        title="Gallery <test>",
        summary=summary,
        metrics_path=metrics,
        plot_keys=("reward_mean", "loss", "not_logged"),
    )
    return index, rows, summary


def test_images_resolve_and_are_upscaled(gallery):
    index, rows, _ = gallery
    assert index.is_file() and index.name == "index.html"
    page = _parse(index)
    # 12 samples + curves
    assert len(page.imgs) == 3 * 4 + 1
    for attrs in page.imgs:
        src = attrs["src"]
        assert src and not src.startswith(("/", "http:", "https:", "file:", "data:"))
        assert attrs.get("alt")
        target = index.parent / src
        assert target.suffix == ".png" and target.is_file()
        with Image.open(target) as im:
            assert im.format == "PNG"
            assert min(im.size) >= 128
            assert (int(attrs["width"]), int(attrs["height"])) == im.size


def test_page_is_self_contained(gallery):
    index, _, _ = gallery
    raw = index.read_text(encoding="utf-8")
    page = _parse(index)
    assert "script" not in page.tags
    assert "link" not in page.tags
    assert "http://" not in raw and "https://" not in raw
    assert "<style>" in raw


def test_text_is_escaped_and_present(gallery):
    index, rows, summary = gallery
    raw = index.read_text(encoding="utf-8")
    page = _parse(index)
    text = "".join(page.text)
    for p in PROMPTS:
        assert p in text
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot;" in raw
    assert "b" not in page.tags, "prompt markup must not be interpreted"
    assert "Gallery <test>" in text and "<test>" not in raw

    for row in rows:
        for side in (row.before, row.after):
            for s in side:
                assert f"{s.reward:.4g}" in text
                assert f"seed: {s.labels['seed']}" in text
            mean = sum(s.reward for s in side) / len(side)
            assert f"mean reward {mean:.4g}" in text
    assert "gold: ok" in text and "gold: wrong" in text

    assert "0.1235" in text and "0.6543" in text
    assert "DDPO <lora>" in text and "<lora>" not in raw


def test_curves_png_is_not_blank(gallery):
    index, _, _ = gallery
    curves = index.parent / "curves.png"
    assert curves.is_file()
    with Image.open(curves) as im:
        assert np.asarray(im.convert("L"), dtype=np.float32).std() > 0


def test_rewrite_overwrites_same_files(gallery, tmp_path):
    index, rows, summary = gallery
    site = index.parent
    before = sorted(p.relative_to(site) for p in site.rglob("*"))
    assert not [p for p in before if p.suffix == ".tmp"]
    again = write_gallery(site, rows, title="again", summary=summary,
                          metrics_path=tmp_path / "metrics.jsonl")
    assert again == index
    assert sorted(p.relative_to(site) for p in site.rglob("*")) == before
    assert "again" in "".join(_parse(index).text)


def test_pil_images_and_missing_rewards(tmp_path):
    img = Image.new("RGB", (32, 24), (10, 200, 30))
    index = write_gallery(
        tmp_path, [PromptRow("pil", [GallerySample(img)], [])], title="t", upscale_to=64
    )
    page = _parse(index)
    assert len(page.imgs) == 1
    with Image.open(tmp_path / page.imgs[0]["src"]) as im:
        assert im.size == (96, 72)  # whole-number factor 3 keeps pixels square
    assert "mean reward" not in "".join(page.text)
    assert not (tmp_path / "curves.png").exists()


def test_bad_tensor_shape_rejected(tmp_path):
    with pytest.raises(ValueError, match="3, H, W"):
        write_gallery(tmp_path, [PromptRow("x", [GallerySample(torch.rand(16, 16))], [])], title="t")


def test_read_metrics_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a": 1}\n\n{"step": 1, "a": \n{"step": 2, "a": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3"):
        read_metrics(path)
    path.write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(path)


def test_read_metrics_skips_blank_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    _write_metrics(path, n=8)
    records = read_metrics(path)
    assert [r["step"] for r in records] == list(range(8))


def test_plot_metrics_without_matching_keys_still_writes_png(tmp_path):
    out = plot_metrics([{"step": 0, "loss": 1.0}], ["reward_mean"], tmp_path / "sub" / "c.png")
    assert out.is_file()
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert np.asarray(im.convert("L"), dtype=np.float32).std() > 0  # the placeholder text
    assert plot_metrics([], [], tmp_path / "empty.png").is_file()


def test_more_grids_follow_the_two_sides_in_order(tmp_path):
    """A row with further grids (Ctrl-U's base | ControlNet++ | Ctrl-U | uncertainty): every grid is shown,
    headed by its name, in order, with its own files. Fails if `more` is dropped or overwrites a side's files."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    samples = [[GallerySample(Image.new("RGB", (8, 8), c), reward=float(k))] for k, c in enumerate(colours)]
    row = PromptRow("p", samples[0], samples[1], sides=("base", "plus"), more=[("ctrl_u", samples[2]),
                                                                               ("uncertainty", samples[3])])
    index = write_gallery(tmp_path, [row], title="t")
    page = _parse(index)
    assert [img["src"] for img in page.imgs] == [f"images/p000_{side}_00.png"
                                                 for side in ("base", "plus", "ctrl_u", "uncertainty")]
    for img, colour in zip(page.imgs, colours):
        with Image.open(tmp_path / img["src"]) as im:
            assert im.getpixel((0, 0)) == colour
    text = "".join(page.text)
    assert text.index("base") < text.index("plus") < text.index("ctrl_u") < text.index("uncertainty")
