"""Run configuration: YAML recipes with ``key=value`` overrides, checked against the known keys."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ZotuneError


class ConfigError(ZotuneError, ValueError):
    """A config file or override is wrong; the message names the key."""


@dataclass
class TrainConfig:
    """Every setting of a run, with its default; the comment beside each field says what it takes (``zotune
    train --help`` lists them from this source). Built from a recipe by :func:`load_config`, which checks the
    types and the choices, and saved as the run folder's ``config.yaml``."""

    model: str = "smollm2-135m"  # built-in, random:<shape>, a local folder or a hub id
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    device: str = "auto"  # auto (the GPU if there is one) | cpu | cuda | cuda:N
    trainable: str = "full"  # full | lora | prefix
    lora: dict = field(default_factory=dict)  # r, alpha, dropout, targets (MeZO's: 8, 16, 0, [q_proj, v_proj])
    prefix: dict = field(default_factory=dict)  # tokens, seed (MeZO's: 5 tokens)
    head: str = "lm"  # lm (prompt + candidates) | classifier (no prompt: a classification head) | mlm (a mask token)
    pooling: str = "cls"  # head=classifier: cls (the model's own head: [CLS] for encoders, last token for decoders) | mean
    task: str = "bigbench-sentiment"
    data: str = "extract"  # extract (vendored) | full (after `zotune data fetch bigbench`)
    task_options: dict = field(default_factory=dict)  # for task=local: train/dev/test paths, template, verbalizer
    num_train: int | None = 1000  # MeZO's sampling; null keeps the whole split
    num_dev: int | None = 500
    num_test: int | None = 1000
    max_length: int = 256  # prompt+candidate tokens; longer prompts lose their beginning (MeZO: 2048; warned > 1%)
    max_new_tokens: int = 50  # greedy decoding on generation tasks (MeZO's 50)
    loss: str = "auto"  # auto (the task's, as MeZO) | classification (cross-entropy over candidates) | lm (correct answer)
    objective: str = "loss"  # loss | accuracy | f1: zeroth-order optimizers can train on the batch's metric itself
    optimizer: str = "mezo"  # mezo | adamezo | addax | addax-wa | svrg | ip-sgd | sgd | adam
    lr: float = 1e-6
    lr_schedule: str = "constant"  # constant | linear | cosine (decay to 0 at the last step)
    warmup_steps: int = 0  # a linear warm-up from 0 over this many steps, before the schedule
    weight_decay: float = 0.0
    optimizer_options: dict = field(default_factory=dict)  # e.g. mezo: {eps: 1e-3, n_directions: 1}
    steps: int = 1000
    batch_size: int = 16
    eval_every: int = 100  # 0: only at the start and the end
    select: str = "last"  # last | best_dev: which weights are tested at the end (MeZO: the best dev evaluation)
    early_stopping_patience: int | None = None  # stop after this many dev evaluations without improvement
    eval_batch_size: int = 16
    checkpoint_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    seed: int = 0
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or projected gradient does (see README)
    max_skipped_steps: int = 10  # with on_nonfinite=skip: more skips in a row than this stop the run
    outlier_factor: float = 10.0  # report a projected gradient beyond this many times the recent median |c|; 0: off
    fsdp: bool = False  # under torchrun: shard the model over the processes (FSDP2); mezo, adamezo, svrg
    threads: int | None = None
    zero_shot_eval: bool = True
    export: bool = True  # write the selected model as a Hugging Face folder, model/ in the run folder (see zotune export)
    merge: bool = False  # trainable=lora: also write the adapter merged into the base model, model/merged
    logger: str = "none"  # none | tensorboard: also write TensorBoard event files (tensorboard/ in the run folder)
    output_dir: str = "runs/run"

    def to_dict(self) -> dict:
        """The settings as a plain dict (nested dicts copied), as ``config.yaml`` and checkpoints hold them."""
        return dataclasses.asdict(self)


def key_help() -> str:
    """Every config key with its default and what it is, read from :class:`TrainConfig`'s own source (the
    comment beside each field), for ``zotune train --help``."""
    import inspect

    lines = []
    for line in inspect.getsource(TrainConfig).splitlines():
        match = re.match(r"\s+(\w+): [^=]+= (.+?)(?:\s+#\s*(.*))?$", line)
        if match and match.group(1) in FIELDS:
            name, default, comment = match.groups()
            default = "{}" if "default_factory=dict" in default else default
            lines.append(f"  {name} = {default}" + (f"  ({comment})" if comment else ""))
    return "config keys (set in the YAML recipe or as key=value):\n" + "\n".join(lines)


