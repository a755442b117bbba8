"""Step and evaluation time on a real batch of a task: the packed scorer against one sequence per candidate.

    zotune bench speed --task bigbench-sentiment --batch 16 --max-length 48 --threads 2
    zotune bench speed --task bigbench-nli --model random:tiny --optimizers mezo,sgd   # a quick look

The model, the task and the batch come from a run's config (``--config`` and ``key=value`` overrides, as
for ``zotune train``), and every optimizer of the registry takes steps on the batches its own data plan
draws, through the real loss closure of the task (the lm head's), scored three ways, side by side in one
process over ``--repeats`` rounds after a warm-up round:

- **packed**: each prompt runs once for all its candidates (:mod:`zotune.packing`), what training uses;
- **separate**: one sequence per candidate, logits at the candidates' positions
  (:func:`zotune.scoring.separate_candidate_scores`), the scoring before packing;
- **reference**: as MeZO's code computes the loss: one sequence per candidate with logits over every
  position and the whole vocabulary, in a reference MeZO step (global reseed, ``torch.normal``
  per parameter, four passes over the parameters; :func:`zotune.bench.speed.reference_mezo_step`);
- **cached** (its forward always; the steps with ``--cached``): the prompts in one model call, the candidates
  from their KV cache in a second (:mod:`zotune.cached_scoring`), the other way of running a prompt once.

Each optimizer's steps (packed and separate, on the same batches) are timed within rounds against the packed
forward over the batches MeZO's plan draws for its steps (the reference step runs on those batches too), as :func:`zotune.bench.speed.bracketed_timings` does; the table gives each step's time and the
speed-up of packing. Dev-set evaluation (``--eval-examples`` examples) is timed as the trainer runs it
(batches of similar lengths, packed) and as before (in order, separate). Writes ``task_speed.json`` and
``task_speed.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from functools import partial
from pathlib import Path

import torch

from ..config import ConfigError
from ..cached_scoring import cached_candidate_scores
from ..scoring import accuracy, candidate_means, candidate_scores, one_row_per_candidate, separate_candidate_scores
from .report import write_report
from .speed import bracketed_timings, reference_mezo_step, spread

SCORERS = ("packed", "separate")  # the steps' scorers; --cached adds "cached"
STEPS = 2  # an item: two steps from the same sampler state


def reference_scores(model, examples, pad_id) -> torch.Tensor:
    """Candidate scores as MeZO's code computes them: every candidate its own sequence, the model's full
    logits over every position and the whole vocabulary, then the candidate's tokens picked out."""
    input_ids, attention, (rows, positions, targets) = one_row_per_candidate(examples, pad_id, next(model.parameters()).device)
    log_probs = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits.float(), dim=-1)
    return candidate_means(examples, rows, log_probs[rows, positions, targets])


def in_order_accuracy(model, examples, pad_id, batch_size) -> float:
    """Evaluation as it was before length buckets and packing: batches in the split's order, one sequence per
    candidate."""
    with torch.inference_mode():
        correct = 0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            predictions = separate_candidate_scores(model, chunk, pad_id).argmax(dim=1).tolist()
            correct += sum(p == example.label for p, example in zip(predictions, chunk))
    return correct / len(examples)


