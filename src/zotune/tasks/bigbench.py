"""Offline tasks from BIG-bench (Apache-2.0), read from the task JSON files of its PyPI sdist.

Small seeded extracts ship in ``zotune/tasks/data/bigbench`` (see ATTRIBUTION.md there); the full tasks
are built by ``zotune data fetch bigbench``, which downloads the sdist (bigbench==1.0.0, 358 MB) from the
package index pip is configured with (a mirror or proxy a user set for pip applies), checks its sha256 and
writes MeZO-sized splits (1000/500/1000) into the zotune cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ..paths import cache_dir, file_digest
from .base import DEFAULT_SIZES, SPLITS, DataError, Task, read_rows, split_rows

SDIST_NAME = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
PYPI = "https://pypi.org/simple"
VENDORED = Path(__file__).parent / "data" / "bigbench"
VENDORED_SIZES = {"train": 256, "dev": 128, "test": 256}


def _correct(example: dict) -> str:
    scores = example["target_scores"]
    return max(scores, key=scores.get)


def _sentiment(example: dict) -> dict | None:
    label = _correct(example)
    return {"sentence": example["input"].strip(), "label": label} if label in ("positive", "negative") else None


def _premise_hypothesis(pattern: str) -> Callable[[dict], dict | None]:
    regex = re.compile(pattern, re.S)

    def convert(example: dict) -> dict | None:
        match = regex.search(example["input"])
        if not match:
            return None
        return {"premise": match["premise"].strip(), "hypothesis": match["hypothesis"].strip(), "label": _correct(example)}

    return convert


def _question(example: dict) -> dict | None:
    return {"question": example["input"].strip(), "label": _correct(example)}


# LM-BFF's masked-LM templates, which MeZO's RoBERTa experiments use: SST-2's and RTE's (the mask where the
# label word goes, a verbalizer word with a leading space).
SENTIMENT_MLM = "{sentence} It was{mask}."
NLI_MLM = "{premise}?{mask}, {hypothesis}"

# name -> (task.json inside the sdist, row converter, Task). Templates follow MeZO's conventions for
# the matching GLUE/SuperGLUE tasks: SST-2 (It was terrible/great), RTE and CB (Does this mean that ...
# is true?), BoolQ (Yes/No).
TASKS = {
    "bigbench-sentiment": (
        "multiemo/all_sentence_en/task.json",
        _sentiment,
        Task(
            "bigbench-sentiment",
            "{sentence} It was",
            {"negative": " terrible", "positive": " great"},
            mlm_template=SENTIMENT_MLM,
            description="English opinion sentences (BIG-bench multiemo), positive vs negative",
        ),
    ),
    "bigbench-epistemic": (
        "epistemic_reasoning/task.json",
        _premise_hypothesis(r"Premise:\s*(?P<premise>.*?)\s*Hypothesis:\s*(?P<hypothesis>.*)"),
        Task(
            "bigbench-epistemic",
            '{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
            {"entailment": "Yes", "non-entailment": "No"},
            mlm_template=NLI_MLM,
            description="RTE-style two-way NLI (BIG-bench epistemic_reasoning)",
        ),
    ),
    "bigbench-presuppositions": (
        "presuppositions_as_nli/task.json",
        _premise_hypothesis(r"Sentence 1:\s*(?P<premise>.*?)\s*Sentence 2:\s*(?P<hypothesis>.*?)\s*The answer is:"),
        Task(
            "bigbench-presuppositions",
            '{premise}\nDoes this mean that "{hypothesis}" is true? Yes, No, or Maybe?\n',
            {"entailment": "Yes", "contradiction": "No", "neutral": "Maybe"},
            mlm_template=NLI_MLM,
            description="CB-style three-way NLI (BIG-bench presuppositions_as_nli)",
        ),
    ),
    "bigbench-strategyqa": (
        "strategyqa/task.json",
        _question,
        Task(
            "bigbench-strategyqa",
            "Question: {question}\nAnswer:",
            {"No": " No", "Yes": " Yes"},
            description="Yes/no questions needing implicit reasoning (BIG-bench strategyqa)",
        ),
    ),
}


def full_data_dir() -> Path:
    """Where ``zotune data fetch bigbench`` writes the full tasks: ``data/bigbench`` in the zotune cache."""
    return cache_dir() / "data" / "bigbench"


def split_paths(name: str, full: bool) -> dict[str, Path]:
    """Where the train/dev/test JSONL of a task lie: the vendored extract, or the fetched full task."""
    folder = (full_data_dir() if full else VENDORED) / name
    paths = {split: folder / f"{split}.jsonl" for split in SPLITS}
    if full and not all(path.is_file() for path in paths.values()):
        raise DataError(
            f"the full task {name!r} is not in {folder}: run `zotune data fetch bigbench` first "
            "(or use the vendored extract: data=extract)"
        )
    return paths


def convert_sdist(sdist: Path, out: Path, sizes: dict[str, int] = DEFAULT_SIZES, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write seeded train/dev/test JSONL splits of every task from the sdist; returns the split sizes."""
    counts = {}
    with tarfile.open(sdist) as archive:
        for name, (member, convert, _) in TASKS.items():
            handle = archive.extractfile(f"bigbench-1.0.0/bigbench/benchmark_tasks/{member}")
            rows = _deduplicate([row for row in map(convert, json.load(handle)["examples"]) if row is not None])
            splits = split_rows(rows, sizes, seed)
            (out / name).mkdir(parents=True, exist_ok=True)
            for split, split_rows_ in splits.items():
                with open(out / name / f"{split}.jsonl", "w", encoding="utf-8") as file:
                    for row in split_rows_:
                        file.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts[name] = {split: len(rows_) for split, rows_ in splits.items()}
    return counts


