"""Step time of every optimizer against two forward passes; MeZO's in three modes, against the paper's code.

    python -m zotune.bench.speed --shape smollm2-135m --batch 16 --length 32 --threads 2
    python -m zotune.bench.speed --shape llama-1b --device cuda --dtype bf16     # on a GPU
    zotune bench speed --task bigbench-sentiment      # a real task's batch and loss: zotune.bench.task_speed

All timings come from one process, side by side, over ``--repeats`` rounds after a warm-up round. A round
times every item once, with the forward timed again between every two items, and each item's ratio to two
forwards is taken within its round, against the forwards just before and just after it; the table gives
the median ratio of the rounds and their range. The items:
- forward: the loss closure alone (the body of the model, logits only at the last position), and the same
  closure over the batch stacked twice (what a dual-forward step runs);
- z sweep: one ``DirectionEngine.apply`` over all parameters (generate z and add it);
- a reference MeZO step written as the paper's code does it: global reseed, ``torch.normal`` per
  parameter in order, out-of-place adds, four passes over the parameters;
- a forward + backward (what backward adds to the first-order steps);
- every registered optimizer with its defaults and each variant it declares (the entries of ``zotune bench
  memory``: ``mezo-dual``, ``mezo-inplace``, ``svrg-dense``, ``zo-momentum-replay``, ...), built before its
  item, past its warm-up (``skip_warm_up``: AdaMeZO with a full window) and one step (all untimed), taking two steps
  through the training-step protocol on the batches its own data plan draws from the batch (MeZO-SVRG: an
  anchor step with the batch as its large batch, then an ordinary step); its time is per step. Addax's
  plan splits the batch at L_T into two halves of the same length, ZO on one and first-order on the other.
On CUDA every timed action ends with a synchronisation, so the times are the GPU's work, not the
launches. Writes ``speed.json``, ``speed.md`` and ``speed.png`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError
from ..directions import DirectionEngine
from ..models import DTYPES, random_llama
from ..optim import create_optimizer, resolve
from .memory import entries
from .report import write_report

LABELS = dict(
    forward="forward (loss closure)",
    doubled_forward="forward of the batch stacked twice",
    z_sweep="z sweep (generate + add, all parameters)",
    reference_mezo="reference MeZO step (paper's code)",
    forward_backward="forward + backward (the first-order steps' core)",
)
MEZO_MODES = ("mezo", "mezo-inplace", "mezo-dual")
STEPS = 2  # per optimizer item: MeZO-SVRG's cycle with q = 2; the time reported is per step


@dataclass
class Row:
    """One synthetic training example: its tokens and target, and the length its data plan sees."""

    ids: torch.Tensor
    target: int
    sequences: list


def last_token_loss(model, input_ids, targets, copies=1):
    """Cross-entropy of a prediction at the last position only: the logits a classification loss needs.
    ``copies`` > 1: the batch stacked that many times, one mean loss per copy (MeZO's dual forward)."""
    input_ids, targets = input_ids.repeat(copies, 1), targets.repeat(copies)
    hidden = model.model(input_ids=input_ids).last_hidden_state[:, -1]
    losses = torch.nn.functional.cross_entropy(model.lm_head(hidden), targets, reduction="none")
    return losses.mean() if copies == 1 else losses.view(copies, -1).mean(dim=1)


def reference_mezo_step(params, closure, seed, lr, eps):
    """MeZO as in the paper's code: four sweeps, each reseeding the global RNG and walking the parameters."""

    def perturb(scale):
        torch.manual_seed(seed)
        for param in params:
            z = torch.normal(mean=0.0, std=1.0, size=param.size(), dtype=param.dtype, device=param.device)
            param.data = param.data + scale * eps * z

    perturb(1)
    loss_plus = float(closure())
    perturb(-2)
    loss_minus = float(closure())
    perturb(1)
    projected = (loss_plus - loss_minus) / (2 * eps)
    torch.manual_seed(seed)
    for param in params:
        z = torch.normal(mean=0.0, std=1.0, size=param.size(), dtype=param.dtype, device=param.device)
        param.data = param.data - lr * projected * z


def bracketed_timings(baseline, actions, repeats, synchronize=lambda: None, prepared=None):
    """Seconds of ``baseline`` and of each action, and each action's time over the baseline's, per round,
    for ``repeats`` rounds after a warm-up round. A round runs baseline, action 1, baseline, action 2, ...,
    baseline, and an action's ratio in a round is its time over the mean of the two baseline runs beside
    it. This machine's speed drifts by tens of percent within a minute: ratios to the neighbouring baseline
    runs vary far less than ratios of medians taken over whole rounds. ``prepared``: more actions, each
    given as a function that returns it, called untimed before each of its timings."""
    prepared = prepared or {}

    def timed(action):
        synchronize()
        start = time.perf_counter()
        action()
        synchronize()
        return time.perf_counter() - start

    items = {**actions, **prepared}
    seconds = {name: [] for name in ("baseline", *items)}
    ratios = {name: [] for name in items}
    for round_index in range(repeats + 1):
        before = timed(baseline)
        round_seconds, round_ratios = [before], {}
        for name, action in items.items():
            if name in prepared:
                action = action()
            spent, after = timed(action), timed(baseline)
            round_seconds.append(after)
            round_ratios[name] = spent / ((before + after) / 2)
            before = after
            if round_index:
                seconds[name].append(spent)
        if round_index:
            seconds["baseline"] += round_seconds
            for name, ratio in round_ratios.items():
                ratios[name].append(ratio)
    return seconds, ratios


def spread(values):
    """The median, lowest and highest of ``values``."""
    return dict(median=statistics.median(values), low=min(values), high=max(values))


def run(shape, batch, length, threads, repeats, distribution, device="cpu", dtype="fp32"):
    """Times every item of the module docstring on a random Llama and a random batch, in this process; returns
    what ``speed.json`` holds and :func:`markdown` shows.

    Args:
        shape (str): the model's shape, a name of ``zotune.models.LLAMA_SHAPES``.
        batch (int): the sequences in the batch.
        length (int): the tokens of each sequence.
        threads (int): torch's threads, and the direction engines'.
        repeats (int): the timed rounds, after a warm-up round.
        distribution (str): the directions' distribution, ``gaussian`` or ``rademacher``.
        device (str): where the model runs, ``cpu`` or ``cuda``.
        dtype (str): the model's dtype, a name of ``zotune.models.DTYPES``.
    """
    torch.set_num_threads(threads)
    model = random_llama(shape, dtype=DTYPES[dtype], seed=0).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(device)
    targets = torch.randint(0, model.config.vocab_size, (batch,), generator=generator).to(device)
    # Addax's plan splits at L_T = length - 1: the first half "longer", the second not (the tokens are the same size).
    half = batch // 2
    rows = [Row(input_ids[i], int(targets[i]), [range(length if i < half else length - 1)]) for i in range(batch)]

    def closure(copies=1):
        return last_token_loss(model, input_ids, targets, copies)

    def loss(examples, copies=1):
        ids = torch.stack([row.ids for row in examples])
        return last_token_loss(model, ids, torch.tensor([row.target for row in examples], device=device), copies)

    params = [p for p in model.parameters()]
    engine = DirectionEngine(params, distribution, threads)
    seeds = iter(range(10**9))

    # no_grad, not inference_mode: the reference step assigns new tensors to param.data, and inference
    # tensors there could not be updated in place by the steps that follow.
    @torch.no_grad()
    def forward():
        closure()

    @torch.no_grad()
    def doubled_forward():
        closure(2)

    @torch.no_grad()
    def z_sweep():
        engine.apply([(next(seeds), 1e-7)])

    @torch.no_grad()
    def reference():
        reference_mezo_step(params, closure, next(seeds), 1e-7, 1e-3)

    def forward_backward():
        closure().backward()
        model.zero_grad(set_to_none=True)

    def optimizer_item(name, options):
        """Builds the optimizer (untimed) and returns its timed action: ``STEPS`` protocol steps, after which its
        hooks (IP-SGD's, Addax's, which would fire in every other item's backward) are removed."""
        cls, preset = resolve(name)
        options = {**preset, **options}
        data = {key: value for key, value in options.items() if key in cls.data_options}
        # The batch's split, where the plan takes it; an entry whose own options refuse it (Addax-WA draws both
        # batches from the whole set) keeps its own plan.
        split = {
            key: value
            for key, value in dict(L_T=length - 1, K0=half, K1=batch - half, large_batch=batch).items()
            if key in cls.data_options
        }
        try:
            cls.check_data_options({**split, **data}, batch, len(rows))
            data = {**split, **data}
        except ConfigError:
            pass
        built = {key: value for key, value in options.items() if key not in cls.data_options}
        if cls.takes_seed:
            built.update(distribution=distribution, num_threads=threads)
        optimizer = create_optimizer(name, model, lr=1e-7, **built)
        optimizer.skip_warm_up()
        sampler = cls.data_plan(rows, batch, data, 0)

        def step():
            batches = {key: [rows[i] for i in indices] for key, indices in sampler.next_batches(optimizer).items() if indices}
            optimizer.train_step(batches, loss, batch)

        step()  # untimed: state allocated on a first step (Adam's moments, dense buffers) is not a steady step's

        def steps():
            try:
                for _ in range(STEPS):
                    step()
            finally:
                optimizer.remove_hooks()
                model.zero_grad(set_to_none=True)

        return steps

    steps = {
        entry: (lambda entry=entry, spec=spec: optimizer_item(*spec)) for entry, spec in entries().items() if spec is not None
    }
    times, ratios = bracketed_timings(
        forward,
        dict(doubled_forward=doubled_forward, z_sweep=z_sweep, reference_mezo=reference, forward_backward=forward_backward),
        repeats,
        torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None,
        prepared=steps,
    )
    for entry in steps:
        times[entry] = [seconds / STEPS for seconds in times[entry]]
        ratios[entry] = [ratio / STEPS for ratio in ratios[entry]]
    times = {"forward": times.pop("baseline"), **times}
    # Per round: each step over two forwards, and the reference step over the fastest mode's step.
    two_forwards = {name: [ratio / 2 for ratio in values] for name, values in ratios.items()}
    fastest = min(MEZO_MODES, key=lambda name: statistics.median(two_forwards[name]))
    speedups = [reference / step for reference, step in zip(two_forwards["reference_mezo"], two_forwards[fastest])]
    return {
        "config": dict(
            shape=shape,
            parameters=sum(p.numel() for p in params),
            batch=batch,
            length=length,
            threads=threads,
            repeats=repeats,
            distribution=distribution,
            device=device,
            dtype=dtype,
        ),
        "machine": dict(
            platform=platform.platform(),
            cpus=os.cpu_count(),
            torch=torch.__version__,
            omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"),
            gpu=torch.cuda.get_device_name() if torch.device(device).type == "cuda" else None,
        ),
        "seconds": {name: statistics.median(values) for name, values in times.items()},
        "over_two_forwards": {name: spread(values) for name, values in two_forwards.items()},
        "over_two_forwards_per_round": two_forwards,
        "speedup_over_reference": dict(mode=fastest, **spread(speedups)),
        "rounds": times,
    }


def markdown(result):
    """A :func:`run` result as a Markdown table: each item's median seconds and its ratio to two forwards (median
    and range over the rounds), then the speed-up of the fastest MeZO mode over the reference step."""
    seconds, ratios, speedup = result["seconds"], result["over_two_forwards"], result["speedup_over_reference"]

    def ratio(name):
        r = ratios.get(name)
        return f"{r['median']:.2f} ({r['low']:.2f}–{r['high']:.2f})" if r else ""

    def label(name):
        return LABELS.get(name, f"{name} step")

    lines = [
        f"config: {json.dumps(result['config'])}",
        f"machine: {json.dumps(result['machine'])}",
        "",
        "| what | seconds (median) | ÷ (2 × forward): median (lowest–highest) of the rounds |",
        "|---|---|---|",
    ]
    lines += [f"| {label(name)} | {value:.3f} | {ratio(name)} |" for name, value in seconds.items()]
    lines += [
        "",
        "Each ratio is taken within a round, against the forwards timed just before and just after.",
        f"speed-up of the fastest zotune MeZO step ({label(speedup['mode'])}) over the reference step: "
        f"{speedup['median']:.2f}x ({speedup['low']:.2f}–{speedup['high']:.2f}x)",
    ]
    return "\n".join(lines)


def main(argv=None):
    """``zotune bench speed``: times a random model's steps with :func:`run` and writes the report into
    ``--out``; with ``--task``, the benchmark on a task's real batch (:func:`zotune.bench.task_speed.main`).
    ``argv``: the arguments after ``speed`` (None: ``sys.argv[1:]``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg == "--task" or arg.startswith("--task=") for arg in argv):  # a real task's batch: its own bench
        from .task_speed import main as task_main

        return task_main(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m", help="model shape (see zotune.models.LLAMA_SHAPES)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--distribution", default="gaussian", choices=["gaussian", "rademacher"])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--out", default="results/speed", help="folder for speed.json, speed.md and speed.png")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
    result = run(args.shape, args.batch, args.length, args.threads, args.repeats, args.distribution, args.device, args.dtype)
    seconds = result["seconds"]
    write_report(
        Path(args.out),
        "speed",
        result,
        markdown(result),
        (list(seconds), list(seconds.values()), dict(ylabel="seconds (median)", title=result["config"]["shape"])),
    )


if __name__ == "__main__":
    main()
