"""Sequence logos of a set of equal-length sequences, drawn with matplotlib alone.

At each position the letters are stacked by frequency, and the stack is as tall as the position's information
content log2(V) − H (bits), so conserved positions stand out and uniform ones are flat. Long sequences wrap
into rows of `per_row` positions.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from typing import Sequence

from PIL import Image

# Classic nucleotide colours; amino acids by side-chain chemistry.
_DNA_COLOURS = {"A": "#2ca02c", "C": "#1f77b4", "G": "#ff9f0e", "T": "#d62728", "U": "#d62728"}
_AMINO_GROUPS = {
    "#1f77b4": "KRH",  # basic
    "#d62728": "DE",  # acidic
    "#2ca02c": "STNQ",  # polar
    "#7f7f7f": "AVLIMFWPGCY",  # hydrophobic and special
}
_AMINO_COLOURS = {letter: colour for colour, letters in _AMINO_GROUPS.items() for letter in letters}


def position_frequencies(sequences: Sequence[str], alphabet: str) -> list[dict[str, float]]:
    """Per position, each letter's frequency among `sequences` (all of one length)."""
    if not sequences:
        raise ValueError("a sequence logo needs at least one sequence")
    length = len(sequences[0])
    if any(len(s) != length for s in sequences):
        raise ValueError("a sequence logo needs sequences of one length; pad or crop them first")
    unknown = set("".join(sequences)) - set(alphabet)
    if unknown:
        raise ValueError(f"letters {sorted(unknown)} are not in the alphabet {alphabet!r}")
    columns = [Counter(s[i] for s in sequences) for i in range(length)]
    return [{a: column[a] / len(sequences) for a in alphabet} for column in columns]


def information_content(frequencies: dict[str, float]) -> float:
    """log2(V) − H(frequencies) in bits."""
    entropy = -sum(p * math.log2(p) for p in frequencies.values() if p > 0)
    return math.log2(len(frequencies)) - entropy


def sequence_logo(sequences: Sequence[str], alphabet: str, *, title: str = "", per_row: int = 100) -> Image.Image:
    """The logo of `sequences` as a PIL image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.patches import PathPatch
    from matplotlib.textpath import TextPath
    from matplotlib.transforms import Affine2D

    frequencies = position_frequencies(sequences, alphabet)
    colours = _DNA_COLOURS if set(alphabet) <= set("ACGTU") else _AMINO_COLOURS
    font = FontProperties(family="DejaVu Sans", weight="bold")
    glyphs = {a: TextPath((0, 0), a, size=1, prop=font) for a in alphabet}
    rows = math.ceil(len(frequencies) / per_row)
    top = math.log2(len(alphabet))
    # Figure + Agg canvas, not pyplot: no global backend switch and nothing left open.
    figure = Figure(figsize=(max(4.0, min(len(frequencies), per_row) * 0.12), 1.4 * rows + 0.4))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 1, squeeze=False)
    for r, ax in enumerate(axes[:, 0]):
        start = r * per_row
        for i, column in enumerate(frequencies[start : start + per_row]):
            height_total = information_content(column)
            y = 0.0
            for letter, p in sorted(column.items(), key=lambda item: item[1]):
                height = p * height_total
                if height <= 1e-3:
                    continue
                glyph = glyphs[letter]
                box = glyph.get_extents()
                transform = (Affine2D().translate(-box.x0, -box.y0).scale(0.9 / box.width, height / box.height)
                             .translate(start + i + 0.05, y))
                ax.add_patch(PathPatch(transform.transform_path(glyph), color=colours.get(letter, "#444444"), lw=0))
                y += height
        ax.set_xlim(start, start + min(per_row, len(frequencies)))
        ax.set_ylim(0, top)
        ax.set_ylabel("bits", fontsize=7)
        ax.tick_params(labelsize=6)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    if title:
        axes[0, 0].set_title(title, fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
