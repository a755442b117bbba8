"""Candidates scored from a KV cache of their prompt: one model call over the prompts, then one over every
candidate's tokens continuing from the cached keys and values.

Training and evaluation score with packing instead (:mod:`zotune.packing`), one call in all. This is the other
way of running a prompt once for all its candidates, which ``zotune bench speed --task`` times beside packing:
under module-wise perturbation each call perturbs every module again, so two calls generate z twice per
forward, against packing's longer rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .scoring import candidate_means


def cached_candidate_scores(model: nn.Module, examples: Sequence, pad_id: int) -> torch.Tensor:
    """:func:`zotune.scoring.candidate_scores` by a KV cache: the distinct prompts run once, left-padded, with
    their cache kept; a candidate's first token is read at its prompt's last position, and the candidates of
    several tokens run together from their prompts' cache, with the positions that follow each prompt."""
    device = next(model.parameters()).device
    prompts, index_of = [], {}
    firsts, continuations = [], []  # (prompt, target, owner); (prompt, tokens, owner)
    owner = 0
    for example in examples:
        for sequence, length in zip(example.sequences, example.candidate_lengths):
            prompt = tuple(sequence[: len(sequence) - length])
            if prompt not in index_of:
                index_of[prompt] = len(prompts)
                prompts.append(prompt)
            candidate = sequence[len(sequence) - length :]
            firsts.append((index_of[prompt], candidate[0], owner))
            if length > 1:
                continuations.append((index_of[prompt], candidate, owner))
            owner += 1
    longest = max(map(len, prompts))
    prompt_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left-padded, so every prompt ends at the last position
        prompt_ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        prompt_mask[row, longest - len(prompt) :] = 1
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    decoder = model.get_decoder()
    out = decoder(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0), use_cache=True
    )
    hidden = [out.last_hidden_state[[p for p, _, _ in firsts], -1]]
    targets, owners = [t for _, t, _ in firsts], [o for _, _, o in firsts]
    if continuations:
        rows = torch.tensor([p for p, _, _ in continuations], device=device)
        cache = out.past_key_values
        cache.batch_select_indices(rows)
        width = max(len(tokens) for _, tokens, _ in continuations) - 1
        ids = torch.full((len(continuations), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(continuations), width), dtype=torch.long)
        reads = []
        for row, (_, tokens, candidate) in enumerate(continuations):  # the state at t predicts token t + 1
            ids[row, : len(tokens) - 1] = torch.tensor(tokens[:-1])
            mask[row, : len(tokens) - 1] = 1
            reads += [(row, t) for t in range(len(tokens) - 1)]
            targets += list(tokens[1:])
            owners += [candidate] * (len(tokens) - 1)
        lengths = prompt_mask.sum(1)[rows]
        continued = decoder(
            input_ids=ids.to(device),
            attention_mask=torch.cat([prompt_mask[rows], mask.to(device)], dim=1),
            position_ids=lengths[:, None] + torch.arange(width, device=device),
            past_key_values=cache,
        ).last_hidden_state
        read_rows, read_positions = torch.tensor(reads, device=device).T
        hidden.append(continued[read_rows, read_positions])
    log_probs = torch.log_softmax(model.get_output_embeddings()(torch.cat(hidden)).float(), dim=-1)
    token_scores = log_probs.gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
    return candidate_means(examples, torch.tensor(owners, device=device), token_scores)
