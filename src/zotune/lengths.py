"""Addax's data side: split the training set by token length, draw the two batches, choose L_T from memory.

An example's length is its longest sequence (prompt + candidate); with candidate scoring all of an
example's candidates run together, so that is what sets the activation memory of its first-order step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import ConfigError
from .scoring import EncodedExample

# by_length: false is Addax-WA (optimizer: addax-wa), both batches drawn from the whole training set.
ADDAX_DATA_OPTIONS = ("L_T", "K0", "K1", "memory_budget", "on_empty_bucket", "by_length")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}


def example_length(example: EncodedExample) -> int:
    """The tokens of the example's longest sequence (prompt + candidate)."""
    return max(len(sequence) for sequence in example.sequences)


def parse_memory(text) -> int:
    """Bytes from ``6GB``, ``512 MiB``, ``1.5e9`` (decimal units for kB/MB/GB, binary for KiB/MiB/GiB)."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _UNITS:
        raise ConfigError(f"memory_budget {text!r} is not a size: write e.g. 6GB, 512MiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class LengthSplit:
    """D0 = examples longer than ``threshold`` (zeroth-order), D1 = the rest (first-order); indices."""

    threshold: int | None  # None: no split (Addax-WA), both batches come from the whole set
    long: tuple[int, ...]
    short: tuple[int, ...]

    @classmethod
    def by_threshold(cls, lengths: Sequence[int], threshold: int) -> LengthSplit:
        """The split of examples of these lengths (by index) at ``threshold``: longer ones to D0, the rest to D1."""
        return cls(
            threshold,
            tuple(i for i, n in enumerate(lengths) if n > threshold),
            tuple(i for i, n in enumerate(lengths) if n <= threshold),
        )


def first_order_peak_bytes(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> int:
    """Peak memory of one in-place first-order step (forward, backward, gradients freed as they come).

    On CUDA: the allocator's peak. On CPU, where torch keeps no allocator statistics, an estimate: the
    model's parameters and buffers, plus every tensor autograd saves for backward (the activations, each
    storage counted once), plus the largest trainable gradient (IP-SGD holds one at a time)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    device = params[0].device
    if device.type == "cuda":
        handles = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in trainable]
        try:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            loss_fn().backward()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        finally:
            for handle in handles:
                handle.remove()
    weight_storages = {t.untyped_storage().data_ptr() for t in [*params, *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weight_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn()
    weights = sum(t.numel() * t.element_size() for t in [*params, *model.buffers()])
    largest_gradient = max((p.numel() * p.element_size() for p in trainable), default=0)
    return weights + sum(saved.values()) + largest_gradient


def choose_threshold(
    examples: Sequence[EncodedExample], k1: int, budget: int, measure: Callable[[list[int]], int]
) -> tuple[int, dict[int, int]]:
    """The largest L_T such that a first-order step on K1 examples no longer than L_T fits ``budget`` bytes.

    For each candidate L (a distinct length in the data), the batch measured is K1 copies of the example of
    length ≤ L with the largest padded size (candidates × length): the worst batch D1 can then produce, up
    to padding. That worst case only grows with L, so a binary search needs O(log n) measurements.
    ``measure(indices)`` returns the peak bytes for a batch of example indices. Returns L_T and the
    measurements {length: bytes}."""
    order = sorted(range(len(examples)), key=lambda i: example_length(examples[i]))
    candidates, worst = [], []  # worst[j]: the largest example among those no longer than candidates[j]
    largest = None
    for i in order:
        size = (len(examples[i].sequences) * example_length(examples[i]), example_length(examples[i]))
        if largest is None or size > largest[0]:
            largest = (size, i)
        if candidates and candidates[-1] == example_length(examples[i]):
            worst[-1] = largest[1]
        else:
            candidates.append(example_length(examples[i]))
            worst.append(largest[1])
    measured: dict[int, int] = {}

    def fits(position: int) -> bool:
        measured[candidates[position]] = measure([worst[position]] * k1)
        return measured[candidates[position]] <= budget

    if not fits(0):
        raise ConfigError(
            f"memory_budget {budget / 2**30:.2f} GiB is too small: a first-order step on K1={k1} examples of the "
            f"shortest length ({candidates[0]} tokens) needs {measured[candidates[0]] / 2**30:.2f} GiB; raise "
            "memory_budget, lower K1, or set L_T yourself"
        )
    low, high = 0, len(candidates) - 1  # invariant: candidates[low] fits
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return candidates[low], measured


def even_threshold(lengths: Sequence[int]) -> int:
    """The length L that splits ``lengths`` into {> L} and {≤ L} most evenly, both non-empty where the data
    has two distinct lengths (a plain median fails when many examples share the longest length)."""
    distinct = sorted(set(lengths))
    choices = distinct[:-1] or distinct
    return min(choices, key=lambda t: abs(2 * sum(n <= t for n in lengths) - len(lengths)))


@dataclass
class AddaxPlan:
    """How an Addax run draws its batches, and what to tell the user about it."""

    split: LengthSplit
    k0: int
    k1: int
    notes: list[str]


def check_addax_options(options: dict, batch_size: int) -> tuple[int, int, str]:
    """``(K0, K1, on_empty_bucket)`` after checking Addax's data options as far as they can be checked without
    the data (names, types, and which go together)."""
    unknown = sorted(set(options) - set(ADDAX_DATA_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown Addax data option {unknown[0]!r}: the data options are {', '.join(ADDAX_DATA_OPTIONS)}")
    k0, k1 = (options.get(key, max(1, batch_size // 2)) for key in ("K0", "K1"))
    for key, value in (("K0", k0), ("K1", k1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"optimizer_options.{key} must be a positive integer (examples per step), got {value!r}")
    on_empty = options.get("on_empty_bucket", "fallback")
    if on_empty not in ("fallback", "error"):
        raise ConfigError(f"optimizer_options.on_empty_bucket must be fallback or error, got {on_empty!r}")
    threshold, by_length = options.get("L_T"), options.get("by_length", True)
    if not isinstance(by_length, bool):
        raise ConfigError(f"optimizer_options.by_length must be true or false, got {by_length!r}")
    if not by_length:
        if "L_T" in options or "memory_budget" in options:
            raise ConfigError(
                "addax-wa draws both batches from the whole training set (by_length: false): remove "
                "L_T and memory_budget, or use optimizer=addax for the length split"
            )
    elif threshold == "auto":
        if "memory_budget" not in options:
            raise ConfigError("L_T: auto needs memory_budget (e.g. optimizer_options.memory_budget=6GB)")
        parse_memory(options["memory_budget"])
    elif "memory_budget" in options:
        raise ConfigError("memory_budget is used only with L_T: auto; remove one of them")
    elif threshold is not None and (not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1):
        raise ConfigError(f"optimizer_options.L_T must be a positive number of tokens or auto, got {threshold!r}")
    return k0, k1, on_empty


def plan_addax(
    options: dict, examples: Sequence[EncodedExample], batch_size: int, measure: Callable[[list[int]], int] | None = None
) -> AddaxPlan:
    """Check Addax's data options (``L_T``, ``K0``, ``K1``, ``memory_budget``, ``on_empty_bucket``) against the
    training set and split it. ``measure(indices)`` gives a first-order step's peak bytes (for ``L_T: auto``).

    Defaults: K0 = K1 = batch_size / 2; L_T from :func:`even_threshold` (logged). An empty bucket makes every step
    one-sided (IP-SGD on D1, or MeZO on D0), said in the notes; ``on_empty_bucket: error`` refuses instead."""
    k0, k1, on_empty = check_addax_options(options, batch_size)
    lengths = [example_length(example) for example in examples]
    notes = []
    everything = tuple(range(len(lengths)))
    if not options.get("by_length", True):
        split = LengthSplit(None, everything, everything)
        notes.append(f"addax-wa: K0={k0} and K1={k1} examples per step, both from all {len(lengths)} training examples")
    else:
        threshold = options.get("L_T")
        if threshold == "auto":
            if measure is None:
                raise ConfigError("L_T: auto needs a model to measure; it is only available in training runs")
            budget = parse_memory(options["memory_budget"])
            threshold, measurements = choose_threshold(examples, k1, budget, measure)
            table = ", ".join(f"{n}: {b / 2**20:.0f} MiB" for n, b in sorted(measurements.items()))
            notes.append(
                f"L_T=auto under memory_budget {options['memory_budget']}: L_T={threshold} "
                f"(first-order peak on K1={k1} examples by length: {table})"
            )
        elif threshold is None:
            threshold = even_threshold(lengths)
            notes.append(f"L_T not given: using {threshold} tokens, the length that splits the training set most evenly")
        split = LengthSplit.by_threshold(lengths, threshold)
        notes.append(
            f"length split at L_T={threshold} tokens: D0 (zeroth-order, longer) {len(split.long)} examples, "
            f"D1 (first-order) {len(split.short)}; lengths {min(lengths)}..{max(lengths)}"
        )
        for name, bucket, other, side in (
            ("D0", split.long, "IP-SGD on D1", "longer than"),
            ("D1", split.short, "MeZO on D0", "at most"),
        ):
            if bucket:
                continue
            problem = (
                f"{name} is empty: no training example is {side} L_T={threshold} tokens (lengths {min(lengths)}..{max(lengths)})"
            )
            if on_empty == "error":
                raise ConfigError(f"{problem}; change L_T, or set optimizer_options.on_empty_bucket=fallback")
            notes.append(f"{problem}: every step falls back to {other}")
    for name, bucket, k in (("D0", split.long, k0), ("D1", split.short, k1)):
        if bucket and k > len(bucket):
            raise ConfigError(
                f"K{name[1]}={k} is larger than {name}, which holds {len(bucket)} examples: lower K{name[1]} or move L_T"
            )
    return AddaxPlan(split, k0, k1, notes)


def agreed_plan(
    plan: AddaxPlan, from_first: Callable[[int], int], options: dict, examples: Sequence[EncodedExample], batch_size: int
) -> AddaxPlan:
    """Every rank must split the data alike, but ``L_T: auto`` measures memory on each rank's own device,
    which may differ slightly: all ranks take rank 0's threshold (``from_first``)."""
    if options.get("L_T") != "auto":
        return plan
    chosen = from_first(plan.split.threshold)
    if chosen == plan.split.threshold:
        return plan
    given = {key: value for key, value in options.items() if key != "memory_budget"}
    return plan_addax({**given, "L_T": chosen}, examples, batch_size)
