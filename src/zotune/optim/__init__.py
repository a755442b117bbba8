"""Optimizers, one file each, all torch.optim.Optimizer subclasses, and a registry by name."""

from __future__ import annotations

import torch

from ..errors import OptionError
from torch import nn

from .adamezo import AdaMeZO
from .addax import Addax
from .inplace_sgd import InPlaceSGD
from .mezo import MeZO
from .svrg import MeZOSVRG
from .params import is_decayed, trainable_groups

OPTIMIZERS = {
    "mezo": MeZO,
    "adamezo": AdaMeZO,
    "addax": Addax,
    "addax-wa": Addax,  # the same optimizer; the trainer draws both batches from the whole set
    "svrg": MeZOSVRG,
    "ip-sgd": InPlaceSGD,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}


def create_optimizer(name: str, model: nn.Module, **hyperparameters) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for the trainable parameters of ``model`` (no decay on biases/norms)."""
    if name not in OPTIMIZERS:
        raise OptionError(f"unknown optimizer {name!r}: choose one of {', '.join(sorted(OPTIMIZERS))}")
    cls = OPTIMIZERS[name]
    if cls in (torch.optim.SGD, torch.optim.Adam):
        _, groups = trainable_groups(model, hyperparameters.pop("weight_decay", 0.0))
        return cls(groups, **hyperparameters)
    return cls(model, **hyperparameters)


__all__ = ["OPTIMIZERS", "AdaMeZO", "Addax", "InPlaceSGD", "MeZO", "MeZOSVRG", "create_optimizer", "is_decayed", "trainable_groups"]
