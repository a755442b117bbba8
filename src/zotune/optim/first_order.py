"""SGD and Adam, the baselines: ``torch.optim``'s own updates under zotune's training-step protocol, on a
model's trainable parameters with MeZO's weight-decay rule (none on biases and norms)."""

from __future__ import annotations

import torch

from .params import trainable_groups
from .protocol import BackwardThenStep


class SGD(BackwardThenStep, torch.optim.SGD):
    """``torch.optim.SGD``. Holds every gradient at once, unlike IP-SGD.

    Args:
        params_or_model (nn.Module | Iterable[torch.Tensor] | Iterable[dict]): a model (its trainable parameters, no decay on
            biases and norms) or parameters.
        lr: the learning rate.
        weight_decay: L2 decay, as ``torch.optim.SGD`` applies it.
        momentum: as ``torch.optim.SGD`` (0: plain SGD).
    """

    def __init__(self, params_or_model, lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.0) -> None:
        super().__init__(trainable_groups(params_or_model, weight_decay)[1], lr=lr, momentum=momentum)
        self._setup_protocol()


class Adam(BackwardThenStep, torch.optim.Adam):
    """``torch.optim.Adam``: the memory reference (two moment tensors per parameter, and every gradient).

    Args:
        params_or_model (nn.Module | Iterable[torch.Tensor] | Iterable[dict]): a model (its trainable parameters, no decay on
            biases and norms) or parameters.
        lr: the learning rate.
        weight_decay: L2 decay, as ``torch.optim.Adam`` applies it.
        betas: the moments' decay rates.
        eps: added to the denominator.
    """

    def __init__(
        self,
        params_or_model,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(trainable_groups(params_or_model, weight_decay)[1], lr=lr, betas=tuple(betas), eps=eps)
        self._setup_protocol()