NONFINITE_POLICIES = ("stop", "skip")
CHOICES = {
    "on_nonfinite": NONFINITE_POLICIES,
    "loss": ("auto", "classification", "lm"),
    "objective": ("loss", "accuracy", "f1"),
    "select": ("last", "best_dev"),
    "head": ("lm", "classifier", "mlm"),
    "pooling": ("cls", "mean"),
    "lr_schedule": ("constant", "linear", "cosine"),
    "logger": ("none", "tensorboard"),
}
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _parse(text: str):
    return yaml.load(text, Loader=_Loader)


def _override_value(raw: str):
    """A number, boolean or null as such, ``{...}``/``[...]`` as a mapping/list, anything else as the
    string given (so that a template like ``Q: {question}`` stays text)."""
    try:
        value = _parse(raw) if raw else ""
    except yaml.YAMLError:
        return raw
    if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
        return raw
    return value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides (``a.b=v`` sets a key inside a dict)."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            loaded = _parse(path.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config must be a mapping of keys to values")
        values.update(loaded)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep:
            raise ConfigError(f"override {override!r} is not key=value")
        value = _override_value(raw)
        top, _, inner = key.partition(".")
        if inner:
            values[top] = {**(values.get(top) or {}), inner: value}
        else:
            values[key] = value
    for key in values:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f": did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(FIELDS)}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
    config = TrainConfig(**values)
    _check_types(config)
    return config


def _check_types(config: TrainConfig) -> None:
    for name, expected in (
        ("lr", float),
        ("weight_decay", float),
        ("outlier_factor", float),
        ("max_skipped_steps", int),
        ("steps", int),
        ("batch_size", int),
        ("eval_every", int),
        ("checkpoint_every", int),
        ("keep_checkpoints", int),
        ("seed", int),
        ("max_length", int),
        ("max_new_tokens", int),
        ("warmup_steps", int),
        ("eval_batch_size", int),
    ):
        value = getattr(config, name)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, name, float(value))
        elif not isinstance(value, expected) or isinstance(value, bool):
            raise ConfigError(f"config key {name!r} must be {expected.__name__}, got {value!r}")
    for name, definition in FIELDS.items():
        if isinstance(definition.default, str) and not isinstance(getattr(config, name), str):
            raise ConfigError(f"config key {name!r} must be text, got {getattr(config, name)!r}")
    for name in ("num_train", "num_dev", "num_test", "threads"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"config key {name!r} must be a whole number >= 1 or null, got {value!r}")
    for name in ("lr", "weight_decay", "outlier_factor"):
        if not (math.isfinite(getattr(config, name)) and getattr(config, name) >= 0):
            raise ConfigError(f"config key {name!r} must be a finite number >= 0, got {getattr(config, name)!r}")
    for name in ("eval_every", "checkpoint_every"):
        if getattr(config, name) < 0:
            raise ConfigError(f"config key {name!r} must be >= 0 (0: never during training), got {getattr(config, name)}")
    for name in ("steps", "batch_size", "keep_checkpoints", "max_length", "max_new_tokens", "eval_batch_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"config key {name!r} must be at least 1, got {getattr(config, name)}")
    for name in ("fsdp", "zero_shot_eval", "export", "merge"):
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"config key {name!r} must be true or false, got {getattr(config, name)!r}")
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            raise ConfigError(f"config key {name!r} must be one of {', '.join(choices)}, got {getattr(config, name)!r}")
    patience = config.early_stopping_patience
    if patience is not None and (not isinstance(patience, int) or isinstance(patience, bool) or patience < 1):
        raise ConfigError(f"config key 'early_stopping_patience' must be a number of evaluations >= 1 or null, got {patience!r}")
    if (config.select == "best_dev" or patience is not None) and config.eval_every < 1:
        raise ConfigError(
            "select: best_dev and early_stopping_patience need dev evaluations during training: set "
            "eval_every to a number of steps"
        )
    if not 0 <= config.warmup_steps < config.steps:
        raise ConfigError(f"config key 'warmup_steps' must be >= 0 and below steps={config.steps}, got {config.warmup_steps}")
    if (config.lr_schedule != "constant" or config.warmup_steps) and config.optimizer_options.get("anneal"):
        raise ConfigError("lr_schedule/warmup_steps and MeZO-SVRG's anneal both set the learning rates: use one")
    if config.outlier_factor < 0 or config.max_skipped_steps < 0:
        raise ConfigError("config keys 'outlier_factor' and 'max_skipped_steps' must be >= 0")
    for name in ("task_options", "optimizer_options", "lora", "prefix"):
        if not isinstance(getattr(config, name), dict):
            raise ConfigError(f"config key {name!r} must be a mapping, got {getattr(config, name)!r}")
