"""Prompt-based tasks: examples as prompt + verbalized candidates, read from JSONL/CSV with clear errors."""

from __future__ import annotations

import csv
import json
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ZotuneError

SPLITS = ("train", "dev", "test")
# classification: cross-entropy over the candidates' scores; lm: the language-model loss on the correct one.
LOSSES = ("classification", "lm")
# MeZO's sampling: 1000 train, 500 dev, 1000 test examples.
DEFAULT_SIZES = {"train": 1000, "dev": 500, "test": 1000}


class DataError(ZotuneError, ValueError):
    """A data file or row is unusable; the message names the file, the row and the field."""


@dataclass(frozen=True)
class Example:
    """One scored example: ``prompt`` followed by each candidate; ``label`` indexes the right one.

    A generation example has one candidate, the answer trained on, and all gold ``answers`` for F1. The
    other heads read the same example differently: ``texts`` are its text fields as given, without a
    template (``head: classifier``); ``masked`` is its prompt for a masked LM, the text before and after
    the mask token (``head: mlm``). Either is empty where the task does not offer that head."""

    prompt: str
    candidates: tuple[str, ...]
    label: int
    answers: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    masked: tuple[str, str] | None = None


@dataclass(frozen=True)
class Task:
    """A classification task: how a row becomes a prompt, and the verbalizer from labels to candidates."""

    name: str
    template: str  # str.format template over the row's fields
    verbalizer: dict[str, str]  # label value (as text) -> candidate continuation
    label_field: str = "label"
    description: str = ""
    answer_field: str | None = None  # set: a generation task whose answer is this field, scored by F1
    # head: mlm: a template over the same fields with one {mask} where a candidate would go (default: the
    # template, then the mask)
    mlm_template: str | None = None

    @property
    def generation(self) -> bool:
        return self.answer_field is not None

    @property
    def loss(self) -> str:
        """The training loss MeZO uses for such a task (one of ``LOSSES``)."""
        return "lm" if self.generation else "classification"

    @property
    def fields(self) -> list[str]:
        return [name for _, name, _, _ in string.Formatter().parse(self.template) if name]

    def example(self, row: dict, where: str) -> Example:
        """The example of one data row: the prompt from the template and the candidates from the verbalizer
        (with the other heads' views of it), or a generation task's answer. ``where``: the row, as error
        messages name it.

        Raises:
            DataError: for a missing field, an empty answer or a label the verbalizer does not know.
        """
        needed = [*self.fields, self.answer_field or self.label_field]
        missing = [name for name in needed if name not in row]
        if missing:
            raise DataError(f"{where}: missing field {missing[0]!r} (task {self.name!r} needs {needed})")
        if self.generation:
            prompt = self.template.format(**{name: str(row[name]) for name in self.fields})
            answer = str(row[self.answer_field]).strip()
            if not answer:
                raise DataError(f"{where}: empty answer in field {self.answer_field!r}")
            return Example(prompt, (" " + answer,), 0, (answer,))
        label = str(row[self.label_field])
        if label not in self.verbalizer:
            raise DataError(f"{where}: label {label!r} is not one of {sorted(self.verbalizer)} (task {self.name!r})")
        labels = list(self.verbalizer)
        values = {name: str(row[name]) for name in self.fields}
        before, _, after = (self.mlm_template or self.template + "{mask}").partition("{mask}")
        # LM-BFF drops a sentence's final punctuation before the "?" its NLI templates add ("Cats purr?<mask>").
        masked = (re.sub(r"[.!?;,]+\?$", "?", before.format(**values)), after.format(**values))
        return Example(
            self.template.format(**values),
            tuple(self.verbalizer[name] for name in labels),
            labels.index(label),
            texts=tuple(values.values()),
            masked=masked,
        )

    def examples(self, rows: Sequence[dict], source: str) -> list[Example]:
        """The examples of a split's rows, in order; ``source``: the split, as error messages name it (with the
        row's number, from 1).

        Raises:
            DataError: for an empty split or an unusable row.
        """
        if not rows:
            raise DataError(f"{source}: the split is empty; task {self.name!r} needs at least one example")
        return [self.example(row, f"{source}, row {number}") for number, row in enumerate(rows, start=1)]


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a JSONL (one object per line) or CSV (with a header) file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}, row {number}: not valid JSON ({error.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, row {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def split_rows(rows: Sequence[dict], sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """Disjoint train/dev/test samples of the given sizes from one seeded shuffle; with too few rows every
    size shrinks in proportion, and a share that rounds down to nothing keeps one row (taken from the largest),
    so no split asked for rows is left empty.

    Raises:
        DataError: for fewer rows than splits asked for rows.
    """
    total = sum(sizes[split] for split in SPLITS)
    if len(rows) < total:
        wanted = [split for split in SPLITS if sizes[split]]
        if len(rows) < len(wanted):
            raise DataError(f"{len(rows)} rows are too few for {', '.join(wanted)}: each needs at least one")
        sizes = {split: max(len(rows) * sizes[split] // total, 1) if sizes[split] else 0 for split in SPLITS}
        largest = max(SPLITS, key=sizes.get)
        sizes[largest] -= max(sum(sizes.values()) - len(rows), 0)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    splits, start = {}, 0
    for split in SPLITS:
        splits[split] = [rows[i] for i in order[start : start + sizes[split]]]
        start += sizes[split]
    return splits


def sample(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    """At most ``size`` examples, a seeded sample when there are more (``None``: all)."""
    if size is None or size >= len(examples):
        return examples
    return random.Random(seed).sample(examples, size)
