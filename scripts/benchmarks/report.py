"""The rows every benchmark returns, as a markdown table and a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

# Extra columns printed after the ratio when a row has them.
EXTRA_COLUMNS = ("peak_mib", "baseline_peak_mib", "ddpo_updates_per_s", "samples_per_s", "updates_per_s",
                 "vocoder_share", "embedding_share", "update_share", "cache_hits", "size_ratio", "linear_fit_error",
                 "compile_s", "max_abs_difference", "check")


def _format(value) -> str:
    return value if isinstance(value, str) else f"{value:.3g}"


def markdown(rows: list[dict]) -> str:
    lines = ["| benchmark | baseline | baseline s | ours s | ratio (ours / baseline) | extra |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        extra = ", ".join(f"{k}={_format(r[k])}" for k in EXTRA_COLUMNS if r.get(k) is not None)
        seconds = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        ratio = "" if r.get("ratio") is None else f"{r['ratio']:.3f}"
        lines.append(f"| {r['benchmark']} | {r['baseline']} | {seconds(r.get('baseline_s'))} | "
                     f"{seconds(r.get('ours_s'))} | {ratio} | {extra} |")
    return "\n".join(lines)


def write_json(path: str | Path, device: str, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"device": device, "rows": rows}, indent=2))
