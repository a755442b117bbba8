"""Peak memory of one training step of each optimizer, on the same model and batch, each in a fresh process.

    zotune bench memory --config configs/addax-sentiment.yaml

The batch: the K0 longest training examples (all longer than L_T) and the K1 longest of those no longer
than L_T, from the recipe's Addax options. Addax runs its zeroth-order estimate on the long part and its
first-order step on the short part; Addax-WA, whose batches may hold any example, its first-order step on
the K1 longest examples (its worst case); every other optimizer a step on the whole batch; ``inference``
is one forward on the whole batch without gradients (the reference the ratios are taken to). The
entries are every registered optimizer with its defaults and each variant it declares (``mezo-dual``:
``dual_forward``; ``svrg-dense``: θ̃ and G stored), each taking the steps its own data plan names
(MeZO-SVRG an anchor step on the batch, then an ordinary step).

Measured: on CUDA the allocator's peak; on CPU the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after the model and data are loaded), over two steps so that buffers kept between
steps count. Each optimizer starts past its warm-up (``skip_warm_up``: AdaMeZO's plain MeZO steps), so
both steps are steady ones. Writes memory.json, memory.md and memory.png into ``--out``.
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


def entries() -> dict[str, tuple[str, dict] | None]:
    """``inference`` (no optimizer), every registered optimizer and alias with its default options, and each
    optimizer's declared ``variants`` as ``name-variant``: entry name -> (optimizer name, options)."""
    from ..optim import ALIASES, OPTIMIZERS

    found: dict[str, tuple[str, dict] | None] = {"inference": None}
    for name in [*OPTIMIZERS, *ALIASES]:
        found[name] = (name, {})
        for variant, options in OPTIMIZERS[name].variants.items() if name in OPTIMIZERS else ():
            found[f"{name}-{variant}"] = (name, options)
    return found


def reset_peak() -> None:
    """Starts a new peak, after a garbage collection: the CUDA allocator's when a GPU is present, else the
    process's peak resident set (VmHWM)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux ≥ 4.0)


def peak_bytes() -> int:
    """The peak since :func:`reset_peak`: the CUDA allocator's when a GPU is present, else the process's VmHWM."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def current_bytes() -> int:
    """What is held now: the CUDA allocator's allocated bytes when a GPU is present, else the process's resident
    set (VmRSS)."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure(name: str, config_path: str | None, overrides: list[str]) -> dict:
    """One entry's peak, in this process (the parent runs each entry in a fresh one)."""
    from ..config import load_config
    from ..counter_rng import warm_up
    from ..lengths import example_length, plan_addax
    from ..optim import resolve
    from ..train import build_optimizer, prepare, split_options

    config = load_config(config_path, overrides)
    recipe_options = dict(config.optimizer_options)
    length_options = {k: v for k, v in recipe_options.items() if k in ("L_T", "K0", "K1")}
    entry = entries()[name]
    optimizer_name, variant = entry if entry is not None else (config.optimizer, {})  # inference builds none
    cls, _ = resolve(optimizer_name)
    config.optimizer = optimizer_name
    # The recipe's eps and the entry's variant; the rest are defaults. The batches are the worst case below,
    # whatever the data plan would draw, so the plan only names them.
    config.optimizer_options = {**{k: v for k, v in recipe_options.items() if k == "eps"}, **variant}
    prepared = prepare(config)
    model, examples = prepared.model, prepared.splits["train"]
    plan = plan_addax(length_options, examples, config.batch_size)
    by_length = lambda indices: sorted(indices, key=lambda i: example_length(examples[i]), reverse=True)  # noqa: E731
    long = [examples[i] for i in by_length(plan.split.long)[: plan.k0]]
    short = [examples[i] for i in by_length(plan.split.short)[: plan.k1]]
    whole = long + short

    def loss(batch, copies=1):
        return prepared.loss(model, batch, prepared.tokenizer.pad_token_id, copies)

    model.train()
    optimizer, batches = None, {}
    if entry is not None:
        optimizer = build_optimizer(config, model)
        optimizer.skip_warm_up()
        sampler = cls.data_plan(examples, config.batch_size, split_options(config)[1], config.seed)
        # The worst case of each batch the optimizer's plan names: the long part, the short part (from the
        # bucket that plan draws it from), or both for a step on one batch.
        k1_bucket = getattr(getattr(sampler, "split", None), "short", plan.split.short)
        worst = {"K0 batch": long, "K1 batch": [examples[i] for i in by_length(k1_bucket)[: plan.k1]]}
    # numba compiles the direction generator on its first call (LLVM holds tens of MB while it does, once per
    # cold cache): done before the baseline, so that the peak is the step's and not the compiler's.
    warm_up()
    baseline = current_bytes()
    reset_peak()
    for _ in range(2):
        if optimizer is None:
            with torch.inference_mode():
                loss(whole)
            continue
        batches = {batch: worst.get(batch, whole) for batch in sampler.next_batches(optimizer)}
        optimizer.train_step(batches, loss, len(whole))
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    shown = {"long": batches.get("K0 batch", long), "short": batches.get("K1 batch", short)}
    return dict(
        name=name,
        peak_bytes=peak_bytes(),
        baseline_bytes=baseline,
        parameter_bytes=parameters,
        batch={part: [example_length(e) for e in shown[part]] for part in shown},
        L_T=plan.split.threshold,
    )


def main(argv=None):
    """``zotune bench memory``: measures each entry of ``--optimizers`` in a fresh process (this module with
    ``--child``, which prints one entry's measurement as JSON), then writes and prints the table. ``argv``:
    the arguments after ``memory`` (None: ``sys.argv[1:]``).

    Raises:
        ConfigError: for an unknown entry.
        SystemExit: when a measurement fails (its output is shown).
    """
    parser = argparse.ArgumentParser(prog="zotune bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/addax-sentiment.yaml")
    known = entries()
    parser.add_argument("--optimizers", default=",".join(known), help=f"comma-separated, from {', '.join(known)}")
    parser.add_argument("--out", default="results/memory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.config, args.overrides)))
        return
    names = args.optimizers.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        from ..config import ConfigError

        raise ConfigError(f"bench memory has no entry {unknown[0]!r}: choose from {', '.join(known)}")
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
    rows = [
        f"| {name} | {mib(r['peak_bytes'])} | {mib(r['peak_bytes'] - r['baseline_bytes'])} | "
        f"{r['peak_bytes'] / reference['peak_bytes']:.2f} |"
        for name, r in results.items()
    ]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    table = "\n".join(
        [
            f"peak memory of two steps; {device}; parameters {mib(first['parameter_bytes'])} MiB; batch: long "
            f"{first['batch']['long']} + short {first['batch']['short']} tokens (L_T={first['L_T']})",
            "",
            f"| optimizer | peak (MiB) | above the loaded model (MiB) | × {reference['name']} |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    write_report(
        Path(args.out),
        "memory",
        dict(results=results, command=sys.argv, device=device, torch=torch.__version__),
        table,
        (
            list(results),
            [r["peak_bytes"] / 2**20 for r in results.values()],
            dict(ylabel="peak memory (MiB)", title="one training step, same model and batch"),
        ),
    )


if __name__ == "__main__":
    main()
