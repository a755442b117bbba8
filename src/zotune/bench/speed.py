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
- MeZO steps in module mode (exact), in-place mode (fused restore) and module mode with ``dual_forward``,
  and an AdaMeZO step with a full window of 10 (its moments rebuilt from 10 regenerated directions);
- a reference MeZO step written as the paper's code does it: global reseed, ``torch.normal`` per
  parameter in order, out-of-place adds, four passes over the parameters;
- the other optimizers on the same batch: a forward + backward (what backward adds), IP-SGD, SGD and Adam
  steps, an Addax step (ZO on one half of the batch, first-order on the other), and a MeZO-SVRG cycle
  with q = 2 (an anchor step with this batch as the large batch, then an ordinary step) in both memory modes.
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
from pathlib import Path

import torch

from ..directions import DirectionEngine
from ..models import DTYPES, random_llama
from ..optim import AdaMeZO, Addax, InPlaceSGD, MeZO, MeZOSVRG, create_optimizer
from .report import write_report


LABELS = dict(
    forward="forward (loss closure)",
    doubled_forward="forward of the batch stacked twice",
    z_sweep="z sweep (generate + add, all parameters)",
    mezo_module="MeZO step, module mode (exact)",
    mezo_inplace="MeZO step, in-place mode (fused)",
    mezo_dual="MeZO step, dual forward (module mode)",
    adamezo="AdaMeZO step, window 10 (module mode)",
    reference_mezo="reference MeZO step (paper's code)",
    forward_backward="forward + backward (the first-order steps' core)",
    ip_sgd="IP-SGD step (update fused into backward)",
    sgd="SGD step (torch.optim)",
    adam="Adam step (torch.optim)",
    addax="Addax step: ZO on half the batch, first-order on the other half",
    svrg_seeds="MeZO-SVRG, q = 2, seeds: an anchor step and an ordinary step",
    svrg_dense="MeZO-SVRG, q = 2, dense: an anchor step and an ordinary step",
)
MEZO_MODES = ("mezo_module", "mezo_inplace", "mezo_dual")


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


def bracketed_timings(baseline, actions, repeats, synchronize=lambda: None):
    """Seconds of ``baseline`` and of each action, and each action's time over the baseline's, per round,
    for ``repeats`` rounds after a warm-up round. A round runs baseline, action 1, baseline, action 2, ...,
    baseline, and an action's ratio in a round is its time over the mean of the two baseline runs beside
    it. This machine's speed drifts by tens of percent within a minute: ratios to the neighbouring baseline
    runs vary far less than ratios of medians taken over whole rounds."""

    def timed(action):
        synchronize()
        start = time.perf_counter()
        action()
        synchronize()
        return time.perf_counter() - start

    seconds = {name: [] for name in ("baseline", *actions)}
    ratios = {name: [] for name in actions}
    for round_index in range(repeats + 1):
        before = timed(baseline)
        round_seconds, round_ratios = [before], {}
        for name, action in actions.items():
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
    return dict(median=statistics.median(values), low=min(values), high=max(values))


