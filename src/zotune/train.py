"""The training loop: steps, evaluation, checkpoints, metrics, plot.

A run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one record per step and per
evaluation), ``checkpoint-NNNNNN.pt`` files, ``plot.png`` and ``summary.json``. Starting a run in a folder
that has checkpoints resumes from the newest: model, optimizer (with MeZO's seed stream) and data order
are restored, so the resumed run reaches the same parameters, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from .config import ConfigError, TrainConfig
from .distributed import (DataParallel, data_parallel, from_environment, full_state_dict, load_full_state_dict,
                          shard_model)
from .errors import NonFiniteGradientError, NonFiniteLossError, ZotuneError
from .models import PREFIX_DEFAULTS, load_model, select_trainable
from .lengths import ADDAX_DATA_OPTIONS, AddaxPlan, first_order_peak_bytes, plan_addax
from .numerics import ProjectedGradientMonitor
from .estimators import mean_over_micro_batches
from .optim import OPTIMIZERS, Addax, MeZO, MeZOSVRG, create_optimizer
from .optim.inplace_sgd import InPlaceSGD
from .optim.params import FSDP_OPTIMIZERS, trainable_groups
from .scoring import (EncodedExample, accuracy, answer_loss, classification_loss, encode, mean_f1,
                      negated_accuracy)
from .sampling import AddaxBatches, BatchSampler, SVRGBatches
from .selection import DevSelection
from .tasks import load_task


ADDAX_OPTIMIZERS = ("addax", "addax-wa")
TORCH_OPTIMIZERS = ("sgd", "adam")  # plain torch.optim: the trainer all-reduces their gradients itself
# Keys of optimizer_options that tell the trainer how to draw batches; the optimizer never sees them.
DATA_OPTIONS = {"addax": ADDAX_DATA_OPTIONS, "addax-wa": ADDAX_DATA_OPTIONS, "svrg": ("large_batch",)}


class TrainingError(ZotuneError, RuntimeError):
    """Training stopped; the message names the step and what to change."""


class RunInterrupted(TrainingError):
    """SIGINT or SIGTERM arrived; the step in progress finished and was checkpointed."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number


