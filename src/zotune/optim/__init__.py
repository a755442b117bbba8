"""Optimizers, one file each, all ``torch.optim.Optimizer`` subclasses under the training-step protocol
(:mod:`zotune.optim.protocol`), and a registry by name: a new optimizer is its file and one line here."""

from __future__ import annotations

from torch import nn

from ..errors import OptionError
from .adamezo import AdaMeZO
from .addax import Addax
from .first_order import SGD, Adam
from .forward_grad import ForwardGrad
from .inplace_sgd import InPlaceSGD
from .mezo import MeZO
from .params import is_decayed, trainable_groups
from .svrg import MeZOSVRG
from .zo_adam import ZOAdam
from .zo_conservative import ZOSGDConservative
from .zo_momentum import ZOSGDMomentum
from .zo_sign import ZOSGDSign

OPTIMIZERS = {
    "mezo": MeZO,
    "adamezo": AdaMeZO,
    "addax": Addax,
    "svrg": MeZOSVRG,
    "zo-sign": ZOSGDSign,
    "zo-momentum": ZOSGDMomentum,
    "zo-cons": ZOSGDConservative,
    "zo-adam": ZOAdam,
    "forward-grad": ForwardGrad,
    "ip-sgd": InPlaceSGD,
    "sgd": SGD,
    "adam": Adam,
}
# Names for an optimizer with some of its options set: (the optimizer's name, those options).
ALIASES = {"addax-wa": ("addax", {"by_length": False})}  # Addax-WA: both batches from the whole set


def resolve(name: str) -> tuple[type, dict]:
    """The optimizer class a name stands for, and the options the name sets."""
    base, preset = ALIASES.get(name, (name, {}))
    if base not in OPTIMIZERS:
        raise OptionError(f"unknown optimizer {name!r}: choose one of {', '.join(sorted([*OPTIMIZERS, *ALIASES]))}")
    return OPTIMIZERS[base], dict(preset)


def create_optimizer(name: str, model: nn.Module, **hyperparameters):
    """Build optimizer ``name`` for the trainable parameters of ``model`` (no decay on biases/norms). Options
    that shape the data (the class's ``data_options``) are not the optimizer's and are left out."""
    cls, preset = resolve(name)
    options = {**preset, **hyperparameters}
    return cls(model, **{key: value for key, value in options.items() if key not in cls.data_options})


__all__ = [
    "ALIASES",
    "OPTIMIZERS",
    "SGD",
    "AdaMeZO",
    "Adam",
    "Addax",
    "ForwardGrad",
    "InPlaceSGD",
    "MeZO",
    "MeZOSVRG",
    "ZOAdam",
    "ZOSGDConservative",
    "ZOSGDMomentum",
    "ZOSGDSign",
    "create_optimizer",
    "is_decayed",
    "resolve",
    "trainable_groups",
]
