import json

import pytest

from zotune.tasks import DataError, load_task, task_names
from zotune.tasks.base import split_rows


@pytest.mark.parametrize(
    "name,candidates",
    [
        ("bigbench-sentiment", (" terrible", " great")),
        ("bigbench-epistemic", ("Yes", "No")),
        ("bigbench-presuppositions", ("Yes", "No", "Maybe")),
        ("bigbench-strategyqa", (" No", " Yes")),
    ],
)
def test_vendored_bigbench_tasks_load_with_disjoint_splits(name, candidates):
    loaded = load_task(name)
    assert {split: len(examples) for split, examples in loaded.splits.items()} == {"train": 256, "dev": 128, "test": 256}
    prompts = {split: {e.prompt for e in examples} for split, examples in loaded.splits.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["dev"] & prompts["test"]
    for example in loaded.splits["dev"]:
        assert example.candidates == candidates and 0 <= example.label < len(candidates)
    assert len({e.label for e in loaded.splits["train"]}) == len(candidates)  # every class occurs


def test_sampling_is_seeded():
    a = load_task("bigbench-sentiment", sizes={"train": 10}, seed=1).splits["train"]
    b = load_task("bigbench-sentiment", sizes={"train": 10}, seed=1).splits["train"]
    c = load_task("bigbench-sentiment", sizes={"train": 10}, seed=2).splits["train"]
    assert a == b and a != c and len(a) == 10


def test_split_rows_shrinks_proportionally_when_rows_run_out():
    splits = split_rows([{"i": i} for i in range(250)], {"train": 1000, "dev": 500, "test": 1000})
    assert {k: len(v) for k, v in splits.items()} == {"train": 100, "dev": 50, "test": 100}


def test_split_rows_leaves_no_split_asked_for_rows_empty():
    """A share that rounds down to nothing keeps one row, taken from the largest; a split asked for none stays empty."""
    splits = split_rows([{"i": i} for i in range(250)], {"train": 1000, "dev": 2, "test": 0})
    assert {k: len(v) for k, v in splits.items()} == {"train": 249, "dev": 1, "test": 0}
    splits = split_rows([{"i": i} for i in range(3)], {"train": 100, "dev": 1, "test": 1})
    assert sorted(row["i"] for rows in splits.values() for row in rows) == [0, 1, 2]
    assert {k: len(v) for k, v in splits.items()} == {"train": 1, "dev": 1, "test": 1}
    with pytest.raises(DataError, match="2 rows are too few for train, dev, test"):
        split_rows([{"i": i} for i in range(2)], {"train": 100, "dev": 1, "test": 1})


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def local_options(tmp_path, train_rows, **extra):
    good = [{"text": "fine", "label": 1}, {"text": "bad", "label": 0}]
    return dict(
        train=write_jsonl(tmp_path / "train.jsonl", train_rows),
        dev=write_jsonl(tmp_path / "dev.jsonl", good),
        test=write_jsonl(tmp_path / "test.jsonl", good),
        template="{text} It was",
        verbalizer={0: " terrible", 1: " great"},
        **extra,
    )


def test_local_jsonl_and_csv_tasks(tmp_path):
    loaded = load_task("local", local=local_options(tmp_path, [{"text": "lovely", "label": 1}]))
    assert loaded.splits["train"][0].prompt == "lovely It was" and loaded.splits["train"][0].label == 1
    (tmp_path / "train.csv").write_text("text,label\nawful,0\n")
    options = local_options(tmp_path, [{"text": "x", "label": 1}])
    loaded = load_task("local", local={**options, "train": str(tmp_path / "train.csv")})
    assert loaded.splits["train"][0].prompt == "awful It was" and loaded.splits["train"][0].label == 0


@pytest.mark.parametrize(
    "rows,message",
    [
        (['{"text": "ok", "label": 1}', "{not json"], r"train.jsonl, row 2: not valid JSON"),
        ([{"label": 1}], r"train.jsonl, row 1: missing field 'text'"),
        ([{"text": "ok", "label": 7}], r"train.jsonl, row 1: label '7' is not one of \['0', '1'\]"),
        ([], r"train.jsonl: the split is empty"),
        (["[1, 2]"], r"train.jsonl, row 1: expected a JSON object, got list"),
    ],
)
def test_bad_local_data_names_file_row_and_field(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_task("local", local=local_options(tmp_path, rows))


def test_unknown_task_and_missing_options(tmp_path):
    with pytest.raises(DataError, match="unknown task 'sst3': choose one of " + ", ".join(task_names())):
        load_task("sst3")
    with pytest.raises(DataError, match="task 'local' needs task_options.train"):
        load_task("local", local={})
    with pytest.raises(DataError, match="no such data file"):
        load_task("local", local={**local_options(tmp_path, [{"text": "a", "label": 0}]), "dev": str(tmp_path / "nope.jsonl")})


def test_full_data_needs_a_fetch_first(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="run `zotune data fetch bigbench` first"):
        load_task("bigbench-sentiment", data="full")


def test_convert_sdist_builds_deduplicated_splits_from_task_json(tmp_path):
    import io
    import tarfile

    from zotune.tasks import bigbench

    def scores(correct, labels):
        return {label: int(label == correct) for label in labels}

    contents = {
        "multiemo/all_sentence_en/task.json": [
            {
                "input": f"s{i}",
                "target_scores": scores(
                    ["positive", "negative", "neutral"][i % 3], ["positive", "negative", "neutral", "ambivalent"]
                ),
            }
            for i in range(30)
        ]
        + [{"input": "s1", "target_scores": scores("negative", ["positive", "negative"])}],  # conflicting repeat
        "epistemic_reasoning/task.json": [
            {
                "input": f"Premise: p{i}. Hypothesis: h{i}.",
                "target_scores": scores("entailment", ["entailment", "non-entailment"]),
            }
            for i in range(10)
        ]
        * 2,  # every row twice
        "presuppositions_as_nli/task.json": [
            {
                "input": f"Sentence 1: a{i}\nSentence 2: b{i}\n\nThe answer is: ",
                "target_scores": scores("neutral", ["entailment", "neutral"]),
            }
            for i in range(10)
        ],
        "strategyqa/task.json": [{"input": f"q{i}?", "target_scores": scores("Yes", ["Yes", "No"])} for i in range(10)],
    }
    sdist = tmp_path / "bigbench.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for member, examples in contents.items():
            data = json.dumps({"examples": examples}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{member}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    counts = bigbench.convert_sdist(sdist, tmp_path / "out", {"train": 4, "dev": 2, "test": 4})
    # 20 sentences are positive or negative, one of them (s1) repeats with another label: 19 left.
    assert counts["bigbench-sentiment"] == {"train": 4, "dev": 2, "test": 4}
    assert counts["bigbench-epistemic"] == {"train": 4, "dev": 2, "test": 4}  # 10 distinct rows of 20
    rows = [json.loads(line) for line in (tmp_path / "out/bigbench-sentiment/train.jsonl").read_text().splitlines()]
    assert all(row["label"] in ("positive", "negative") and row["sentence"] != "s1" for row in rows)
    premise_rows = (tmp_path / "out/bigbench-presuppositions/dev.jsonl").read_text().splitlines()
    assert json.loads(premise_rows[0]).keys() == {"premise", "hypothesis", "label"}


def test_data_fetch_downloads_from_the_index_pip_is_configured_with_and_checks_the_sha256(tmp_path, monkeypatch):
    from zotune.tasks import bigbench

    index = tmp_path / "mirror" / "bigbench"
    index.mkdir(parents=True)
    (index / "bigbench-1.0.0.tar.gz").write_bytes(b"not the real sdist")
    (index / "index.html").write_text('<a href="bigbench-1.0.0.tar.gz#sha256=00">bigbench-1.0.0.tar.gz</a>')
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\nindex-url = file://{tmp_path / 'mirror'}/\n")
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    assert bigbench.pip_index_url() == f"file://{tmp_path / 'mirror'}/"

    def served(url, data=None, timeout=None):  # a static mirror: a folder URL serves its index.html
        path = str(url).removeprefix("file://")
        return open(path + "index.html" if path.endswith("/") else path, "rb")

    monkeypatch.setattr(bigbench.urllib.request, "urlopen", served)
    with pytest.raises(DataError, match=f"from file://{tmp_path}/mirror/bigbench/bigbench-1.0.0.tar.gz: sha256 mismatch"):
        bigbench.download_sdist(tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # the bad download is not kept
