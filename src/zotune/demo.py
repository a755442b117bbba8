"""The demo behind ``make demo``: SmolLM2-135M on the offline sentiment task, zero-shot and fine-tuned.

Runs the recipes ``configs/demo-sentiment-ipsgd.yaml`` (first-order, in-place SGD) and
``configs/demo-sentiment-mezo.yaml`` (zeroth-order) one after the other, each from the pretrained model,
then prints zero-shot and fine-tuned accuracy side by side and writes them to ``runs/demo.md``. Each run
folder holds its config, metrics, checkpoint and plot. ``key=value`` arguments override both recipes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see zotune.cli; must precede the torch import

RECIPES = ("configs/demo-sentiment-ipsgd.yaml", "configs/demo-sentiment-mezo.yaml")


def main(argv: list[str] | None = None) -> None:
    from .config import load_config
    from .train import train

    overrides = sys.argv[1:] if argv is None else argv
    rows = []
    for recipe in RECIPES:
        config = load_config(Path(recipe), overrides)
        summary = train(config)
        seconds = summary["seconds"]
        rows.append(f"| {config.optimizer} | {config.steps} | {seconds:.0f} | {100 * summary['zero_shot_dev']:.1f}% "
                    f"| {100 * summary['dev']:.1f}% | {100 * summary['test']:.1f}% | {config.output_dir} |")
    table = "\n".join([
        f"{config.model} on {config.task} ({config.num_dev} dev / {config.num_test} test examples)", "",
        "| optimizer | steps | train seconds | zero-shot dev | fine-tuned dev | fine-tuned test | run folder |",
        "|---|---|---|---|---|---|---|", *rows])
    Path("runs").mkdir(exist_ok=True)
    Path("runs/demo.md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
