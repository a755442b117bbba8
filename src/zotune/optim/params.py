"""Turning a model or an iterable of parameters into torch.optim parameter groups."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import OptionError
from torch import nn


def is_decayed(name: str, param: torch.Tensor) -> bool:
    """MeZO's rule, generalised: no weight decay on biases and normalisation weights (1-D or named so)."""
    lowered = name.lower()
    return param.ndim >= 2 and "bias" not in lowered and "norm" not in lowered


def fsdp_optimizers() -> list[str]:
    """The registered optimizers that train FSDP2 shards with their default options."""
    from . import OPTIMIZERS  # the registry imports this module

    return [name for name, cls in OPTIMIZERS.items() if cls.fsdp_problem({}) is None]


def is_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is an FSDP2 shard (a DTensor)."""
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def refuse_sharded(params, why: str) -> None:
    """Raises if any parameter is an FSDP2 shard (a DTensor), naming what does support them."""
    if any(is_sharded(p) for p in params):
        raise OptionError(
            f"FSDP2-sharded parameters: {why}. With fully_shard use {', '.join(fsdp_optimizers())}, "
            "given the parameters, not the model (in-place perturbation)"
        )


def trainable_groups(params_or_model, weight_decay: float = 0.0) -> tuple[nn.Module | None, list[dict]]:
    """Return ``(model or None, param_groups)`` holding only parameters with ``requires_grad``.

    Given a model, parameters are split into a decayed group and a ``weight_decay=0`` group by
    :func:`is_decayed`. Given parameters or groups, they are kept as they are (minus frozen ones).
    """
    if isinstance(params_or_model, nn.Module):
        model = params_or_model
        decayed, plain = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (decayed if is_decayed(name, param) else plain).append(param)
        groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    else:
        model = None
        given = list(params_or_model) if isinstance(params_or_model, Iterable) else None
        if given is None or (given and not all(isinstance(g, (dict, torch.Tensor)) for g in given)):
            raise TypeError(
                "expected an nn.Module, an iterable of tensors or an iterable of parameter-group dicts, "
                f"got {type(params_or_model).__name__}"
            )
        if given and isinstance(given[0], dict):
            groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in given]
        else:
            groups = [{"params": [p for p in given if p.requires_grad]}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise OptionError(
            "no parameter requires grad: unfreeze the parameters to train (param.requires_grad_(True)) "
            "or select them with LoRA/prefix tuning"
        )
    return model, groups
