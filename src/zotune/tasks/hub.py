"""GLUE/SuperGLUE classification tasks, SQuAD and DROP from the Hugging Face hub, with MeZO's templates.

Loading needs the network and the ``datasets`` package; the templates themselves are plain functions of
a row and are tested offline. Sampling follows MeZO: train and dev are disjoint samples of the hub's
training split, test is a sample of its validation split (the hub's test splits have no labels).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from .base import DataError, Example, Task
from .bigbench import NLI_MLM, SENTIMENT_MLM


@dataclass(frozen=True)
class RowTask:
    """A task whose examples need more than a template, e.g. candidates that differ per row."""

    name: str
    fields: tuple[str, ...]
    build: Callable[[dict], Example]
    description: str = ""
    generation: bool = False
    # MeZO trains COPA, ReCoRD and the generation tasks with the LM loss on the correct answer, the rest with
    # cross-entropy over the candidates (its train_as_classification).
    loss: str = "classification"

    def example(self, row: dict, where: str) -> Example:
        """The example ``build`` makes of one row, once the row is known to hold the task's ``fields``;
        ``where``: the row, as error messages name it.

        Raises:
            DataError: for a missing field, or a row ``build`` cannot use.
        """
        missing = [name for name in self.fields if name not in row]
        if missing:
            raise DataError(f"{where}: missing field {missing[0]!r} (task {self.name!r} needs {list(self.fields)})")
        return self.build(row)

    def examples(self, rows, source: str) -> list[Example]:
        """The examples of a split's rows, in order; ``source``: the split, as error messages name it (with the
        row's number, from 1).

        Raises:
            DataError: for an empty split or an unusable row.
        """
        if not rows:
            raise DataError(f"{source}: the split is empty; task {self.name!r} needs at least one example")
        return [self.example(row, f"{source}, row {number}") for number, row in enumerate(rows, start=1)]


def _copa(row: dict) -> Example:
    connective = " so" if row["question"] == "effect" else " because"
    premise = row["premise"].rstrip()
    prompt = (premise[:-1] if premise.endswith(".") else premise) + connective
    choices = tuple(" " + text[:1].lower() + text[1:] for text in (row["choice1"], row["choice2"]))
    return Example(prompt, choices, int(row["label"]))


def _record(row: dict) -> Example:
    passage = re.sub(r"\s*@highlight\s*", "\n- ", row["passage"]).strip()
    entities = list(dict.fromkeys(row["entities"]))
    answers = [entity for entity in entities if entity in row["answers"]]
    if not answers:
        raise DataError(f"ReCoRD row: none of the answers {row['answers']} is among the entities")
    candidates = tuple("\n" + row["query"].replace("@placeholder", entity) for entity in entities)
    return Example(passage, candidates, entities.index(answers[0]))


def _answered(prompt: str, answers) -> Example:
    answers = tuple(dict.fromkeys(a.strip() for a in answers if a.strip()))
    if not answers:
        raise DataError("a generation row has no non-empty answer")
    return Example(prompt, (" " + answers[0],), 0, answers)


def _squad(row: dict) -> Example:
    prompt = f"Title: {row['title']}\nContext: {row['context']}\nQuestion: {row['question']}\nAnswer:"
    return _answered(prompt, row["answers"]["text"])


def _drop(row: dict) -> Example:
    prompt = f"Passage: {row['passage']}\nQuestion: {row['question']}\nAnswer:"
    return _answered(prompt, row["answers_spans"]["spans"])


# name -> (dataset path, config, task). Label order follows the hub's label ids.
HUB_TASKS = {
    "sst2": ("glue", "sst2", Task("sst2", "{sentence} It was", {"0": " terrible", "1": " great"}, mlm_template=SENTIMENT_MLM)),
    "rte": (
        "super_glue",
        "rte",
        Task(
            "rte",
            '{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
            {"0": "Yes", "1": "No"},
            mlm_template=NLI_MLM,
        ),
    ),
    # MeZO-SVRG's other GLUE tasks (it trains them without prompts, head: classifier); the templates for the
    # lm and mlm heads are LM-BFF's.
    "mnli": (
        "glue",
        "mnli",
        Task(
            "mnli",
            '{premise}\nDoes this mean that "{hypothesis}" is true? Yes, No, or Maybe?\n',
            {"0": "Yes", "1": "Maybe", "2": "No"},
            mlm_template=NLI_MLM,
        ),
    ),
    "qnli": (
        "glue",
        "qnli",
        Task(
            "qnli",
            '{question}\nDoes "{sentence}" answer the question? Yes or No?\n',
            {"0": "Yes", "1": "No"},
            mlm_template="{question}?{mask}, {sentence}",
        ),
    ),
    "cola": (
        "glue",
        "cola",
        Task("cola", "{sentence} This is", {"0": " incorrect", "1": " correct"}, mlm_template="{sentence} This is{mask}."),
    ),
    "cb": (
        "super_glue",
        "cb",
        Task(
            "cb",
            '{premise}\nDoes this mean that "{hypothesis}" is true? Yes, No, or Maybe?\n',
            {"0": "Yes", "1": "No", "2": "Maybe"},
        ),
    ),
    "boolq": ("super_glue", "boolq", Task("boolq", "{passage} {question}?", {"0": " No", "1": " Yes"})),
    "wsc": (
        "super_glue",
        "wsc.fixed",
        Task(
            "wsc",
            '{text}\nIn the previous sentence, does the pronoun "{span2_text}" refer to {span1_text}? Yes or No?\n',
            {"0": "No", "1": "Yes"},
        ),
    ),
    "wic": (
        "super_glue",
        "wic",
        Task(
            "wic",
            'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n{sentence1}\n{sentence2}\n',
            {"0": "No", "1": "Yes"},
        ),
    ),
    "multirc": (
        "super_glue",
        "multirc",
        Task(
            "multirc",
            '{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? Yes or No?\n',
            {"0": "No", "1": "Yes"},
        ),
    ),
    "copa": ("super_glue", "copa", RowTask("copa", ("premise", "choice1", "choice2", "question", "label"), _copa, loss="lm")),
    "record": ("super_glue", "record", RowTask("record", ("passage", "query", "entities", "answers"), _record, loss="lm")),
    "squad": ("squad", None, RowTask("squad", ("title", "context", "question", "answers"), _squad, generation=True, loss="lm")),
    "drop": ("drop", None, RowTask("drop", ("passage", "question", "answers_spans"), _drop, generation=True, loss="lm")),
}


def load_rows(name: str) -> dict[str, list[dict]]:
    """The hub's training and validation rows of a task (needs ``datasets`` and the network)."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(
            f"task {name!r} comes from the Hugging Face hub, which is offline here (HF_*_OFFLINE=1): "
            "use a bigbench-* task or task=local"
        )
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"task {name!r} needs the package datasets: pip install datasets")
    from datasets import load_dataset

    path, config, _ = HUB_TASKS[name]
    dataset = load_dataset(path, config)
    validation = "validation" if "validation" in dataset else "validation_matched"  # MNLI has two
    return {"train": list(dataset["train"]), "validation": list(dataset[validation])}
