"""The demo behind ``make demo``: fine-tune a tiny random Llama with MeZO and with IP-SGD.

Both optimizers fit the same fixed batch of token sequences from the same starting weights; the demo
prints the loss before and after each, and writes ``config.json`` (the resolved settings) and
``metrics.jsonl`` (one line per logged step) into the run folder. Until the training harness lands
this is the library's end-to-end check that a zeroth-order optimizer really learns.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .models import random_llama
from .optim import create_optimizer

# ZO needs far more (but cheaper, backward-free) steps than first-order methods, as in the papers.
RECIPES = {
    "mezo": dict(steps=3000, hyperparameters=dict(lr=1e-3, eps=1e-3, seed=0)),
    "ip-sgd": dict(steps=300, hyperparameters=dict(lr=0.3)),
}


def sequence_loss(model, input_ids):
    logits = model(input_ids=input_ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def fine_tune(name, steps, input_ids, metrics_file, log_every):
    model = random_llama("tiny", seed=0)
    optimizer = create_optimizer(name, model, **RECIPES[name]["hyperparameters"])
    with torch.no_grad():
        initial = sequence_loss(model, input_ids).item()
    start = time.perf_counter()
    progress = tqdm(range(1, steps + 1), desc=name, unit="step")
    for step in progress:
        loss = optimizer.step(lambda: sequence_loss(model, input_ids))
        if step % log_every == 0 or step == steps:
            progress.set_postfix(loss=f"{loss:.3f}")
            record = dict(optimizer=name, step=step, loss=loss, seconds=time.perf_counter() - start)
            metrics_file.write(json.dumps(record) + "\n")
    with torch.no_grad():
        final = sequence_loss(model, input_ids).item()
    return initial, final


def main(argv=None):
    parser = argparse.ArgumentParser(description="MeZO and IP-SGD on a tiny random Llama")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every recipe's steps")
    parser.add_argument("--run-dir", default="runs/demo")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recipes = {name: {**r, "steps": max(1, round(r["steps"] * args.steps_scale))} for name, r in RECIPES.items()}
    config = dict(model="tiny random Llama (zotune.models.random_llama('tiny'))", batch=[8, 16], optimizers=recipes)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    input_ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    results = {}
    with open(run_dir / "metrics.jsonl", "w") as metrics_file:
        for name, recipe in recipes.items():
            results[name] = fine_tune(name, recipe["steps"], input_ids, metrics_file, log_every=10)
    print(f"\nloss on the training batch (run folder: {run_dir})")
    for name, (initial, final) in results.items():
        print(f"  {name:7s} {recipes[name]['steps']:5d} steps: {initial:.3f} -> {final:.3f}")


if __name__ == "__main__":
    main()
