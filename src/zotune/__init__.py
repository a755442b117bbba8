"""zotune: fine-tune language models in about the memory of inference."""

from .directions import DirectionEngine
from .errors import NonFiniteLossError, ZotuneError
from .optim import InPlaceSGD, MeZO, create_optimizer

__version__ = "0.1.0"

__all__ = ["DirectionEngine", "InPlaceSGD", "MeZO", "NonFiniteLossError", "ZotuneError", "create_optimizer"]
