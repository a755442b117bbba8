"""MeZO's GLUE/SuperGLUE templates, checked offline on hand-written rows in the hub's format."""

import pytest

from zotune.tasks import DataError, load_task
from zotune.tasks.hub import HUB_TASKS

ROWS = {
    "sst2": ({"sentence": "a gorgeous film", "label": 1}, "a gorgeous film It was", (" terrible", " great"), 1),
    "rte": (
        {"premise": "Cats purr.", "hypothesis": "Cats make sounds.", "label": 0},
        'Cats purr.\nDoes this mean that "Cats make sounds." is true? Yes or No?\n',
        ("Yes", "No"),
        0,
    ),
    "cb": (
        {"premise": "It may rain.", "hypothesis": "It rains.", "label": 2},
        'It may rain.\nDoes this mean that "It rains." is true? Yes, No, or Maybe?\n',
        ("Yes", "No", "Maybe"),
        2,
    ),
    "boolq": (
        {"passage": "Paris is in France.", "question": "is paris in france", "label": 1},
        "Paris is in France. is paris in france?",
        (" No", " Yes"),
        1,
    ),
    "wsc": (
        {"text": "Mark told Pete he was late.", "span1_text": "Pete", "span2_text": "he", "label": 0},
        'Mark told Pete he was late.\nIn the previous sentence, does the pronoun "he" refer to Pete? Yes or No?\n',
        ("No", "Yes"),
        0,
    ),
    "wic": (
        {"word": "bank", "sentence1": "The river bank.", "sentence2": "The bank lent money.", "label": 0},
        'Does the word "bank" have the same meaning in these two sentences? Yes, No?\nThe river bank.\nThe bank lent money.\n',
        ("No", "Yes"),
        0,
    ),
    "multirc": (
        {"paragraph": "Sam ate.", "question": "Who ate?", "answer": "Sam", "label": 1},
        'Sam ate.\nQuestion: Who ate?\nI found this answer "Sam". Is that correct? Yes or No?\n',
        ("No", "Yes"),
        1,
    ),
    "mnli": (
        {"premise": "It may rain.", "hypothesis": "It rains.", "label": 1},
        'It may rain.\nDoes this mean that "It rains." is true? Yes, No, or Maybe?\n',
        ("Yes", "Maybe", "No"),
        1,
    ),
    "qnli": (
        {"question": "Who ate?", "sentence": "Sam ate.", "label": 0},
        'Who ate?\nDoes "Sam ate." answer the question? Yes or No?\n',
        ("Yes", "No"),
        0,
    ),
    "cola": ({"sentence": "Him ate.", "label": 0}, "Him ate. This is", (" incorrect", " correct"), 0),
    "copa": (
        {"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He sang.", "question": "cause", "label": 0},
        "The man fell because",
        (" he slipped.", " he sang."),
        0,
    ),
    "record": (
        {
            "passage": "Rain in Oslo. @highlight Floods follow",
            "query": "@placeholder got wet.",
            "entities": ["Oslo", "Rain", "Oslo"],
            "answers": ["Oslo"],
        },
        "Rain in Oslo.\n- Floods follow",
        ("\nOslo got wet.", "\nRain got wet."),
        0,
    ),
}


@pytest.mark.parametrize(
    "name", sorted(name for name, (_, _, task) in HUB_TASKS.items() if not getattr(task, "generation", False))
)
def test_template_turns_a_hub_row_into_prompt_candidates_and_label(name):
    row, prompt, candidates, label = ROWS[name]
    example = HUB_TASKS[name][2].example(row, "hand-written row")
    assert (example.prompt, example.candidates, example.label) == (prompt, candidates, label)


@pytest.mark.parametrize(
    "name,texts,masked",
    [
        ("sst2", ("a gorgeous film",), ("a gorgeous film It was", ".")),
        ("rte", ("Cats purr.", "Cats make sounds."), ("Cats purr?", ", Cats make sounds.")),
        ("qnli", ("Who ate?", "Sam ate."), ("Who ate?", ", Sam ate.")),
        ("cola", ("Him ate.",), ("Him ate. This is", ".")),
    ],
)
def test_the_prompt_free_and_masked_forms_of_a_row(name, texts, masked):
    """head: classifier reads the fields as given (MeZO-SVRG's prompt-free form); head: mlm, LM-BFF's template."""
    row = ROWS[name][0]
    example = HUB_TASKS[name][2].example(row, "hand-written row")
    assert example.texts == texts and example.masked == masked


def test_copa_effect_uses_so():
    row = {"premise": "It rained.", "choice1": "Roads were wet.", "choice2": "X.", "question": "effect", "label": 0}
    assert HUB_TASKS["copa"][2].example(row, "row").prompt == "It rained so"


def test_hub_rows_with_missing_fields_are_named():
    with pytest.raises(DataError, match="row 1: missing field 'premise'"):
        HUB_TASKS["copa"][2].examples([{"choice1": "a"}], "copa (train)")


def test_hub_tasks_say_they_need_the_network_when_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="comes from the Hugging Face hub, which is offline"):
        load_task("sst2")


def test_hub_sampling_train_and_dev_from_train_test_from_validation(monkeypatch):
    from zotune.tasks import hub

    rows = {
        "train": [{"sentence": f"t{i}", "label": i % 2} for i in range(40)],
        "validation": [{"sentence": f"v{i}", "label": i % 2} for i in range(30)],
    }
    monkeypatch.setattr(hub, "load_rows", lambda name: rows)
    loaded = load_task("sst2", sizes={"train": 10, "dev": 5, "test": 20}, seed=3)
    prompts = {split: [e.prompt.split()[0] for e in examples] for split, examples in loaded.splits.items()}
    assert len(prompts["train"]) == 10 and len(prompts["dev"]) == 5 and len(prompts["test"]) == 20
    assert not set(prompts["train"]) & set(prompts["dev"])
    assert all(p.startswith("t") for p in prompts["train"] + prompts["dev"]) and all(p.startswith("v") for p in prompts["test"])


def test_a_null_hub_size_keeps_the_rows_the_other_split_leaves(monkeypatch):
    """null keeps the whole split, as for the BIG-bench and local tasks: train and dev share the hub's training
    split, so a null one takes all the rows the other does not; both null is a one-line error."""
    from zotune.tasks import hub

    rows = {
        "train": [{"sentence": f"t{i}", "label": i % 2} for i in range(40)],
        "validation": [{"sentence": f"v{i}", "label": i % 2} for i in range(30)],
    }
    monkeypatch.setattr(hub, "load_rows", lambda name: rows)
    for sizes, expected in (
        ({"train": 10, "dev": None, "test": None}, {"train": 10, "dev": 30, "test": 30}),
        ({"train": None, "dev": 5, "test": 20}, {"train": 35, "dev": 5, "test": 20}),
    ):
        loaded = load_task("sst2", sizes=sizes, seed=3)
        assert {split: len(examples) for split, examples in loaded.splits.items()} == expected
        prompts = {split: {e.prompt for e in examples} for split, examples in loaded.splits.items()}
        assert len(prompts["train"] | prompts["dev"]) == 40  # disjoint, and every training row is used
    for sizes, message in (
        ({"train": None, "dev": None}, "num_train and num_dev cannot both be null"),
        ({"train": 40, "dev": None}, "num_train=40 leaves none of the hub's 40 training rows for dev"),
    ):
        with pytest.raises(DataError, match=message):
            load_task("sst2", sizes=sizes)