def run(config, names: list[str], repeats: int, eval_examples: int, cached: bool = False) -> dict:
    """Times the forwards, the steps of the optimizers ``names`` and the dev evaluation on the task's real
    batch (see the module docstring); returns what ``task_speed.json`` holds and :func:`markdown` shows.

    Args:
        config (TrainConfig): the run's config (model, task, batch size, lengths); its ``optimizer`` and
            ``optimizer_options`` are set to each optimizer's in turn, and left at the last one's.
        names: optimizer names of the registry.
        repeats: the timed rounds, after a warm-up round.
        eval_examples: how many dev examples the evaluation is timed on.
        cached: also time every step with the KV-cache scorer.

    Raises:
        ConfigError: for a head other than ``lm``.
    """
    from ..optim import OPTIMIZERS
    from ..train import build_optimizer, prepare, split_options

    if config.head != "lm":
        raise ConfigError(
            f"bench speed --task compares ways of scoring candidates (head=lm); head={config.head} scores labels: set head=lm"
        )
    prepared = prepare(config)
    model, pad = prepared.model, prepared.tokenizer.pad_token_id
    train, dev = prepared.splits["train"], prepared.splits["dev"][:eval_examples]
    # The baseline forward and the reference step run on the batches a one-batch plan (MeZO's) draws for
    # an item's steps, so that a step and its baseline see the same examples.
    plan = OPTIMIZERS["mezo"].data_plan(train, config.batch_size, {}, config.seed)
    drawn = [plan.next_batch() for _ in range(STEPS)]
    batches = [[train[i] for i in indices] for indices in drawn]
    scorers = dict(packed=candidate_scores, separate=separate_candidate_scores, cached=cached_candidate_scores)
    timed = (*SCORERS, "cached") if cached else SCORERS
    losses = {name: partial(prepared.loss, scorer=scorer) for name, scorer in scorers.items()}
    model.train()

    def loss_with(name):
        return lambda examples, copies=1: losses[name](model, examples, pad, copies)

    @torch.no_grad()
    def forward(name="packed"):
        for examples in batches:
            losses[name](model, examples, pad)

    reference_loss = partial(prepared.loss, scorer=reference_scores)

    @torch.no_grad()
    def reference_forward():
        for examples in batches:
            reference_loss(model, examples, pad)

    params = [p for p in model.parameters() if p.requires_grad]
    seeds = iter(range(10**9))
    eps = config.optimizer_options.get("eps", 1e-3)

    @torch.no_grad()
    def reference_step():
        for examples in batches:
            reference_mezo_step(params, lambda examples=examples: reference_loss(model, examples, pad), next(seeds), 0.0, eps)

    actions = {
        "separate forward": lambda: forward("separate"),
        "cached forward": lambda: forward("cached"),
        "reference forward": reference_forward,
        "reference MeZO step": reference_step,
    }
    _, ratios = bracketed_timings(forward, actions, repeats)
    results = {"forward": {name: spread(values) for name, values in ratios.items()}}

    steps = {}
    for name in names:
        config.optimizer, config.optimizer_options = (
            name,
            {"large_batch": config.batch_size} if "large_batch" in OPTIMIZERS[name].data_options else {},
        )
        optimizer = build_optimizer(config, model)
        optimizer.skip_warm_up()
        sampler = OPTIMIZERS[name].data_plan(train, config.batch_size, split_options(config)[1], config.seed)
        start = sampler.state_dict()

        def step(scorer, optimizer=optimizer, sampler=sampler, start=start):
            """Two steps (MeZO-SVRG's cycle with q = 2) on the batches the plan draws from ``start``: the same
            batches for both scorers."""
            sampler.load_state_dict(start)
            for _ in range(STEPS):
                batches = {
                    key: [train[i] for i in indices] for key, indices in sampler.next_batches(optimizer).items() if indices
                }
                optimizer.train_step(batches, loss_with(scorer), config.batch_size)

        try:
            seconds, step_ratios = bracketed_timings(forward, {s: partial(step, s) for s in timed}, repeats)
        finally:
            optimizer.remove_hooks()
        speedups = [a / b for a, b in zip(step_ratios["separate"], step_ratios["packed"])]
        steps[name] = dict(
            seconds={s: statistics.median(seconds[s]) / STEPS for s in timed},
            over_packed_forward={s: spread(step_ratios[s]) for s in timed},  # STEPS steps against STEPS forwards
            speedup=spread(speedups),
        )
        if cached:
            steps[name]["cached_over_packed"] = spread([a / b for a, b in zip(step_ratios["cached"], step_ratios["packed"])])
    evaluation = {}
    if dev:
        timed, eval_ratios = bracketed_timings(
            lambda: accuracy(model, dev, pad, config.eval_batch_size),
            {"before": lambda: in_order_accuracy(model, dev, pad, config.eval_batch_size)},
            repeats,
        )
        evaluation = dict(
            examples=len(dev),
            seconds=dict(packed=statistics.median(timed["baseline"]), before=statistics.median(timed["before"])),
            speedup=spread(eval_ratios["before"]),
        )
    if "mezo" in steps:
        mezo = steps["mezo"]["over_packed_forward"]["packed"]["median"]
        results["mezo_over_reference"] = {key: value / mezo for key, value in results["forward"]["reference MeZO step"].items()}
    examples = [example for examples in batches for example in examples]
    candidates = [len(example.sequences) for example in examples]
    return dict(
        config=dict(
            model=config.model,
            task=config.task,
            batch=config.batch_size,
            baseline_batches=drawn,  # the training examples of the baseline forward and the reference step
            max_length=config.max_length,
            threads=torch.get_num_threads(),
            repeats=repeats,
            dtype=config.dtype,
            candidates=f"{min(candidates)}-{max(candidates)}",
            candidate_tokens=sorted({n for e in examples for n in e.candidate_lengths}),
            longest=max(len(s) for e in examples for s in e.sequences),
        ),
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__),
        steps=steps,
        evaluation=evaluation,
        **results,
    )


