"""Whether each paper's claim holds at the scale this machine affords: ``zotune bench reproduce``.

    zotune bench reproduce --claim adamezo --budget-hours 2      # prints the plan, then runs within the budget
    zotune bench reproduce --claim all --plan                    # the plan only
    zotune bench reproduce --claim all --report docs/results.md  # the results document from the finished runs

For each claim (:mod:`zotune.bench.claims`): a grid per optimizer on dev (seed 0, the claim's ``grid_steps``),
the setting with the best dev metric chosen (never test), then that setting with every seed for
``final_steps``, each run testing its best-dev checkpoint (``select: best_dev``). Every run is a training run in
its own folder under ``--out`` (``<claim>/grid/<arm>@<value>``, ``<claim>/final/<arm>/seed<n>``), checkpointed,
so a suite stopped at any point (the budget, a signal, the machine) continues where it stopped when run again:
finished runs are kept, an unfinished one resumes from its newest checkpoint. ``--budget-hours`` starts no run
whose estimate would end past the budget.

The analysis, per claim, over the final runs: test and best dev (mean ± standard deviation over seeds), peak
memory, and the forward passes and seconds at which each run first reached MeZO's best dev metric (the lowest
of MeZO's seeds' best, the level every MeZO run reached, so that MeZO's own cost to it is finite); the verdict
rules are :func:`verdict`'s. ``--report`` writes the table (claim | the paper's figure
| ours | verdict), a paragraph per claim and the plots (dev metric against forward passes and against seconds,
one line per optimizer, a band of ± one standard deviation over seeds) beside the document.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import ConfigError
from .claims import CLAIMS, Arm, Claim
from .runs import dev_curve, ended, train_run

BASELINE = "mezo"


@dataclass
class Run:
    """One training run of a claim's suite: an arm's grid run at one value (seed 0), or a final run of its
    chosen setting with one seed, in its own folder."""

    claim: Claim
    arm: Arm
    phase: str  # "grid" or "final"
    value: object  # the grid key's value; None for a final run whose setting the grid has not chosen yet
    seed: int
    folder: Path

    @property
    def steps(self) -> int:
        return self.claim.grid_steps if self.phase == "grid" else self.claim.final_steps

    def overrides(self) -> list[str]:
        """The run's ``key=value`` overrides of the claim's recipe: the arm's optimizer and fixed overrides, the
        claim's, the grid value, the steps, a dev evaluation every ``eval_every`` steps and a checkpoint every
        two, ``select=best_dev``, the seed, and no export."""
        key, _ = self.arm.grid
        every = self.claim.eval_every
        return [
            "export=false",
            f"optimizer={self.arm.optimizer}",
            *self.arm.fixed,
            *self.claim.overrides,
            f"{key}={self.value}",
            f"steps={self.steps}",
            f"eval_every={every}",
            f"checkpoint_every={2 * every}",
            "select=best_dev",
            f"seed={self.seed}",
        ]


def _summary(folder: Path) -> dict | None:
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def chosen(claim: Claim, arm: Arm, out: Path):
    """The arm's grid value with the best dev metric (the first on ties), once every grid run has finished;
    the only value of an arm without a search; else None."""
    key, values = arm.grid
    if not arm.grid_search:
        return values[0]
    devs = []
    for value in values:
        summary = _summary(out / claim.name / "grid" / f"{arm.label}@{value}")
        if not ended(summary, claim.grid_steps):
            return None
        devs.append(summary["dev"])
    return values[devs.index(max(devs))]


def plan(claim: Claim, out: Path) -> list[Run]:
    """Every run of a claim, in the order they run: the grid runs of the arms that search, then each arm's
    final runs (their ``value`` None while the arm's grid has not finished)."""
    runs = []
    for arm in claim.arms:
        if arm.grid_search:
            runs += [Run(claim, arm, "grid", v, 0, out / claim.name / "grid" / f"{arm.label}@{v}") for v in arm.grid[1]]
    for arm in claim.arms:
        value = chosen(claim, arm, out)
        runs += [Run(claim, arm, "final", value, s, out / claim.name / "final" / arm.label / f"seed{s}") for s in claim.seeds]
    return runs


def seconds_per_step(claim: Claim, arm: Arm, out: Path) -> float:
    """Measured by the arm's finished runs in this suite, else the claim's estimate."""
    measured = []
    for summary_path in (out / claim.name).glob("**/summary.json"):
        config_path = summary_path.parent / "config.yaml"
        summary = json.loads(summary_path.read_text())
        if (
            config_path.is_file()
            and yaml.safe_load(config_path.read_text()).get("optimizer") == arm.optimizer
            and summary["steps"]
        ):
            measured.append(summary["seconds"] / summary["steps"])
    return statistics.mean(measured) if measured else arm.seconds_per_step


def status(run: Run) -> str:
    """``done`` (its summary reports the run's steps), ``partial`` (checkpoints, not finished) or ``to do``."""
    if ended(_summary(run.folder), run.steps):
        return "done"
    return "partial" if any(run.folder.glob("checkpoint-*")) else "to do"


def print_plan(runs: list[Run], out: Path) -> float:
    """Prints the runs as a Markdown table with each one's estimated minutes and status; returns the minutes
    the unfinished ones still need."""
    total = 0.0
    print("| claim | phase | optimizer | setting | seed | steps | estimate (min) | status |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        minutes = run.steps * seconds_per_step(run.claim, run.arm, out) / 60
        state = status(run)
        total += 0 if state == "done" else minutes
        setting = "chosen on dev" if run.value is None else f"{run.arm.grid[0]}={run.value}"
        print(
            f"| {run.claim.name} | {run.phase} | {run.arm.label} | {setting} | {run.seed} | {run.steps} | "
            f"{minutes:.0f} | {state} |"
        )
    print(f"\nremaining: about {total / 60:.1f} hours on this machine (estimates from the finished runs where there are any)")
    return total


def execute(claims: list[Claim], out: Path, budget_hours: float | None) -> bool:
    """Runs what the plans name, in order, within the budget; True when every run has finished."""
    started = time.monotonic()
    for claim in claims:
        while True:
            pending = [run for run in plan(claim, out) if status(run) != "done" and run.value is not None]
            if not pending:
                break
            run = pending[0]
            estimate = run.steps * seconds_per_step(claim, run.arm, out)
            if budget_hours is not None and time.monotonic() - started + estimate > budget_hours * 3600:
                print(f"zotune: budget reached before {run.folder}; run the same command again to continue", file=sys.stderr)
                return False
            label = f"{claim.name} {run.phase} {run.arm.label} {run.arm.grid[0]}={run.value} seed {run.seed}"
            print(f"zotune: {label} ({run.steps} steps)", file=sys.stderr)
            train_run(claim.config, run.overrides(), run.folder, resume=True, label=label)
    return True


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def first_at(curve: list[tuple[float, int, float]], target: float):
    """(forward passes, seconds) of the first evaluation at or above ``target``; None if never."""
    return next(((passes, seconds) for value, passes, seconds in curve if value >= target - 1e-12), None)


def at_first_evaluation(curve: list[tuple[float, int, float]], reached) -> bool:
    """Whether ``reached`` (``first_at``'s answer for the curve) is the first evaluation after training began
    (or before it): then the passes and seconds to the target are only an upper bound, set by how often dev
    is evaluated."""
    first = next((passes for _, passes, _ in curve if passes > 0), None)
    return reached is not None and first is not None and reached[0] <= first


def analyse(claim: Claim, out: Path) -> dict | None:
    """Per arm over its final runs: test, best dev, peak memory, and passes/seconds to MeZO's best dev;
    None until every final run has finished."""
    finals = [run for run in plan(claim, out) if run.phase == "final"]
    if any(status(run) != "done" for run in finals):
        return None
    arms: dict[str, dict] = {}
    for run in finals:
        summary = _summary(run.folder)
        records = [json.loads(line) for line in (run.folder / "metrics.jsonl").read_text().splitlines()]
        entry = arms.setdefault(run.arm.label, dict(setting=f"{run.arm.grid[0]}={run.value}", runs=[]))
        entry["runs"].append(
            dict(
                seed=run.seed,
                test=summary["test"],
                dev=summary["dev"],
                curve=dev_curve(records),
                peak_memory_mb=summary["peak_memory_mb"],
                seconds=summary["seconds"],
            )
        )
    target = min(r["dev"] for r in arms[BASELINE]["runs"])  # reached by every MeZO seed (a mean is not)
    for entry in arms.values():
        for r in entry["runs"]:
            r["reached"] = first_at(r["curve"], target)
            r["at_first_evaluation"] = at_first_evaluation(r["curve"], r["reached"])
        entry["test"] = _mean_sd([r["test"] for r in entry["runs"]])
        entry["dev"] = _mean_sd([r["dev"] for r in entry["runs"]])
        entry["peak_memory_mb"] = statistics.mean(r["peak_memory_mb"] for r in entry["runs"])
        reached = [r["reached"] for r in entry["runs"]]
        entry["reached_all"] = all(reached)
        entry["at_first_evaluation"] = all(r["at_first_evaluation"] for r in entry["runs"])
        entry["passes_to_target"] = statistics.mean(p for p, _ in reached) if all(reached) else math.inf
        entry["seconds_to_target"] = statistics.mean(s for _, s in reached) if all(reached) else math.inf
    metric = _summary(finals[0].folder)["metric"]
    return dict(claim=claim.name, metric=metric, target=target, arms=arms, verdict=verdict(claim, arms))


def verdict(claim: Claim, arms: dict) -> tuple[str, str]:
    """(holds | does not hold | inconclusive, why), from the final runs' statistics (see :class:`Claim`).

    Accuracy is *better* when the mean test difference to MeZO exceeds twice its standard error over seeds,
    *worse* when it is below minus twice that, else *level*. *Sooner*: the method's mean forward passes or
    seconds to MeZO's best dev metric (every seed reaching it) over MeZO's own. The claim holds when accuracy is
    better (or, where the claim asks no more, not worse), the ratio is within ``max_ratio`` (below 1 where that
    is 1) and the memory bound is met; it does not hold when accuracy is worse or the method is not sooner
    (ratio ≥ 1 where the claim says sooner); else it is inconclusive.
    """
    m, b = arms[claim.method], arms[BASELINE]
    diff = m["test"][0] - b["test"][0]
    se = math.sqrt(m["test"][1] ** 2 / len(m["runs"]) + b["test"][1] ** 2 / len(b["runs"]))
    accuracy = "better" if diff > 2 * se and diff > 0 else "worse" if diff < -2 * se and diff < 0 else "level"
    unit = f"{claim.sooner}_to_target"
    ratio = m[unit] / b[unit] if b[unit] not in (0, math.inf) else math.inf
    why = f"test {diff * 100:+.1f} points (±{2 * se * 100:.1f}), {accuracy}; {claim.sooner} to MeZO's best dev ×{ratio:.2f}"
    memory_ok = True
    if claim.memory is not None:
        arm, bound = claim.memory
        if arm == BASELINE:
            memory = m["peak_memory_mb"] / b["peak_memory_mb"]
            why += f"; memory ×{memory:.2f} MeZO's"
            memory_ok = memory <= bound
        else:
            memory = arms[arm]["peak_memory_mb"] / m["peak_memory_mb"]
            why += f"; {arm}'s memory ×{memory:.2f} its"
            memory_ok = memory >= bound
    sooner = ratio < 1 if claim.max_ratio >= 1 else ratio <= claim.max_ratio
    good_accuracy = accuracy == "better" if claim.better else accuracy != "worse"
    if good_accuracy and sooner and memory_ok:
        return "holds", why
    if accuracy == "worse" or ratio >= 1:
        return "does not hold", why
    return "inconclusive", why


def report(claims: list[Claim], out: Path, document: Path) -> None:
    """``document`` (markdown) with the table over the claims, a paragraph each, and the plots beside it."""
    rows, sections = [], []
    for claim in claims:
        result = analyse(claim, out)
        if result is None:
            rows.append(f"| {claim.name} | {claim.paper} | not run to the end yet | — |")
            sections.append(
                f"### {claim.name}\n\nThe final runs have not all finished: `zotune bench reproduce "
                f"--claim {claim.name}` continues them. At the papers' scale: {claim.gpu_recipe}.\n"
            )
            continue
        (out / claim.name / "results.json").write_text(json.dumps(result, indent=2))
        image = document.parent / "results" / f"{claim.name}.png"
        _plot(result, image)
        verdict_text, why = result["verdict"]
        rows.append(f"| {claim.name} | {claim.paper} | {why} ({_scale(claim)}) | {verdict_text} |")
        lines = [
            f"### {claim.name}",
            "",
            f"{_scale(claim)}; target: MeZO's best dev {result['metric']} "
            f"{result['target']:.3f} (the lowest of its seeds' best, reached by every MeZO run). At the papers' scale: {claim.gpu_recipe}.",
            "",
            "| optimizer | setting | test | best dev | forward passes to target | seconds to target | peak memory (MiB) |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, entry in result["arms"].items():
            lines.append(
                f"| {label} | {entry['setting']} | {entry['test'][0]:.3f} ± {entry['test'][1]:.3f} | "
                f"{entry['dev'][0]:.3f} ± {entry['dev'][1]:.3f} | {_shown(entry['passes_to_target'])} | "
                f"{_shown(entry['seconds_to_target'])} | {entry['peak_memory_mb']:.0f} |"
            )
        if result["arms"][claim.method]["at_first_evaluation"]:
            lines += [
                "",
                f"Every {claim.method} run reached the target at its first dev evaluation (dev is evaluated every "
                f"{claim.eval_every} steps), so its {claim.sooner} to the target, and the ratio to MeZO's, are upper bounds.",
            ]
        if verdict_text != "holds" and claim.scale_gap:
            lines += ["", f"Why this scale may differ from the paper's: {claim.scale_gap}"]
        lines += ["", f"![{claim.name}](results/{claim.name}.png)", ""]
        sections.append("\n".join(lines))
    command = "zotune bench reproduce --claim all"
    text = "\n".join(
        [
            "# Results: the papers' claims at this machine's scale",
            "",
            f"Made by `{command}` (the runs) and `{command} --report {document}` (this page); the protocol and the "
            "verdict rules are in `zotune/bench/reproduce.py` and `zotune/bench/claims.py`: a learning-rate grid "
            "per optimizer on dev, 3 seeds of the chosen setting, each testing its best-dev checkpoint.",
            "",
            "| claim | the paper's figure | ours | verdict |",
            "|---|---|---|---|",
            *rows,
            "",
            *sections,
        ]
    )
    document.parent.mkdir(parents=True, exist_ok=True)
    document.write_text(text + "\n")


def _scale(claim: Claim) -> str:
    return f"{claim.config}, {claim.final_steps} steps, {len(claim.seeds)} seeds"


def _shown(value: float) -> str:
    return "not reached" if math.isinf(value) else f"{value:.0f}"


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, entry in result["arms"].items():
        curves = [r["curve"] for r in entry["runs"]]
        points = min(len(c) for c in curves)
        for axis, column in zip(axes, (1, 2)):
            xs = [statistics.mean(c[i][column] for c in curves) for i in range(points)]
            stats = [_mean_sd([c[i][0] for c in curves]) for i in range(points)]
            axis.plot(xs, [m for m, _ in stats], marker="o", label=label)
            axis.fill_between(xs, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
    axes[0].set(xlabel="forward passes", ylabel=f"dev {result['metric']}")
    axes[1].set(xlabel="training seconds", ylabel=f"dev {result['metric']}")
    for axis in axes:
        axis.axhline(result["target"], color="grey", linestyle=":")
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None):
    """``zotune bench reproduce``: prints each claim's plan and runs it within ``--budget-hours``; with ``--plan``
    only prints it; with ``--report`` writes the results document from the finished runs. ``argv``: the
    arguments after ``reproduce`` (None: ``sys.argv[1:]``).

    Raises:
        ConfigError: for an unknown claim, or when a run fails.
    """
    parser = argparse.ArgumentParser(prog="zotune bench reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--claim", required=True, help=f"one of {', '.join(CLAIMS)}, or all")
    parser.add_argument("--out", default="results/reproduce")
    parser.add_argument("--budget-hours", type=float, help="start no run that would end past this many hours")
    parser.add_argument("--plan", action="store_true", help="print the plan and stop")
    parser.add_argument("--report", help="write the results document (markdown) from the finished runs")
    args = parser.parse_args(argv)
    if args.claim != "all" and args.claim not in CLAIMS:
        raise ConfigError(f"bench reproduce has no claim {args.claim!r}: choose one of {', '.join(CLAIMS)}, or all")
    claims = list(CLAIMS.values()) if args.claim == "all" else [CLAIMS[args.claim]]
    out = Path(args.out)
    if args.report:
        report(claims, out, Path(args.report))
        return
    for claim in claims:
        print_plan(plan(claim, out), out)
    if not args.plan:
        execute(claims, out, args.budget_hours)
