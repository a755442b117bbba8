"""The training recipe: setup (model, data, optimizer, resume), the loop, evaluation, checkpoints, the end.

A run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one record per step and per
evaluation), ``checkpoint-NNNNNN.pt`` files, ``plot.png`` and ``summary.json`` (and ``best.pt`` with
``select: best_dev``). Starting a run in a folder that has checkpoints resumes from the newest: model,
optimizer (with its seed stream) and data order are restored, so the resumed run reaches the same
parameters, bit for bit, as an uninterrupted one.

The recipe knows no optimizer by name or type: it asks the optimizer (the training-step protocol,
:mod:`zotune.optim.protocol`) which batches a step needs, takes the step, and logs what the step reports.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from .checkpoints import Checkpoints
from .config import ConfigError, TrainConfig
from .distributed import DataParallel, data_parallel, from_environment, full_state_dict, load_full_state_dict, shard_model
from .errors import NonFiniteGradientError, NonFiniteLossError, TrainingError
from .export import export, export_problem
from .lengths import first_order_peak_bytes
from .metrics_log import MetricsLog, peak_memory_mb
from .numerics import ProjectedGradientMonitor
from .optim import resolve
from .optim.params import fsdp_optimizers, trainable_groups
from .optim.protocol import option_names
from .plot import plot
from .schedules import Schedule
from .packing import packing_note
from .preparation import Prepared, cut_warnings, evaluate_model, prepare
from .selection import DevSelection
from .signals import RunInterrupted, stop_requests
from .tensorboard_log import TensorBoardLog

__all__ = [
    "Checkpoints",
    "TrainingError",
    "RunInterrupted",
    "build_optimizer",
    "check_fsdp",
    "evaluate_model",
    "prepare",
    "split_options",
    "train",
]


def split_options(config: TrainConfig) -> tuple[dict, dict]:
    """``config.optimizer_options`` (with what the optimizer's name sets) as (the optimizer's options, the
    options of its data plan, which the optimizer declares as ``data_options``)."""
    cls, preset = resolve(config.optimizer)
    options = {**preset, **config.optimizer_options}
    return (
        {k: v for k, v in options.items() if k not in cls.data_options},
        {k: v for k, v in options.items() if k in cls.data_options},
    )


def build_optimizer(config: TrainConfig, model) -> torch.optim.Optimizer:
    """The configured optimizer on ``model`` (or on parameter groups, for FSDP2 shards); options it does not
    take are one-line errors naming those it does."""
    cls, _ = resolve(config.optimizer)
    options, _ = split_options(config)
    if cls.takes_seed:
        options.setdefault("seed", config.seed)
    accepted = option_names(cls)
    unknown = [name for name in options if name not in accepted]
    if unknown:
        known = [name for name in accepted if name not in ("self", "params", "params_or_model", "lr", "weight_decay")]
        raise ConfigError(
            f"optimizer {config.optimizer!r} has no option {unknown[0]!r} (optimizer_options): it takes {', '.join(known)}"
        )
    return cls(model, lr=config.lr, weight_decay=config.weight_decay, **options)


def check_fsdp(config: TrainConfig, group: DataParallel | None) -> None:
    """Refuses, before anything loads, an FSDP2 run that cannot work."""
    if group is None:
        raise ConfigError(
            "fsdp: true shards the model over processes: launch with torchrun --nproc_per_node N (N >= 2), or set fsdp: false"
        )
    cls, _ = resolve(config.optimizer)
    problem = cls.fsdp_problem(split_options(config)[0])
    if problem is not None:
        given = ", ".join(f"{k}={v}" for k, v in config.optimizer_options.items())
        raise ConfigError(
            f"fsdp: true supports the optimizers {', '.join(fsdp_optimizers())} (with their default options), "
            f"got {config.optimizer!r}"
            f"{f' with {given}' if given else ''}: {problem}"
        )
    if config.trainable != "full":
        raise ConfigError(
            f"fsdp: true supports trainable=full, got {config.trainable!r}: LoRA and prefix "
            "parameters are small enough to train data parallel without fsdp"
        )


# What defines a run: resuming a folder with other values would continue one run as another. The rest
# (steps, evaluation and checkpoint intervals, lr, threads, ...) may change between a run and its resumption.
DEFINING_KEYS = (
    "model",
    "dtype",
    "head",
    "pooling",
    "trainable",
    "lora",
    "prefix",
    "task",
    "data",
    "task_options",
    "num_train",
    "num_dev",
    "num_test",
    "max_length",
    "loss",
    "objective",
    "optimizer",
    "optimizer_options",
    "weight_decay",
    "seed",
)


def check_resumable(config: TrainConfig, run_dir: Path, force: bool) -> None:
    """Refuses to resume a run folder's checkpoints with settings that define another run (``force``: allow)."""
    saved_path = run_dir / "config.yaml"
    if force or not saved_path.is_file() or not Checkpoints(run_dir, 1).paths():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    current = config.to_dict()
    differences = [
        f"{key}: {saved.get(key)!r} there, {current[key]!r} here" for key in DEFINING_KEYS if saved.get(key) != current[key]
    ]
    if differences:
        raise ConfigError(
            f"{run_dir} holds the checkpoints of another run ({'; '.join(differences)}): use a new "
            "output_dir, or resume it with these settings with zotune train --force-resume"
        )


