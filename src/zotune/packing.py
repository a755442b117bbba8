"""Candidates packed behind their shared prompt, so that a prompt runs once for all its candidates.

A candidate's first token is predicted from the prompt's last position, which every candidate shares; its
later tokens need the candidate's own earlier tokens as input. A row therefore holds a prompt once, then
for each candidate of two or more tokens a *block* of all its tokens but the last. A single-token
candidate adds nothing to the row. Each block sees the prompt and itself only (a block-causal attention
mask) and takes the positions that follow the prompt, so it computes what it would as its own sequence.

A row with at most one block needs nothing but the ordinary causal mask, which every causal LM builds
itself. A row with more blocks needs a 4-D mask and position ids given to the model, which
:func:`takes_block_mask` allows for the architectures tested to honour both; for the others each
candidate of several tokens gets a row of its own (the single-token ones still share the first).
Candidates whose prompts differ (a long prompt cut to fit a longer candidate) go in different rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import OptionError

# Model types whose transformers implementation takes a custom 4-D mask as is and uses the position ids it is
# given (tested against one sequence per candidate in tests/test_packing.py).
BLOCK_MASK_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2", "opt"})


@dataclass(frozen=True)
class PackedBatch:
    """Rows to run and, for every candidate token, where it is predicted: ``reads[i] = (row, position)``
    predicts ``targets[i]``, a token of candidate ``owners[i]`` (the index of the candidate in the examples'
    order, example by example)."""

    input_ids: torch.Tensor  # [rows, longest]
    attention_mask: torch.Tensor  # [rows, longest] (0/1), or a 4-D [rows, 1, longest, longest] bool mask
    position_ids: torch.Tensor | None  # given with a 4-D mask only
    reads: tuple[tuple[int, int], ...]
    targets: tuple[int, ...]
    owners: tuple[int, ...]


def takes_block_mask(model: nn.Module) -> bool:
    """Whether the model's architecture and attention implementation honour a custom 4-D mask and position ids
    (eager and SDPA attention do; FlashAttention takes no arbitrary mask)."""
    config = getattr(model, "config", None)
    return (
        getattr(config, "model_type", None) in BLOCK_MASK_MODELS
        and getattr(config, "_attn_implementation", None) in ("eager", "sdpa")
        and not getattr(config, "use_sliding_window", False)
    )


def pack(examples: Sequence, pad_id: int, block_mask: bool) -> PackedBatch:
    """The examples' candidates packed behind their prompts (see the module docstring); ``block_mask``: rows
    may hold several blocks."""
    rows, reads, targets, owners = [], [], [], []
    owner = 0
    for example in examples:
        groups: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
        for sequence, length in zip(example.sequences, example.candidate_lengths):
            groups.setdefault(tuple(sequence[: len(sequence) - length]), []).append((owner, tuple(sequence[-length:])))
            owner += 1
        for prompt, candidates in groups.items():
            if not prompt:
                raise OptionError(
                    "a candidate has no prompt before it, so nothing predicts its first token: give every "
                    "example a prompt (or use a tokenizer that adds a BOS token)"
                )
            single = [c for c in candidates if len(c[1]) == 1]
            several = [c for c in candidates if len(c[1]) > 1]
            first = len(rows)
            for chunk in [several] if block_mask else ([[c] for c in several] or [[]]):
                row = len(rows)
                tokens, positions, blocks = list(prompt), list(range(len(prompt))), [0] * len(prompt)
                for index, (cand_owner, candidate) in enumerate(chunk, start=1):
                    start = len(tokens)
                    tokens += candidate[:-1]
                    positions += range(len(prompt), len(prompt) + len(candidate) - 1)
                    blocks += [index] * (len(candidate) - 1)
                    _read(
                        reads,
                        targets,
                        owners,
                        cand_owner,
                        candidate,
                        [(row, len(prompt) - 1)] + [(row, start + j) for j in range(len(candidate) - 1)],
                    )
                rows.append((tokens, positions, blocks, len(chunk)))
            for cand_owner, candidate in single:  # read at the prompt's end in the prompt's first row
                _read(reads, targets, owners, cand_owner, candidate, [(first, len(prompt) - 1)])
    return _batched(rows, reads, targets, owners, pad_id)


def _read(reads, targets, owners, owner, candidate, where):
    reads.extend(where)
    targets.extend(candidate)
    owners.extend([owner] * len(candidate))


def _batched(rows, reads, targets, owners, pad_id) -> PackedBatch:
    longest = max(len(tokens) for tokens, *_ in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    for r, (tokens, *_) in enumerate(rows):
        input_ids[r, : len(tokens)] = torch.tensor(tokens)
    if all(count <= 1 for *_, count in rows):
        attention = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, (tokens, *_) in enumerate(rows):
            attention[r, : len(tokens)] = 1
        return PackedBatch(input_ids, attention, None, tuple(reads), tuple(targets), tuple(owners))
    blocks = torch.full((len(rows), longest), -1, dtype=torch.long)
    positions = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, (tokens, row_positions, row_blocks, _) in enumerate(rows):
        blocks[r, : len(tokens)] = torch.tensor(row_blocks)
        positions[r, : len(tokens)] = torch.tensor(row_positions)
    query, key = blocks[:, :, None], blocks[:, None, :]
    causal = torch.ones(longest, longest, dtype=torch.bool).tril()
    seen = causal & (key >= 0) & ((key == query) | (key == 0))
    seen |= torch.eye(longest, dtype=torch.bool)  # a padding position sees itself, so no row of the mask is empty
    return PackedBatch(input_ids, seen[:, None], positions, tuple(reads), tuple(targets), tuple(owners))


def packing_note(model: nn.Module, examples: Sequence) -> str | None:
    """A note for the run's log when the model cannot take a block mask and some prompt has several candidates
    of two or more tokens, which then run one row each."""
    if takes_block_mask(model):
        return None
    for example in examples:
        prompts = [
            sequence[: len(sequence) - length]
            for sequence, length in zip(example.sequences, example.candidate_lengths)
            if length > 1
        ]
        if len(prompts) > len(set(prompts)):
            kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            return (
                f"note: {kind} models are not known to take a block-causal attention mask (zotune.packing), so "
                "candidates of several tokens run one sequence each behind their prompt (slower, same scores)"
            )
    return None
