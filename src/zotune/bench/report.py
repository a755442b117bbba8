"""What every benchmark writes: JSON, a Markdown table (also printed) and a PNG."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: Path, name: str, data, table: str, bars: tuple[list[str], list[float], dict]) -> None:
    """``out/name.json`` (``data``), ``out/name.md`` (``table``, printed too) and ``out/name.png``, a bar chart
    of ``bars`` = (labels, values, matplotlib axis settings)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))
    (out / f"{name}.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, settings = bars
    figure, axis = plt.subplots(figsize=(max(5, 0.45 * len(labels) + 2), 4.5))
    axis.bar(labels, values)
    axis.set(**settings)
    plt.setp(axis.get_xticklabels(), rotation=45, ha="right")  # long optimizer names side by side
    figure.tight_layout()
    figure.savefig(out / f"{name}.png", dpi=100)
    plt.close(figure)
    print(table)