def run(shape, batch, length, threads, repeats, distribution, device="cpu", dtype="fp32"):
    torch.set_num_threads(threads)
    model = random_llama(shape, dtype=DTYPES[dtype], seed=0).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(device)
    targets = torch.randint(0, model.config.vocab_size, (batch,), generator=generator).to(device)

    def closure(copies=1):
        return last_token_loss(model, input_ids, targets, copies)

    params = [p for p in model.parameters()]
    module_mezo = MeZO(model, lr=1e-7, distribution=distribution, num_threads=threads)
    inplace_mezo = MeZO(params, lr=1e-7, distribution=distribution, num_threads=threads)
    dual_mezo = MeZO(model, lr=1e-7, distribution=distribution, num_threads=threads, dual_forward=True)
    # Past its warm-up (window + 1 plain steps), so that every timed step rebuilds the moments from a full window.
    adamezo = AdaMeZO(model, lr=1e-7, window=10, distribution=distribution, num_threads=threads)
    adamezo.state["zo"] = {**adamezo.state["zo"], "step": adamezo.plain_steps,
                           "window": [[seed, 1.0] for seed in range(9)]}
    engine = DirectionEngine(params, distribution, threads)
    seeds = iter(range(10**9))

    # no_grad, not inference_mode: the reference step assigns new tensors to param.data, and inference
    # tensors there could not be updated in place by the MeZO steps that follow.
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

    torch_optimizers = {name: create_optimizer(name, model, lr=1e-7) for name in ("sgd", "adam")}

    def torch_step(name):
        closure().backward()
        torch_optimizers[name].step()
        # Cleared now, not before the next step: IP-SGD and Addax refuse gradients left from another backward.
        torch_optimizers[name].zero_grad(set_to_none=True)

    # IP-SGD and Addax update inside backward, from hooks on the parameters that would fire in every other
    # item's backward too: each is built inside its item (hooks registered: 4-7 ms) and its hooks removed after.
    def hooked_step(build, step):
        optimizer = build()
        try:
            step(optimizer)
        finally:
            optimizer.remove_hooks()

    half = batch // 2
    addax_closures = (lambda: last_token_loss(model, input_ids[:half], targets[:half]),
                      lambda: last_token_loss(model, input_ids[half:], targets[half:]))
    # MeZO-SVRG with q = 2 (the default): an anchor step (on this batch as the large batch) and an ordinary step.
    svrg = {memory: MeZOSVRG(model, lr=1e-7, anchor_lr=1e-7, memory=memory, distribution=distribution,
                             num_threads=threads) for memory in ("seeds", "dense")}

    def svrg_cycle(memory):
        svrg[memory].step(None, closure)
        svrg[memory].step(closure)

    times, ratios = bracketed_timings(
        forward,
        dict(doubled_forward=doubled_forward, z_sweep=z_sweep,
             mezo_module=lambda: module_mezo.step(closure), mezo_inplace=lambda: inplace_mezo.step(closure),
             mezo_dual=lambda: dual_mezo.step(closure), adamezo=lambda: adamezo.step(closure),
             reference_mezo=reference, forward_backward=forward_backward,
             ip_sgd=lambda: hooked_step(lambda: InPlaceSGD(model, lr=1e-7), lambda o: o.step(closure)),
             sgd=lambda: torch_step("sgd"), adam=lambda: torch_step("adam"),
             addax=lambda: hooked_step(lambda: Addax(model, lr=1e-7, distribution=distribution, num_threads=threads),
                                       lambda o: o.step(*addax_closures)),
             svrg_seeds=lambda: svrg_cycle("seeds"), svrg_dense=lambda: svrg_cycle("dense")),
        repeats, torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None,
    )
    times["forward"] = times.pop("baseline")
    # Per round: each step over two forwards, and the reference step over the fastest mode's step.
    two_forwards = {name: [ratio / 2 for ratio in values] for name, values in ratios.items()}
    fastest = min(MEZO_MODES, key=lambda name: statistics.median(two_forwards[name]))
    speedups = [reference / step for reference, step in zip(two_forwards["reference_mezo"], two_forwards[fastest])]
    return {
        "config": dict(shape=shape, parameters=sum(p.numel() for p in params), batch=batch, length=length,
                       threads=threads, repeats=repeats, distribution=distribution, device=device, dtype=dtype),
        "machine": dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"),
                        gpu=torch.cuda.get_device_name() if torch.device(device).type == "cuda" else None),
        "seconds": {name: statistics.median(values) for name, values in times.items()},
        "over_two_forwards": {name: spread(values) for name, values in two_forwards.items()},
        "over_two_forwards_per_round": two_forwards,
        "speedup_over_reference": dict(mode=fastest, **spread(speedups)),
        "rounds": times,
    }


def markdown(result):
    seconds, ratios, speedup = result["seconds"], result["over_two_forwards"], result["speedup_over_reference"]

    def ratio(name):
        r = ratios.get(name)
        return f"{r['median']:.2f} ({r['low']:.2f}–{r['high']:.2f})" if r else ""

    lines = [f"config: {json.dumps(result['config'])}", f"machine: {json.dumps(result['machine'])}", "",
             "| what | seconds (median) | ÷ (2 × forward): median (lowest–highest) of the rounds |",
             "|---|---|---|"]
    lines += [f"| {label} | {seconds[name]:.3f} | {ratio(name)} |" for name, label in LABELS.items()]
    lines += ["", "Each ratio is taken within a round, against the forwards timed just before and just after.",
              f"speed-up of the fastest zotune MeZO step ({LABELS[speedup['mode']]}) over the reference step: "
              f"{speedup['median']:.2f}x ({speedup['low']:.2f}–{speedup['high']:.2f}x)",
              f"AdaMeZO's window costs {seconds['adamezo'] - seconds['mezo_module']:.3f} s per step over MeZO "
              "(module mode)"]
    return "\n".join(lines)


def main(argv=None):
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
    result = run(args.shape, args.batch, args.length, args.threads, args.repeats, args.distribution, args.device,
                 args.dtype)
    seconds = result["seconds"]
    write_report(Path(args.out), "speed", result, markdown(result),
                 (list(seconds), list(seconds.values()), dict(ylabel="seconds (median)", title=result["config"]["shape"])))


if __name__ == "__main__":
    main()
