"""Peak memory of one training step of each optimizer, on the same model and batch, each in a fresh process.

    zotune bench memory --config configs/addax-sentiment.yaml

The batch: the K0 longest training examples (all longer than L_T) and the K1 longest of those no longer
than L_T, from the recipe's Addax options. Addax runs its zeroth-order estimate on the long part and its
first-order step on the short part; Addax-WA, whose batches may hold any example, its first-order step on
the K1 longest examples (its worst case); every other optimizer a step on the whole batch; ``inference``
is one forward on the whole batch without gradients (the reference the ratios are taken to). MeZO-SVRG
(``svrg``: seeds mode; ``svrg-dense``: θ̃ and G stored) takes an anchor step, then an ordinary step;
``mezo-dual`` is MeZO with ``dual_forward`` (one forward over the batch stacked twice).

Measured: on CUDA the allocator's peak; on CPU the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after the model and data are loaded), over two steps so that buffers kept between
steps count. AdaMeZO runs with a window of 1, so its second step rebuilds moments (the window's memory
does not depend on its length). Writes memory.json, memory.md and memory.png into ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from .report import write_report

ENTRIES = ("inference", "mezo", "mezo-dual", "adamezo", "svrg", "svrg-dense", "addax", "addax-wa", "ip-sgd", "sgd",
           "adam")


def reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux ≥ 4.0)


def peak_bytes() -> int:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def current_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure(name: str, config_path: str | None, overrides: list[str]) -> dict:
    """One entry's peak, in this process (the parent runs each entry in a fresh one)."""
    from ..config import load_config
    from ..counter_rng import warm_up
    from ..lengths import ADDAX_DATA_OPTIONS, example_length, plan_addax
    from ..train import addax_step, build_optimizer, prepare, svrg_step, train_step

    config = load_config(config_path, overrides)
    data_options = {k: v for k, v in config.optimizer_options.items() if k in ADDAX_DATA_OPTIONS}
    config.optimizer = {"inference": "mezo", "mezo-dual": "mezo", "svrg-dense": "svrg"}.get(name, name)
    if name not in ("addax", "addax-wa"):
        config.optimizer_options = {k: v for k, v in config.optimizer_options.items() if k == "eps"}
    if name == "svrg-dense":
        config.optimizer_options["memory"] = "dense"
    elif name == "mezo-dual":
        config.optimizer_options["dual_forward"] = True
    elif name == "addax-wa":
        config.optimizer_options = {k: v for k, v in config.optimizer_options.items() if k not in ("L_T", "memory_budget")}
    if name == "adamezo":
        config.optimizer_options["window"] = 1
    prepared = prepare(config)
    model, pad, examples = prepared.model, prepared.tokenizer.pad_token_id, prepared.splits["train"]
    plan = plan_addax("addax", {k: v for k, v in data_options.items() if k in ("L_T", "K0", "K1")}, examples,
                      config.batch_size)
    by_length = lambda indices: sorted(indices, key=lambda i: example_length(examples[i]), reverse=True)  # noqa: E731
    long = [examples[i] for i in by_length(plan.split.long)[: plan.k0]]
    short = [examples[i] for i in by_length(plan.split.short)[: plan.k1]]
    if name == "addax-wa":
        short = [examples[i] for i in by_length(range(len(examples)))[: plan.k1]]
    whole = long + short
    model.train()
    optimizer = None if name == "inference" else build_optimizer(config, model)
    if name == "adamezo":  # past its plain warm-up steps, so that both measured steps rebuild the moments
        optimizer.state["zo"] = {**optimizer.state["zo"], "step": optimizer.plain_steps}
    # numba compiles the direction generator on its first call (LLVM holds tens of MB while it does, once per
    # cold cache): done before the baseline, so that the peak is the step's and not the compiler's.
    warm_up()
    baseline = current_bytes()
    reset_peak()
    for step in range(2):
        if name == "inference":
            with torch.inference_mode():
                prepared.loss(model, whole, pad)
        elif config.optimizer == "svrg":
            loss_fn = lambda: prepared.loss(model, whole, pad)  # noqa: E731
            svrg_step(optimizer, loss_fn, loss_fn if step == 0 else None, 1)
        elif name in ("addax", "addax-wa"):
            addax_step(optimizer, lambda: prepared.loss(model, long, pad), lambda: prepared.loss(model, short, pad),
                       (len(long), len(short)))
        else:
            train_step(optimizer, lambda copies=1: prepared.loss(model, whole, pad, copies), step)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(name=name, peak_bytes=peak_bytes(), baseline_bytes=baseline, parameter_bytes=parameters,
                batch=dict(long=[example_length(e) for e in long], short=[example_length(e) for e in short]),
                L_T=plan.split.threshold)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="zotune bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/addax-sentiment.yaml")
    parser.add_argument("--optimizers", default=",".join(ENTRIES), help=f"comma-separated, from {', '.join(ENTRIES)}")
    parser.add_argument("--out", default="results/memory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.config, args.overrides)))
        return
    names = args.optimizers.split(",")
    unknown = [n for n in names if n not in ENTRIES]
    if unknown:
        from ..config import ConfigError

        raise ConfigError(f"bench memory has no entry {unknown[0]!r}: choose from {', '.join(ENTRIES)}")
    results = {}
    for name in names:
        command = [sys.executable, "-m", "zotune.bench.memory", "--child", name, "--config", args.config, *args.overrides]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            sys.stderr.write(finished.stderr)
            raise SystemExit(f"zotune bench memory: the {name} measurement failed (exit code {finished.returncode})")
        results[name] = json.loads(finished.stdout.strip().splitlines()[-1])
        print(f"{name}: peak {results[name]['peak_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    reference = results.get("inference", next(iter(results.values())))
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    first = next(iter(results.values()))
    rows = [f"| {name} | {mib(r['peak_bytes'])} | {mib(r['peak_bytes'] - r['baseline_bytes'])} | "
            f"{r['peak_bytes'] / reference['peak_bytes']:.2f} |" for name, r in results.items()]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    table = "\n".join([
        f"peak memory of two steps; {device}; parameters {mib(first['parameter_bytes'])} MiB; batch: long "
        f"{first['batch']['long']} + short {first['batch']['short']} tokens (L_T={first['L_T']})", "",
        f"| optimizer | peak (MiB) | above the loaded model (MiB) | × {reference['name']} |", "|---|---|---|---|", *rows])
    write_report(Path(args.out), "memory", dict(results=results, command=sys.argv, device=device, torch=torch.__version__),
                 table, (list(results), [r["peak_bytes"] / 2**20 for r in results.values()],
                         dict(ylabel="peak memory (MiB)", title="one training step, same model and batch")))


if __name__ == "__main__":
    main()