def markdown(result) -> str:
    """A :func:`run` result as a Markdown report: each optimizer's step time, packed and separate, with
    packing's speed-up, then the forwards and the evaluation against the packed forward."""

    def ratio(r):
        return f"{r['median']:.2f}× ({r['low']:.2f}–{r['high']:.2f})"

    lines = [
        f"config: {json.dumps(result['config'])}",
        f"machine: {json.dumps(result['machine'])}",
        "",
        "| optimizer | step, packed (s) | step, separate (s) | packing's speed-up: median (range) |",
        "|---|---|---|---|",
    ]
    for name, step in result["steps"].items():
        lines.append(
            f"| {name} | {step['seconds']['packed']:.3f} | {step['seconds']['separate']:.3f} | {ratio(step['speedup'])} |"
        )
    cached = {name: step for name, step in result["steps"].items() if "cached_over_packed" in step}
    if cached:
        lines += ["", "| optimizer | step, cached (s) | cached ÷ packed: median (range) |", "|---|---|---|"]
        lines += [f"| {n} | {s['seconds']['cached']:.3f} | {ratio(s['cached_over_packed'])} |" for n, s in cached.items()]
    forward = result["forward"]
    lines += [
        "",
        "Against the packed forward (loss closure, no gradient), within rounds:",
        f"- separate forward: {ratio(forward['separate forward'])}",
        f"- cached forward (prompts, then candidates from their KV cache): {ratio(forward['cached forward'])}",
        f"- reference forward (full logits): {ratio(forward['reference forward'])}",
        f"- reference MeZO step: {ratio(forward['reference MeZO step'])}",
    ]
    if "mezo_over_reference" in result:
        lines.append(f"- packed MeZO step's speed-up over the reference MeZO step: {ratio(result['mezo_over_reference'])}")
    if result["evaluation"]:
        ev = result["evaluation"]
        lines.append(
            f"- dev evaluation of {ev['examples']} examples: {ev['seconds']['packed']:.2f} s packed in "
            f"length buckets, {ev['seconds']['before']:.2f} s before: {ratio(ev['speedup'])}"
        )
    return "\n".join(lines)


def main(argv=None):
    """``zotune bench speed --task``: builds the config from the arguments (see the module docstring), times
    with :func:`run` and writes the report into ``--out``. ``argv``: the arguments after ``speed``.

    Raises:
        ConfigError: for an unknown optimizer or a bad config.
    """
    from ..config import load_config
    from ..optim import OPTIMIZERS

    parser = argparse.ArgumentParser(prog="zotune bench speed --task", description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--config", help="a run's YAML config for the model and the data")
    parser.add_argument("--model", help="overrides the config's model")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-examples", type=int, default=64, help="dev examples to time evaluation on")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma-separated, from {', '.join(OPTIMIZERS)}")
    parser.add_argument("--cached", action="store_true", help="also time the steps with the KV-cache scorer")
    parser.add_argument("--out", default="results/task_speed")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    names = args.optimizers.split(",")
    unknown = [name for name in names if name not in OPTIMIZERS]
    if unknown:
        raise ConfigError(f"bench speed --task has no optimizer {unknown[0]!r}: choose from {', '.join(OPTIMIZERS)}")
    overrides = [
        f"task={args.task}",
        f"batch_size={args.batch}",
        f"max_length={args.max_length}",
        f"threads={args.threads}",
        *([f"model={args.model}"] if args.model else []),
        *args.overrides,
    ]
    config = load_config(args.config, overrides)
    result = run(config, names, args.repeats, args.eval_examples, args.cached)
    write_report(
        Path(args.out),
        "task_speed",
        result,
        markdown(result),
        (
            list(result["steps"]),
            [s["speedup"]["median"] for s in result["steps"].values()],
            dict(ylabel="step time, separate ÷ packed", title=f"{config.task}, {config.model}"),
        ),
    )