def _deduplicate(rows: list[dict]) -> list[dict]:
    """One row per distinct input (BIG-bench repeats some), so that no prompt is in two splits; an input
    that occurs with different labels is dropped."""
    labels: dict[tuple, set] = {}
    first: dict[tuple, dict] = {}
    for row in rows:
        key = tuple((name, value) for name, value in row.items() if name != "label")
        labels.setdefault(key, set()).add(row["label"])
        first.setdefault(key, row)
    return [row for key, row in first.items() if len(labels[key]) == 1]


def pip_index_url() -> str:
    """The index pip downloads from here: ``PIP_INDEX_URL``, else pip's configuration (``pip config``: the
    user's, the site's, the environment's files), else PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return PYPI
    found = re.findall(r"^(?:global|download)\.index-url='([^']+)'", listed, re.MULTILINE)
    return found[-1] if found else PYPI


def download_sdist(folder: Path) -> Path:
    """The sdist from pip's index, checked against its pinned sha256. Not by ``pip download``: pip refuses this
    sdist even with ``--no-deps``, as its metadata declares a direct-URL dependency (bleurt)."""
    target = folder / SDIST_NAME
    if target.is_file() and file_digest(target) == SDIST_SHA256:
        return target
    index = f"{pip_index_url().rstrip('/')}/bigbench/"
    try:
        with urllib.request.urlopen(index, timeout=60) as response:  # honours http(s)_proxy
            page = response.read().decode()
    except OSError as error:
        raise DataError(
            f"cannot read the package index {index} ({error}): check pip's index-url and proxy, or "
            f"download {SDIST_NAME} yourself and pass --sdist"
        ) from None
    match = re.search(rf'href="([^"#]*{re.escape(SDIST_NAME)})[^"]*"', page)
    if not match:
        raise DataError(f"{index} does not list {SDIST_NAME}: download it yourself and pass --sdist")
    url = urllib.parse.urljoin(index, match.group(1))
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as file:
        shutil.copyfileobj(response, file)
    if file_digest(partial) != SDIST_SHA256:
        partial.unlink()
        raise DataError(f"{SDIST_NAME} from {url}: sha256 mismatch (expected {SDIST_SHA256}); try again")
    partial.replace(target)
    return target


def fetch(sdist: Path | None = None) -> dict[str, dict[str, int]]:
    """``zotune data fetch bigbench``: full tasks into the cache, from a local sdist or a download."""
    sdist = sdist or download_sdist(full_data_dir())
    return convert_sdist(sdist, full_data_dir())


def rows(name: str, split: str, full: bool = False) -> list[dict]:
    """The rows of one split of a BIG-bench task: from the vendored extract, or from the fetched full task."""
    return read_rows(split_paths(name, full)[split])
