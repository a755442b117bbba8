"""zotune: fine-tune language models in about the memory of inference.

Names are imported on first use, so that ``zotune.cli`` can set OpenMP's environment before torch loads.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "DirectionEngine": "zotune.directions",
    "NonFiniteLossError": "zotune.errors",
    "NonFiniteGradientError": "zotune.errors",
    "ZotuneError": "zotune.errors",
    "AdaMeZO": "zotune.optim",
    "Addax": "zotune.optim",
    "InPlaceSGD": "zotune.optim",
    "MeZO": "zotune.optim",
    "MeZOSVRG": "zotune.optim",
    "create_optimizer": "zotune.optim",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'zotune' has no attribute {name!r}")