def make_run_folder(run_dir: Path) -> None:
    """Creates the run folder and checks it can be written, before anything loads."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".zotune-write-check-{os.getpid()}"  # one per process: ranks share the folder
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"output_dir {str(run_dir)!r} cannot be created or written ({error.strerror or error}): choose another output_dir"
        ) from None


def load_weights(model: torch.nn.Module, weights: dict, fsdp: bool) -> None:
    """Loads a full state dict into ``model``: into this rank's shards with ``fsdp`` (every rank calls it), else
    by ``load_state_dict``."""
    load_full_state_dict(model, weights) if fsdp else model.load_state_dict(weights)


def train(config: TrainConfig, force_resume: bool = False) -> dict | None:
    """Trains as configured; under torchrun, data parallel over its processes. Returns the summary (None on
    every rank but the first of a distributed run, which alone logs, evaluates and saves). A folder holding
    checkpoints of a run with other defining settings (``DEFINING_KEYS``) is refused unless ``force_resume``."""
    check_resumable(config, Path(config.output_dir), force_resume)  # before anything loads
    make_run_folder(Path(config.output_dir))
    joined = not torch.distributed.is_initialized()
    group = from_environment(cuda=config.device != "cpu" and torch.cuda.is_available())
    try:
        run = Run(config, group)
        try:
            return run.train()
        finally:
            run.metrics.close()  # the sinks' files, also when the run stops early
    finally:
        if group is not None and joined:
            torch.distributed.destroy_process_group()


class Run:
    """One training run: built by :meth:`__init__` (setup and resume), driven by :meth:`train`."""

    def __init__(self, config: TrainConfig, group: DataParallel | None) -> None:
        self.config, self.group = config, group
        self.main = group is None or group.is_main
        if config.fsdp:
            check_fsdp(config, group)  # before loading anything
        torch.manual_seed(config.seed)
        self.prepared: Prepared = prepare(config)
        self.model = self.prepared.model
        self.device = next(self.model.parameters()).device
        self.model.train()
        self.sampler = self._data_plan()
        self.optimizer = self._optimizer()
        self.schedule = Schedule(self.optimizer, config.lr_schedule, config.steps, config.warmup_steps)  # before resume
        self.run_dir = Path(config.output_dir)
        if self.main:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        self.checkpoints = Checkpoints(self.run_dir, config.keep_checkpoints)
        self.monitor = ProjectedGradientMonitor(config.outlier_factor)
        self.selection = DevSelection(self.run_dir, config.select == "best_dev", config.early_stopping_patience)
        self.start_step, self.forward_passes, self.seconds_before, self.skipped_in_a_row = 0, 0, 0.0, 0
        self.resume_records = None  # the metrics records written before the checkpoint resumed from
        resumed = self._resume()
        sinks = [TensorBoardLog(self.run_dir / "tensorboard")] if config.logger == "tensorboard" and self.main else []
        self.metrics = MetricsLog(
            self.run_dir / "metrics.jsonl",
            self.start_step if resumed else None,
            enabled=self.main,
            sinks=sinks,
            resume_records=self.resume_records,
        )
        packing = packing_note(self.prepared.model, self.prepared.splits["train"]) if config.head == "lm" else None
        for note in [
            *self.sampler.notes,
            *cut_warnings(self.prepared.splits, config.max_length, config.head),
            *filter(None, [packing]),
        ]:
            self.say(note)
            if not resumed:
                self.metrics.write({"step": 0, "note": note})

    def say(self, text: str) -> None:
        """Prints ``text`` above the progress bar, on the first rank only."""
        if self.main:
            tqdm.write(text)

    # -- setup ---------------------------------------------------------------------------------------------

    def loss(self, examples: list, copies: int = 1) -> torch.Tensor:
        """The training loss of ``examples`` on the run's model, the closure the optimizers step on; with
        ``copies`` above 1, the batch stacked that many times and one mean loss per copy (the dual forward)."""
        return self.prepared.loss(self.model, examples, self.prepared.tokenizer.pad_token_id, copies)

    def _data_plan(self):
        """The optimizer's sampler over the training set (planned before the optimizer exists, and before FSDP2
        shards the model: a plan may measure a first-order step on it)."""
        examples = self.prepared.splits["train"]
        cls, _ = resolve(self.config.optimizer)
        from_first = int if self.group is None else self.group.from_first
        return cls.data_plan(
            examples,
            self.config.batch_size,
            split_options(self.config)[1],
            self.config.seed,
            lambda indices: first_order_peak_bytes(self.model, lambda: self.loss([examples[i] for i in indices])),
            from_first,
        )

    def _optimizer(self):
        if self.config.fsdp:
            shard_model(self.model)
        # Sharded parameters are perturbed in place (FSDP2 owns the tensors that module perturbation would swap),
        # in the model's parameter groups: the same decay rule, and the same keys for z as without FSDP.
        target = trainable_groups(self.model, self.config.weight_decay)[1] if self.config.fsdp else self.model
        optimizer = build_optimizer(self.config, target)
        if self.group is not None:
            data_parallel(optimizer, self.group)
        return optimizer

    def _resume(self) -> bool:
        state = self.checkpoints.latest(self.say)
        if state is None:
            return False
        load_weights(self.model, state["model"], self.config.fsdp)
        if "selection" in state:  # absent from checkpoints written before selection existed
            self.selection.load_state_dict(state["selection"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.monitor.load_state_dict(state["monitor"])
        self.skipped_in_a_row = state["skipped_in_a_row"]
        self.start_step, self.forward_passes, self.seconds_before = state["step"], state["forward_passes"], state["seconds"]
        self.resume_records = state.get("metrics_records")  # absent from checkpoints written before it was saved
        return True

    # -- evaluation ----------------------------------------------------------------------------------------

    def evaluate(self, step: int, split: str) -> float | None:
        """The metric on ``split``, logged at ``step``; None on the ranks that do not evaluate (every rank but the
        first, except under FSDP, where all of them run the forwards)."""
        if not self.main and not self.config.fsdp:  # the other ranks go on to the next all-reduce and wait there
            return None
        value = self.prepared.evaluate(split)  # with FSDP on every rank: each forward gathers from all of them
        self.metrics.write({"step": step, "split": split, "metric": self.prepared.metric, "value": value})
        return value

    def weights(self) -> dict:
        """The model's full state dict; under FSDP gathered from the shards, so every rank must call it."""
        return full_state_dict(self.model) if self.config.fsdp else self.model.state_dict()  # FSDP: all ranks gather

    def observe_dev(self, step: int, value: float | None) -> None:
        """The dev metric at ``step`` (None on ranks that do not evaluate) for selection and early stopping."""
        if value is None:
            return

        def kept() -> dict:
            gathered = self.weights()  # with FSDP a collective, so every rank gathers; the first alone writes best.pt
            return gathered if self.main else {}

        if self.selection.observe(step, value, kept) and self.config.select == "best_dev":
            self.say(f"step {step}: best dev {self.prepared.metric} so far, {value:.4f}, kept in {self.selection.path}")

    def out_of_patience(self, step: int) -> bool:
        """Whether early stopping ends the run at ``step``, agreed by every rank."""
        over = self.selection.out_of_patience
        if self.group is not None and self.config.early_stopping_patience:  # data parallel: rank 0 alone evaluates
            over = self.group.agree(over)
        if over:
            self.selection.stopped_at = step
            self.say(
                f"early stop at step {step}: {self.config.early_stopping_patience} dev evaluations without "
                f"improvement on step {self.selection.best_step} (early_stopping_patience)"
            )
            self.metrics.write({"step": step, "early_stop": True, "best_step": self.selection.best_step})
        return over

    # -- the loop ------------------------------------------------------------------------------------------

    def take_step(self) -> dict:
        """One optimizer step on the batches its data plan names (this rank's share of each)."""
        train = self.prepared.splits["train"]
        shard = (lambda batch, name: batch) if self.group is None else self.group.shard
        batches = {
            name: shard([train[i] for i in indices], name)
            for name, indices in self.sampler.next_batches(self.optimizer).items()
            if indices
        }
        micro_batch = len(shard(list(range(self.config.batch_size)), "batch"))  # this rank's share of batch_size
        return self.optimizer.train_step(batches, self.loss, micro_batch)

    def guarded_step(self, step: int) -> dict:
        """:meth:`take_step`, with a non-finite loss or gradient stopping the run or skipping the step."""
        config = self.config
        try:
            record = self.take_step()
            self.skipped_in_a_row = 0
            return record
        except (NonFiniteLossError, NonFiniteGradientError) as error:
            self.skipped_in_a_row += 1
            too_many = self.skipped_in_a_row > config.max_skipped_steps
            if config.on_nonfinite == "stop" or getattr(error, "applied", False) or too_many:
                self.metrics.write({"step": step, "error": str(error)})
                why = (
                    f" ({self.skipped_in_a_row} steps in a row, more than max_skipped_steps={config.max_skipped_steps})"
                    if config.on_nonfinite == "skip" and too_many
                    else ""
                )
                raise TrainingError(f"run step {step}{why}: {error}") from None
            self.say(f"step {step} skipped (on_nonfinite=skip): {error}")
            return dict(skipped=str(error), forward_passes=0)

    def log_step(self, step: int, record: dict, started: float) -> dict:
        """Completes a step's record and writes it to the log: the outlier check of its projected gradient,
        the forward passes and seconds so far, the rate, the peak memory and, data parallel, the bytes
        communicated. ``record``: what the step returned, whose ``forward_passes`` are added to the run's count;
        ``started``: the ``time.perf_counter()`` at which this process began training. Returns the record as
        logged."""
        report = self.monitor.check(record["projected_grad"]) if "projected_grad" in record else None
        if report is not None:
            self.say(f"step {step}: {report}")
            record["warning"] = report
        self.forward_passes += record.pop("forward_passes")
        record = dict(
            step=step,
            **record,
            lr=self.optimizer.param_groups[0]["lr"],
            forward_passes=self.forward_passes,
            seconds=self.seconds_before + time.perf_counter() - started,
            peak_memory_mb=peak_memory_mb(self.device),
        )
        if self.group is not None:
            record["communicated_bytes"] = self.group.communicated_bytes  # this run's all-reduces so far, per rank
        self.metrics.write(record)
        return record

    def checkpoint(self, step: int, seconds: float) -> None:
        """Saves the checkpoint of ``step`` (weights, optimizer, sampler, monitor, selection, counters, the number of
        metrics records so far and config; ``seconds``: the training time so far). Every rank gathers the weights
        under FSDP; the first writes."""
        saved = self.weights()
        if self.main:
            self.checkpoints.save(
                step,
                dict(
                    step=step,
                    model=saved,
                    optimizer=self.optimizer.state_dict(),
                    sampler=self.sampler.state_dict(),
                    monitor=self.monitor.state_dict(),
                    skipped_in_a_row=self.skipped_in_a_row,
                    forward_passes=self.forward_passes,
                    seconds=seconds,
                    selection=self.selection.state_dict(),
                    metrics_records=self.metrics.count,  # those after it are redone on resume
                    config=self.config.to_dict(),
                ),
            )

    def train(self) -> dict | None:
        """The loop: the zero-shot dev evaluation of a fresh run (``zero_shot_eval``), then every step from the
        resumed one to ``steps`` or the early stop, with its evaluations and checkpoints, then :meth:`finish`.
        Returns the summary (None on every rank but the first).

        Raises:
            RunInterrupted: when SIGINT or SIGTERM arrived, after saving the step in progress.
            TrainingError: for a non-finite step that ``on_nonfinite`` does not skip.
        """
        config = self.config
        if self.start_step == 0 and config.zero_shot_eval:
            zero_shot = self.evaluate(0, "dev")
            if zero_shot is not None:  # data parallel: rank 0 alone evaluates
                self.say(f"zero-shot dev {self.prepared.metric}: {zero_shot:.3f}")
        started = time.perf_counter()
        last_step = self.selection.stopped_at or config.steps
        bar = tqdm(
            range(self.start_step + 1, last_step + 1),
            initial=self.start_step,
            total=config.steps,
            desc=f"{config.optimizer} on {config.task}",
            unit="step",
            disable=not self.main,
        )
        with stop_requests() as requested:
            for step in bar:
                self.schedule.before(step)
                record = self.log_step(step, self.guarded_step(step), started)
                if "loss" in record:
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                if config.eval_every and step % config.eval_every == 0 and step != config.steps:
                    self.observe_dev(step, self.evaluate(step, "dev"))
                    if self.out_of_patience(step):
                        last_step = step
                stopping = requested[0] is not None
                if self.group is not None:  # a signal may reach some ranks a step before the others: stop all at once
                    stopping = self.group.agree(stopping)
                if step == last_step or stopping or (config.checkpoint_every and step % config.checkpoint_every == 0):
                    self.checkpoint(step, record["seconds"])
                if stopping:
                    number = requested[0] or signal.SIGTERM  # on a rank the signal had not reached
                    name = signal.Signals(number).name
                    self.metrics.write({"step": step, "stopped": name})
                    raise RunInterrupted(
                        f"{name} at step {step}: saved checkpoint-{step:06d}.pt in {self.run_dir}; run "
                        "the same command to resume",
                        number,
                    )
                if step == last_step:
                    break
        return self.finish(last_step, self.seconds_before + time.perf_counter() - started)

    # -- the end -------------------------------------------------------------------------------------------

    def finish(self, last_step: int, seconds: float) -> dict | None:
        """The last dev evaluation, the weights to test (the last or the best dev's), the test, the summary."""
        config, selection = self.config, self.selection
        training_peak = peak_memory_mb(self.device)
        if selection.stopped_at is None:  # an early stop has just evaluated its last step
            self.observe_dev(last_step, self.evaluate(last_step, "dev"))
        selected = last_step
        if config.select == "best_dev" and selection.best_step is not None:
            selected = selection.best_step
            if selected != last_step and (self.main or config.fsdp):
                load_weights(self.model, selection.best_weights(), config.fsdp)
            self.say(
                f"selected step {selected} for test (select: best_dev, dev {self.prepared.metric} {selection.best_value:.4f})"
            )
            self.metrics.write({"step": last_step, "selected_step": selected, "select": config.select})
        test = self.evaluate(selected, "test")
        if not self.main:
            return None
        summary = dict(
            dev=selection.best_value if config.select == "best_dev" else selection.last_value,
            test=test,
            selected_step=selected,
            last_dev=selection.last_value,
            early_stopped_at=selection.stopped_at,
            steps=last_step,
            forward_passes=self.forward_passes,
            seconds=seconds,
            peak_memory_mb=training_peak,
        )
        records = self.metrics.records()
        zero = [r["value"] for r in records if r.get("split") == "dev" and r["step"] == 0]
        summary.update(metric=self.prepared.metric, zero_shot_dev=zero[0] if zero else None)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot(records, self.run_dir / "plot.png", f"{config.optimizer} on {config.task} ({config.model})")
        if config.export:
            self.export(summary)
        return summary

    def export(self, summary: dict) -> None:
        """The selected weights as a Hugging Face folder, ``model/`` (see :mod:`zotune.export`)."""
        config = self.config
        problem = export_problem(config) or (
            "an FSDP run's model is in shards; its checkpoint holds it whole: zotune export --checkpoint" if config.fsdp else None
        )
        if problem is not None:
            self.say(f"note: no model/ folder: {problem}")
            self.metrics.write({"step": summary["steps"], "note": f"not exported: {problem}"})
            return
        out = export(self.model, self.prepared.tokenizer, config, self.run_dir / "model", summary)
        self.say(f"wrote the model of step {summary['selected_step']} as a Hugging Face folder: {out}")
