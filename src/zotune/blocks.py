"""Block-wise perturbation's blocks: which optimized parameters are perturbed together (the ZO benchmark's
module-wise perturbation), from the model's own structure rather than one architecture's module names.

- ``layer``: each transformer block (an element of the model's longest ``nn.ModuleList`` of modules with
  parameters) is one block; every module outside them that owns parameters (embeddings, the final norm, a
  head) is one block of its own, as the benchmark's "transformer-block" level groups OPT;
- ``attention-mlp``: inside a transformer block, each of its direct children (attention, MLP, each norm);
  outside, as for ``layer``;
- ``module``: every module that owns parameters (each linear layer, norm, embedding).

A parameter shared by two modules (tied embedding and head) belongs to the block of the first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import OptionError

LEVELS = ("layer", "attention-mlp", "module")


def perturbation_blocks(model: nn.Module, params: Sequence[torch.Tensor], level: str) -> list[frozenset[int]]:
    """The blocks at ``level``, each the set of indices into ``params`` (the optimized parameters) it holds, in
    the model's order; every optimized parameter is in exactly one."""
    if level not in LEVELS:
        raise OptionError(f"blocks must be one of {', '.join(LEVELS)} (or null: the whole model at once), got {level!r}")
    index_of = {id(p): i for i, p in enumerate(params)}
    layers = _transformer_blocks(model)
    if level != "module" and layers is None:
        raise OptionError(
            f"blocks={level} groups parameters by transformer block, and this model has no list of blocks: use blocks=module"
        )
    blocks: dict[str, set[int]] = {}
    for name, param in model.named_parameters():
        if id(param) not in index_of:
            continue
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        key = owner
        if layers is not None and name.startswith(f"{layers}."):
            position, inside = name[len(layers) + 1 :].split(".", 1)
            key = (
                f"{layers}.{position}"
                if level == "layer"
                else f"{layers}.{position}.{inside.split('.', 1)[0]}"
                if level == "attention-mlp"
                else owner
            )
        blocks.setdefault(key, set()).add(index_of[id(param)])
    return [frozenset(indices) for indices in blocks.values()]


def _transformer_blocks(model: nn.Module) -> str | None:
    """The name of the model's longest ``nn.ModuleList`` whose modules hold parameters (its transformer blocks)."""
    best, size = None, 0
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > size
            and all(any(True for _ in child.parameters()) for child in module)
        ):
            best, size = name, len(module)
    return best
