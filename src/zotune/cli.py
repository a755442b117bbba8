"""``zotune train | eval | data | bench``."""

from __future__ import annotations

import argparse
import os
import sys

# Spinning OpenMP workers steal a core from the direction threads after every parallel region (a
# 135M-value sweep: 0.55 s spinning, 0.37 s passive on 2 cores). libgomp reads this when torch loads,
# which is why it is set here, before any zotune module that imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    """The ``zotune`` command: ``train``, ``eval``, ``export``, ``data fetch`` and ``bench`` (each benchmark's own
    ``main`` takes the arguments after its name).

    Args:
        argv: the arguments after ``zotune``; None: ``sys.argv[1:]``.

    Returns:
        The exit status: 0, 2 after a one-line message for a zotune error, or 128 + the signal's number for a run
        stopped by SIGINT or SIGTERM after saving its step.
    """
    parser = argparse.ArgumentParser(prog="zotune", description="Zeroth-order and hybrid fine-tuning of language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    from .config import key_help

    train = commands.add_parser(
        "train", help="fine-tune a model on a task", epilog=key_help(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    train.add_argument("--config", help="YAML recipe (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys (a.b=v inside dicts)")
    train.add_argument(
        "--force-resume",
        action="store_true",
        help="resume a run folder's checkpoints even though the run's defining settings differ",
    )
    train.add_argument(
        "--dry-run", action="store_true", help="resolve and check the recipe without loading the model or the data, then exit"
    )

    evaluate = commands.add_parser("eval", help="accuracy of a model (zero-shot) or a checkpoint")
    evaluate.add_argument("--config", help="YAML recipe for model, task and data")
    evaluate.add_argument("--checkpoint", help="a checkpoint-NNNNNN.pt of a run")
    evaluate.add_argument("--split", default="test", choices=["train", "dev", "test"])
    evaluate.add_argument("overrides", nargs="*", metavar="key=value")

    exporting = commands.add_parser("export", help="a checkpoint as a Hugging Face folder (from_pretrained, peft)")
    exporting.add_argument("--checkpoint", required=True, help="a checkpoint-NNNNNN.pt of a run")
    exporting.add_argument("--out", required=True, help="the folder to write")

    data = commands.add_parser("data", help="fetch offline data")
    data.add_argument("action", choices=["fetch"])
    data.add_argument("source", choices=["bigbench"])
    data.add_argument("--sdist", help="a local bigbench-1.0.0.tar.gz instead of downloading it from PyPI")

    bench = commands.add_parser("bench", help="benchmarks", add_help=False)
    bench.add_argument("name", choices=["speed", "memory", "convergence", "parallel", "reproduce"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    from .errors import ZotuneError

    try:
        return _run(args)
    except ZotuneError as error:
        interrupted = hasattr(error, "exit_code")  # SIGINT/SIGTERM after a saved step: not an error
        print(f"zotune: {'stopped' if interrupted else 'error'}: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)


def _run(args) -> int:
    if args.command == "train":
        from .config import load_config
        from .train import train

        config = load_config(args.config, args.overrides)
        if args.dry_run:
            from .dry_run import dry_run

            print("\n".join(dry_run(config)))
            return 0
        summary = train(config, force_resume=args.force_resume)
        if summary is not None:  # None on the ranks of a distributed run but the first
            chosen = f", step {summary['selected_step']} selected by dev" if config.select == "best_dev" else ""
            print(
                f"{config.optimizer} on {config.task} ({summary['metric']}): zero-shot dev "
                f"{_pct(summary['zero_shot_dev'])}, "
                f"after {summary['steps']} steps dev {_pct(summary['dev'])}{chosen}, test {_pct(summary['test'])} "
                f"(run folder {config.output_dir})"
            )
    elif args.command == "eval":
        from .config import load_config
        from .train import evaluate_model

        config = load_config(args.config, args.overrides)
        name, value = evaluate_model(config, args.checkpoint, args.split)
        print(f"{args.split} {name} of {args.checkpoint or config.model} on {config.task}: {_pct(value)}")
    elif args.command == "export":
        from pathlib import Path

        from .export import export_checkpoint

        print(f"wrote {export_checkpoint(Path(args.checkpoint), Path(args.out))}")
    elif args.command == "data":
        from pathlib import Path

        from .tasks import bigbench

        counts = bigbench.fetch(Path(args.sdist) if args.sdist else None)
        for name, sizes in counts.items():
            print(f"{name}: {sizes} -> {bigbench.full_data_dir() / name}")
    elif args.command == "bench":
        from importlib import import_module

        import_module(f"zotune.bench.{args.name}").main(args.rest)
    return 0


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