@contextmanager
def stop_requests():
    """Within the block, SIGINT and SIGTERM set ``requested[0]`` instead of killing the process, so the loop
    can finish its step and save it. Outside the main thread (where handlers cannot be set) a no-op."""
    requested: list[int | None] = [None]
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    for number in previous:
        signal.signal(number, lambda received, _frame: requested.__setitem__(0, received))
    try:
        yield requested
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class Checkpoints:
    """``checkpoint-NNNNNN.pt`` files in the run folder, written atomically (temp file, fsync, rename)."""

    def __init__(self, folder: Path, keep: int) -> None:
        self.folder, self.keep = folder, keep

    def paths(self) -> list[Path]:
        return sorted(self.folder.glob("checkpoint-[0-9]*.pt"))

    def save(self, step: int, state: dict) -> Path:
        target = self.folder / f"checkpoint-{step:06d}.pt"
        partial = target.with_suffix(".pt.tmp")
        with open(partial, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        partial.replace(target)
        for old in self.paths()[: -self.keep]:
            old.unlink()
        return target

    def latest(self) -> dict | None:
        paths = self.paths()
        return torch.load(paths[-1], weights_only=False) if paths else None


class MetricsLog:
    """Append-only JSONL; on resume, records past the checkpoint's step are dropped (they will be redone)."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled  # disabled on every rank but the first of a distributed run
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]


def peak_memory_mb(device: torch.device | None = None) -> float:
    """The CUDA allocator's peak on a GPU run, else the process's peak resident set."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def split_options(config: TrainConfig) -> tuple[dict, dict]:
    """``config.optimizer_options`` as (the optimizer's options, the trainer's data options)."""
    data_keys = DATA_OPTIONS.get(config.optimizer, ())
    options = config.optimizer_options
    return ({k: v for k, v in options.items() if k not in data_keys}, {k: v for k, v in options.items() if k in data_keys})


def build_optimizer(config: TrainConfig, model) -> torch.optim.Optimizer:
    options, _ = split_options(config)
    if config.optimizer in ("mezo", "adamezo", "svrg", *ADDAX_OPTIMIZERS):
        options.setdefault("seed", config.seed)
    accepted = inspect.signature(OPTIMIZERS.get(config.optimizer, create_optimizer)).parameters
    unknown = [name for name in options if name not in accepted]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        known = [name for name in accepted if name not in ("self", "params", "params_or_model", "lr", "weight_decay")]
        raise ConfigError(f"optimizer {config.optimizer!r} has no option {unknown[0]!r} (optimizer_options): "
                          f"it takes {', '.join(known)}")
    return create_optimizer(config.optimizer, model, lr=config.lr, weight_decay=config.weight_decay, **options)


def addax_step(optimizer: Addax, zo_closure, fo_closure, sizes: tuple[int, int]) -> dict:
    """One Addax step; the logged loss is the mean over the examples of both batches."""
    optimizer.step(zo_closure, fo_closure)
    losses = optimizer.last_losses
    present = {key: size for key, size in zip(("zo", "fo"), sizes) if key in losses}
    record = dict(loss=sum(losses[key] * size for key, size in present.items()) / sum(present.values()),
                  **{f"loss_{key}": value for key, value in losses.items()},
                  forward_passes=2 * ("zo" in losses) + ("fo" in losses))
    if optimizer.last_estimates:
        estimate = optimizer.last_estimates[0]
        record.update(projected_grad=estimate.projected_gradient, seed=estimate.seed)
    return record


def svrg_step(optimizer: MeZOSVRG, loss_fn, large_batch_fn=None, micro_batches: int = 0) -> dict:
    """One MeZO-SVRG step: an anchor step on ``large_batch_fn`` (``micro_batches`` forwards per
    evaluation), or an ordinary step on ``loss_fn`` (four forwards)."""
    anchor = large_batch_fn is not None
    loss = optimizer.step(None, large_batch_fn) if anchor else optimizer.step(loss_fn)
    live = optimizer.last_estimates[0]
    record = dict(loss=loss, projected_grad=live.projected_gradient, seed=live.seed, anchor=anchor,
                  forward_passes=2 * micro_batches if anchor else 4)
    if not anchor:
        record["projected_grad_at_anchor"] = optimizer.last_estimates[1].projected_gradient
    return record


def train_step(optimizer, loss_fn, step: int, group: DataParallel | None = None) -> dict:
    """One optimizer step on one batch (this rank's slice of it, data parallel); returns the step's log fields."""
    if isinstance(optimizer, MeZO):
        loss = optimizer.step(loss_fn)
        estimates = optimizer.last_estimates
        return dict(loss=loss, loss_plus=estimates[0].loss_plus, loss_minus=estimates[0].loss_minus,
                    projected_grad=estimates[0].projected_gradient, seed=estimates[0].seed,
                    forward_passes=2 * len(estimates))
    if isinstance(optimizer, InPlaceSGD):
        return dict(loss=optimizer.step(loss_fn), forward_passes=1)
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    value = loss.item() if group is None else group.mean([loss.item()])[0]
    if not math.isfinite(value):
        raise NonFiniteLossError(step, {"loss": value})
    loss.backward()
    grads = [p.grad for param_group in optimizer.param_groups for p in param_group["params"] if p.grad is not None]
    if group is not None:
        for grad in grads:
            group.mean_gradient(grad)
    if not all(torch.isfinite(grad).all() for grad in grads):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteGradientError(step, applied=False)
    optimizer.step()
    return dict(loss=value, forward_passes=1)


@dataclass
class Prepared:
    """What training and evaluation share: the model, the encoded splits, the loss and the metric."""

    model: torch.nn.Module
    tokenizer: object
    splits: dict[str, list[EncodedExample]]
    metric: str  # accuracy (classification) or f1 (generation)
    evaluate: Callable[[str], float]  # split name -> metric value
    loss: Callable  # (model, batch, pad_id, copies=1) -> loss tensor (one mean per copy when copies > 1)


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one (under torchrun, the rank's own: from_environment selected it)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: this machine has no CUDA device; use device=cpu or device=auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def prepare(config: TrainConfig) -> Prepared:
    if config.threads:
        torch.set_num_threads(config.threads)
    model, tokenizer = load_model(config.model, config.dtype)
    model = model.to(resolve_device(config.device))
    sizes = {"train": config.num_train, "dev": config.num_dev, "test": config.num_test}
    loaded = load_task(config.task, config.data, sizes, config.seed, config.task_options)
    generation = getattr(loaded.task, "generation", False)
    if generation and config.trainable == "prefix":
        raise ConfigError(f"trainable=prefix supports classification tasks; {config.task!r} is a generation task: "
                          "use trainable=full or trainable=lora")
    context = getattr(model.config, "max_position_embeddings", None)
    model = select_trainable(model, config.trainable, config.lora, config.prefix)
    encoded = {split: [encode(tokenizer, example, config.max_length) for example in examples]
               for split, examples in loaded.splits.items()}
    if context is not None:
        prefix_tokens = config.prefix.get("tokens", PREFIX_DEFAULTS["tokens"]) if config.trainable == "prefix" else 0
        check_context(encoded, context, prefix_tokens)
    metric = "f1" if generation else "accuracy"

    def evaluate(split: str) -> float:
        if generation:
            return mean_f1(model, tokenizer, encoded[split], config.eval_batch_size, config.max_new_tokens)
        return accuracy(model, encoded[split], tokenizer.pad_token_id, config.eval_batch_size)

    return Prepared(model, tokenizer, encoded, metric, evaluate, training_loss(config, loaded.task, metric, tokenizer))


def training_loss(config: TrainConfig, task, metric: str, tokenizer) -> Callable:
    """What the optimizer minimises: the task's loss (``loss: auto``) or the one configured, or with
    ``objective: accuracy | f1`` minus the batch's metric, which only zeroth-order optimizers can follow."""
    if config.objective != "loss":
        if getattr(OPTIMIZERS.get(config.optimizer), "needs_differentiable_loss", True):
            raise ConfigError(f"objective={config.objective} trains on a metric, which has no gradient: it needs a "
                              f"zeroth-order optimizer (mezo, adamezo, svrg), not {config.optimizer!r}; or set "
                              "objective=loss")
        if config.objective != metric:
            raise ConfigError(f"objective={config.objective}, but task {config.task!r} is scored by {metric}: set "
                              f"objective={metric} or objective=loss")
        if config.objective == "accuracy":
            return negated_accuracy
        if config.optimizer_options.get("dual_forward"):
            raise ConfigError("objective=f1 decodes answers token by token, which the dual forward cannot stack: "
                              "set optimizer_options.dual_forward=false")

        def negated_f1(model, examples, pad_id, copies=1):
            return -torch.tensor(mean_f1(model, tokenizer, examples, len(examples), config.max_new_tokens))

        return negated_f1
    loss = task.loss if config.loss == "auto" else config.loss
    if loss == "classification" and getattr(task, "generation", False):
        raise ConfigError(f"loss=classification needs candidates to choose between; {config.task!r} is a generation "
                          "task with one answer: set loss=lm or loss=auto")
    return answer_loss if loss == "lm" else classification_loss


def cut_warnings(encoded: dict[str, list[EncodedExample]], max_length: int) -> list[str]:
    """A warning for each split of which more than 1% of the examples lost the beginning of their prompt."""
    warnings = []
    for split, examples in encoded.items():
        cut = sum(example.truncated for example in examples)
        if cut > 0.01 * len(examples):
            warnings.append(f"warning: {cut} of {len(examples)} {split} examples ({cut / len(examples):.0%}) are longer "
                            f"than max_length={max_length} tokens and lose the beginning of their prompt: raise "
                            "max_length (MeZO uses 2048) if the model's context allows")
    return warnings


def rank_zeros_plan(plan: AddaxPlan, group: DataParallel, optimizer: str, data_options: dict,
                    examples: list[EncodedExample], batch_size: int) -> AddaxPlan:
    """Every rank must split the data alike, but ``L_T: auto`` measures memory on each rank's own device,
    which may differ slightly: all ranks take rank 0's threshold."""
    chosen = group.from_first(plan.split.threshold)
    if chosen == plan.split.threshold:
        return plan
    given = {key: value for key, value in data_options.items() if key != "memory_budget"}
    return plan_addax(optimizer, {**given, "L_T": chosen}, examples, batch_size)


def load_weights(model: torch.nn.Module, weights: dict, fsdp: bool) -> None:
    load_full_state_dict(model, weights) if fsdp else model.load_state_dict(weights)


def check_fsdp(config: TrainConfig, group: DataParallel | None) -> None:
    if group is None:
        raise ConfigError("fsdp: true shards the model over processes: launch with torchrun --nproc_per_node N "
                          "(N >= 2), or set fsdp: false")
    memory = config.optimizer_options.get("memory", "seeds")
    if config.optimizer not in FSDP_OPTIMIZERS or memory != "seeds":
        raise ConfigError(f"fsdp: true supports the optimizers {', '.join(FSDP_OPTIMIZERS)} (svrg with memory=seeds), "
                          f"got {config.optimizer!r}{f' with memory={memory}' if config.optimizer == 'svrg' else ''}: "
                          "first-order updates fused into backward and dense buffers do not work on shards")
    if config.trainable != "full":
        raise ConfigError(f"fsdp: true supports trainable=full, got {config.trainable!r}: LoRA and prefix "
                          "parameters are small enough to train data parallel without fsdp")


def check_context(encoded: dict[str, list[EncodedExample]], context: int, reserved: int) -> None:
    """Refuses sequences the model has no positions for (OPT's learned positions would fail deep in torch,
    rotary models would silently run beyond what they were trained on)."""
    for split, examples in encoded.items():
        for index, example in enumerate(examples):
            length = reserved + max(len(sequence) for sequence in example.sequences)
            if length > context:
                prefix = f" (including {reserved} prefix positions)" if reserved else ""
                raise ConfigError(f"{split} example {index} is {length} tokens long{prefix}, more than the model's "
                                  f"context of {context} positions: set max_length to at most {context - reserved} "
                                  "(longer prompts then lose their beginning)")


def train(config: TrainConfig) -> dict | None:
    """Trains as configured; under torchrun, data parallel over its processes. Returns the summary (None on
    every rank but the first of a distributed run, which alone logs, evaluates and saves)."""
    joined = not torch.distributed.is_initialized()
    group = from_environment(cuda=config.device != "cpu" and torch.cuda.is_available())
    try:
        return _train(config, group)
    finally:
        if group is not None and joined:
            torch.distributed.destroy_process_group()


def _train(config: TrainConfig, group: DataParallel | None) -> dict | None:
    main = group is None or group.is_main
    say = tqdm.write if main else (lambda _: None)
    if config.fsdp:
        check_fsdp(config, group)  # before loading anything
    torch.manual_seed(config.seed)
    prepared = prepare(config)
    model, tokenizer, splits = prepared.model, prepared.tokenizer, prepared.splits
    device = next(model.parameters()).device
    model.train()
    pad = tokenizer.pad_token_id
    plan = None
    _, data_options = split_options(config)
    if config.optimizer in ADDAX_OPTIMIZERS:
        train_examples = splits["train"]
        plan = plan_addax(config.optimizer, data_options, train_examples, config.batch_size,
                          lambda indices: first_order_peak_bytes(
                              model, lambda: prepared.loss(model, [train_examples[i] for i in indices], pad)))
        if group is not None and data_options.get("L_T") == "auto":
            plan = rank_zeros_plan(plan, group, config.optimizer, data_options, train_examples, config.batch_size)
    if config.fsdp:
        shard_model(model)
    # Sharded parameters are perturbed in place (FSDP2 owns the tensors that module perturbation would swap),
    # in the model's parameter groups: the same decay rule, and the same keys for z as without FSDP.
    optimizer = build_optimizer(config, trainable_groups(model, config.weight_decay)[1] if config.fsdp else model)
    if group is not None and config.optimizer not in TORCH_OPTIMIZERS:  # those all-reduce in train_step
        data_parallel(optimizer, group)
    shard = (lambda batch, name="batch": batch) if group is None else group.shard
    run_dir = Path(config.output_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    checkpoints = Checkpoints(run_dir, config.keep_checkpoints)
    if plan is not None:
        sampler = AddaxBatches(plan.split, plan.k0, plan.k1, config.seed)
    elif isinstance(optimizer, MeZOSVRG):
        large = data_options.get("large_batch", len(splits["train"]))
        if not isinstance(large, int) or isinstance(large, bool) or not 1 <= large <= len(splits["train"]):
            raise ConfigError(f"optimizer_options.large_batch must be a number of training examples from 1 to "
                              f"{len(splits['train'])} (the training set), got {large!r}")
        sampler = SVRGBatches(len(splits["train"]), config.batch_size, large, config.seed)
    else:
        sampler = BatchSampler(len(splits["train"]), config.batch_size, config.seed)

    start_step, forward_passes, seconds_before, skipped_in_a_row = 0, 0, 0.0, 0
    monitor = ProjectedGradientMonitor(config.outlier_factor)
    selection = DevSelection(run_dir, config.select == "best_dev", config.early_stopping_patience)
    state = checkpoints.latest()
    if state is not None:
        load_weights(model, state["model"], config.fsdp)
        if "selection" in state:  # absent from checkpoints written before selection existed
            selection.load_state_dict(state["selection"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        monitor.load_state_dict(state["monitor"])
        skipped_in_a_row = state["skipped_in_a_row"]
        start_step, forward_passes, seconds_before = state["step"], state["forward_passes"], state["seconds"]
    metrics = MetricsLog(run_dir / "metrics.jsonl", start_step if state is not None else None, enabled=main)
    for note in [*(plan.notes if plan is not None else []), *cut_warnings(splits, config.max_length)]:
        say(note)
        if state is None:
            metrics.write({"step": 0, "note": note})

    def evaluate(step: int, split: str) -> float | None:
        if not main and not config.fsdp:  # the other ranks go on to the next step's all-reduce and wait there
            return None
        value = prepared.evaluate(split)  # with FSDP on every rank: each forward gathers from all of them
        metrics.write({"step": step, "split": split, "metric": prepared.metric, "value": value})
        return value

    if start_step == 0 and config.zero_shot_eval:
        zero_shot = evaluate(0, "dev")
        say(f"zero-shot dev {prepared.metric}: {zero_shot:.3f}")

    def weights() -> dict:
        return full_state_dict(model) if config.fsdp else model.state_dict()  # FSDP: every rank gathers

    def observe_dev(step: int, value: float | None) -> None:
        """The dev metric at ``step`` (None on ranks that do not evaluate) for selection and early stopping."""
        if value is None:
            return
        def kept() -> dict:
            gathered = weights()  # with FSDP a collective, so every rank gathers; the first alone writes best.pt
            return gathered if main else {}

        if selection.observe(step, value, kept) and config.select == "best_dev":
            say(f"step {step}: best dev {prepared.metric} so far, {value:.4f}, kept in {selection.path}")

    started = time.perf_counter()
    last_step = selection.stopped_at or config.steps
    bar = tqdm(range(start_step + 1, last_step + 1), initial=start_step, total=config.steps,
               desc=f"{config.optimizer} on {config.task}", unit="step", disable=not main)

    def run_step() -> dict:
        if isinstance(sampler, SVRGBatches):
            anchor = optimizer.is_anchor_step
            batch = shard([splits["train"][i] for i in sampler.next_batch(anchor)], "large batch" if anchor else "batch")
            if not anchor:
                return svrg_step(optimizer, lambda: prepared.loss(model, batch, pad))
            size = len(shard(list(range(config.batch_size))))  # micro-batches of this rank's share of batch_size
            micro = [batch[i : i + size] for i in range(0, len(batch), size)]
            return svrg_step(optimizer, None, mean_over_micro_batches(lambda b: prepared.loss(model, b, pad), micro),
                             len(micro))
        if plan is None:
            batch: list[EncodedExample] = shard([splits["train"][i] for i in sampler.next_batch()])
            return train_step(optimizer, lambda copies=1: prepared.loss(model, batch, pad, copies), step,
                              group if config.optimizer in TORCH_OPTIMIZERS else None)
        long, short = (shard([splits["train"][i] for i in indices], name) if indices else None
                       for indices, name in zip(sampler.next_batches(), ("K0 batch", "K1 batch")))
        return addax_step(optimizer, long and (lambda: prepared.loss(model, long, pad)),
                          short and (lambda: prepared.loss(model, short, pad)), (plan.k0, plan.k1))

    with stop_requests() as requested:
        for step in bar:
            try:
                record = run_step()
                skipped_in_a_row = 0
            except (NonFiniteLossError, NonFiniteGradientError) as error:
                skipped_in_a_row += 1
                too_many = skipped_in_a_row > config.max_skipped_steps
                if config.on_nonfinite == "stop" or getattr(error, "applied", False) or too_many:
                    metrics.write({"step": step, "error": str(error)})
                    why = (f" ({skipped_in_a_row} steps in a row, more than max_skipped_steps="
                           f"{config.max_skipped_steps})" if config.on_nonfinite == "skip" and too_many else "")
                    raise TrainingError(f"run step {step}{why}: {error}") from None
                say(f"step {step} skipped (on_nonfinite=skip): {error}")
                record = dict(skipped=str(error), forward_passes=0)
            report = monitor.check(record["projected_grad"]) if "projected_grad" in record else None
            if report is not None:
                say(f"step {step}: {report}")
                record["warning"] = report
            forward_passes += record.pop("forward_passes")
            record = dict(step=step, **record, lr=optimizer.param_groups[0]["lr"], forward_passes=forward_passes,
                          seconds=seconds_before + time.perf_counter() - started, peak_memory_mb=peak_memory_mb(device))
            if group is not None:
                record["communicated_bytes"] = group.communicated_bytes  # this run's all-reduces so far, per rank
            metrics.write(record)
            if "loss" in record:
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if config.eval_every and step % config.eval_every == 0 and step != config.steps:
                observe_dev(step, evaluate(step, "dev"))
                patience_over = selection.out_of_patience
                if group is not None and config.early_stopping_patience:  # data parallel: rank 0 alone evaluates
                    patience_over = group.agree(patience_over)
                if patience_over:
                    selection.stopped_at = last_step = step
                    say(f"early stop at step {step}: {config.early_stopping_patience} dev evaluations without "
                        f"improvement on step {selection.best_step} (early_stopping_patience)")
                    metrics.write({"step": step, "early_stop": True, "best_step": selection.best_step})
            stopping = requested[0] is not None
            if group is not None:  # a signal may reach some ranks a step before the others: stop all at once
                stopping = group.agree(stopping)
            if step == last_step or stopping or (config.checkpoint_every and step % config.checkpoint_every == 0):
                saved = weights()
                if main:
                    checkpoints.save(step, dict(step=step, model=saved, optimizer=optimizer.state_dict(),
                                                sampler=sampler.state_dict(), monitor=monitor.state_dict(),
                                                skipped_in_a_row=skipped_in_a_row, forward_passes=forward_passes,
                                                seconds=record["seconds"], selection=selection.state_dict(),
                                                config=config.to_dict()))
            if stopping:
                number = requested[0] or signal.SIGTERM  # on a rank the signal had not reached
                name = signal.Signals(number).name
                metrics.write({"step": step, "stopped": name})
                raise RunInterrupted(f"{name} at step {step}: saved checkpoint-{step:06d}.pt in {run_dir}; run the same "
                                     "command to resume", number)
            if step == last_step:
                break
    seconds = seconds_before + time.perf_counter() - started
    training_peak = peak_memory_mb(device)
    if selection.stopped_at is None:  # an early stop has just evaluated its last step
        observe_dev(last_step, evaluate(last_step, "dev"))
    selected = last_step
    if config.select == "best_dev" and selection.best_step is not None:
        selected = selection.best_step
        if selected != last_step and (main or config.fsdp):
            load_weights(model, selection.best_weights(), config.fsdp)
        say(f"selected step {selected} for test (select: best_dev, dev {prepared.metric} {selection.best_value:.4f})")
        metrics.write({"step": last_step, "selected_step": selected, "select": config.select})
    test = evaluate(selected, "test")
    if not main:
        return None
    summary = dict(dev=selection.best_value if config.select == "best_dev" else selection.last_value, test=test,
                   selected_step=selected, last_dev=selection.last_value, early_stopped_at=selection.stopped_at,
                   steps=last_step, forward_passes=forward_passes, seconds=seconds, peak_memory_mb=training_peak)
    records = metrics.records()
    zero = [r["value"] for r in records if r.get("split") == "dev" and r["step"] == 0]
    summary.update(metric=prepared.metric, zero_shot_dev=zero[0] if zero else None)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(records, run_dir / "plot.png", f"{config.optimizer} on {config.task} ({config.model})")
    return summary


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r]
    dev = [r for r in records if r.get("split") == "dev"]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8)
    loss_axis.set(xlabel="step", ylabel="training loss (batch)", title="loss")
    name = dev[0]["metric"] if dev else "accuracy"
    metric_axis.plot([r["step"] for r in dev], [r["value"] for r in dev], marker="o")
    metric_axis.set(xlabel="step", ylabel=f"dev {name}", title=name, ylim=(0, 1))
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def evaluate_model(config: TrainConfig, checkpoint: str | None, split: str) -> tuple[str, float]:
    """The task's metric (name, value) for the configured model (zero-shot) or a checkpoint, on one split."""
    prepared = prepare(config)
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise TrainingError(f"{checkpoint}: no such checkpoint file")
        prepared.model.load_state_dict(torch.load(checkpoint, weights_only=False)["model"])
    return prepared.metric, prepared.evaluate(split)
