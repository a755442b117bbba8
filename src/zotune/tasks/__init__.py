"""Task registry: built-in offline tasks (BIG-bench) and local JSONL/CSV files with a user template."""

from __future__ import annotations

from dataclasses import dataclass

from . import bigbench, hub
from .base import DEFAULT_SIZES, SPLITS, DataError, Example, Task, read_rows, sample, split_rows


@dataclass
class LoadedTask:
    """A task's definition and its examples by split (train, dev, test), as :func:`load_task` returns them."""

    task: Task | hub.RowTask
    splits: dict[str, list[Example]]


def task_names() -> list[str]:
    """Every task name :func:`load_task` takes, sorted: the BIG-bench tasks, the hub tasks and ``local``."""
    return sorted([*bigbench.TASKS, *hub.HUB_TASKS, "local"])


def task_definition(name: str, local: dict | None = None) -> Task | hub.RowTask:
    """The task's template, candidates and loss, without reading any data (``local``: as in :func:`load_task`)."""
    if name in hub.HUB_TASKS:
        return hub.HUB_TASKS[name][2]
    if name == "local":
        return _local_task(local or {})[0]
    if name in bigbench.TASKS:
        return bigbench.TASKS[name][2]
    raise DataError(f"unknown task {name!r}: choose one of {', '.join(task_names())}")


def load_task(
    name: str,
    data: str = "extract",
    sizes: dict[str, int | None] | None = None,
    seed: int = 0,
    local: dict | None = None,
) -> LoadedTask:
    """Load a task's splits as examples.

    ``data``: ``extract`` (the vendored BIG-bench extracts) or ``full`` (after ``zotune data fetch``).
    ``sizes``: examples per split (MeZO's 1000/500/1000 by default; ``None`` keeps a split whole).
    ``local``: for ``name == "local"``: ``{train, dev, test}`` paths plus ``template``, ``verbalizer``
    (label -> candidate text) and optionally ``label_field``.
    """
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    if name in hub.HUB_TASKS:
        return _hub_task(name, sizes, seed)
    if name == "local":
        task, paths = _local_task(local or {})
    elif name in bigbench.TASKS:
        if data not in ("extract", "full"):
            raise DataError(f"unknown data source {data!r} for {name}: choose extract or full")
        task, paths = bigbench.TASKS[name][2], bigbench.split_paths(name, data == "full")
    else:
        raise DataError(f"unknown task {name!r}: choose one of {', '.join(task_names())}")
    splits = {}
    for split in SPLITS:
        examples = task.examples(read_rows(paths[split]), str(paths[split]))
        splits[split] = sample(examples, sizes[split], seed)
    return LoadedTask(task, splits)


def _hub_task(name: str, sizes: dict, seed: int) -> LoadedTask:
    """Train and dev are disjoint samples of the hub's training split, so there a null size (elsewhere the whole
    split) keeps the rows the other leaves; test is a sample of the validation split."""
    task = hub.HUB_TASKS[name][2]
    rows = hub.load_rows(name)
    train, dev, count = sizes["train"], sizes["dev"], len(rows["train"])
    if train is None and dev is None:
        raise DataError(
            f"task {name!r} samples train and dev from the hub's training split: num_train and num_dev cannot both "
            "be null (each keeps the rows the other leaves): set one of them"
        )
    if (train is None or dev is None) and (train or dev) >= count:
        key, other = ("num_train", "dev") if dev is None else ("num_dev", "train")
        raise DataError(
            f"task {name!r}: {key}={train or dev} leaves none of the hub's {count} training rows for {other} "
            f"(num_{other}=null keeps the rest): set {key} below {count}"
        )
    shares = {"train": count - dev if train is None else train, "dev": count - train if dev is None else dev, "test": 0}
    train_dev = split_rows(rows["train"], shares, seed)
    split_sources = {"train": train_dev["train"], "dev": train_dev["dev"], "test": rows["validation"]}
    splits = {split: task.examples(split_rows_, f"{name} ({split})") for split, split_rows_ in split_sources.items()}
    splits["test"] = sample(splits["test"], sizes["test"], seed)
    return LoadedTask(task, splits)


def _local_task(options: dict):
    """A task over local files. For a classification head (no prompt) ``text_fields`` may stand for the
    template (the fields, in order) and ``labels`` for the verbalizer (each label's own text)."""
    generation = "answer_field" in options
    options = dict(options)
    if "template" not in options and "text_fields" in options:
        fields = options["text_fields"]
        if not isinstance(fields, list) or not fields or not all(isinstance(name, str) for name in fields):
            raise DataError("task_options.text_fields must be a list of field names, e.g. [sentence]")
        options["template"] = "\n".join("{" + name + "}" for name in fields)
    if "verbalizer" not in options and "labels" in options and not generation:
        options["verbalizer"] = {str(label): " " + str(label) for label in options["labels"]}
    required = ["train", "dev", "test", "template", *([] if generation else ["verbalizer"])]
    missing = [key for key in required if key not in options]
    if missing:
        raise DataError(
            f"task 'local' needs task_options.{missing[0]} (required: {', '.join(required)}; "
            "verbalizer (or labels) for classification, answer_field for generation; text_fields may "
            "stand for the template)"
        )
    verbalizer = {str(label): text for label, text in dict(options.get("verbalizer", {})).items()}
    task = Task(
        "local",
        options["template"],
        verbalizer,
        options.get("label_field", "label"),
        answer_field=options.get("answer_field"),
        mlm_template=options.get("mlm_template"),
    )
    return task, {split: options[split] for split in SPLITS}


__all__ = ["DataError", "Example", "LoadedTask", "Task", "load_task", "task_names"]
