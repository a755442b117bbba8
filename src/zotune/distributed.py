"""Data-parallel training on torch.distributed (launched by ``torchrun``).

Every rank holds the whole model and the same seed stream, and takes its own equal slice of each batch.
A zeroth-order step then needs only the batch-mean losses L+ and L−: each rank evaluates them on its
slice, one all-reduce of those two numbers (16 bytes) makes them the means over the whole batch, and
every rank computes the same c and applies the same update to identical weights. No parameter or
gradient ever crosses the network. First-order parts (IP-SGD, Addax's short batch) all-reduce each
gradient inside its backward hook, just before the in-place update, so they still never hold more than
one gradient.

With equal slices, the mean of the per-rank means is the mean over the batch, so a run on N ranks
equals a one-process run on the concatenated batch up to float rounding (tested). Losses that average
over tokens (generation tasks) are averaged per rank first, which weighs each rank's slice equally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import OptionError


@dataclass
class DataParallel:
    """The process group as the optimizers see it; counts the bytes it all-reduces."""

    rank: int
    world_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    communicated_bytes: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, values: list[float]) -> list[float]:
        """The mean of each value over the ranks, in one all-reduce."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        self.communicated_bytes += tensor.numel() * tensor.element_size()
        return (tensor / self.world_size).tolist()

    def mean_gradient(self, grad: torch.Tensor) -> None:
        """Replaces ``grad`` by its mean over the ranks, in place."""
        dist.all_reduce(grad)
        grad.div_(self.world_size)
        self.communicated_bytes += grad.numel() * grad.element_size()

    def from_first(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (e.g. a length threshold chosen from a memory measurement,
        which may differ slightly between devices)."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        self.communicated_bytes += tensor.element_size()
        return int(tensor.item())

    def agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (e.g. a stop request that reached only some)."""
        tensor = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        self.communicated_bytes += tensor.element_size()
        return bool(tensor.item())

    def shard(self, batch: list, name: str = "batch") -> list:
        """This rank's contiguous slice of ``batch``: rank r takes items [r·k, (r+1)·k), k = len / world size."""
        if len(batch) % self.world_size:
            raise OptionError(
                f"the {name} of {len(batch)} examples cannot be split evenly over {self.world_size} "
                f"processes: make it a multiple of {self.world_size}"
            )
        size = len(batch) // self.world_size
        return batch[self.rank * size : (self.rank + 1) * size]


def from_environment(cuda: bool | None = None) -> DataParallel | None:
    """Joins the process group torchrun describes in the environment: NCCL with one GPU per rank when
    ``cuda`` (default: when the machine has a GPU), else gloo. None in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if torch.cuda.is_available() if cuda is None else cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DataParallel(dist.get_rank(), dist.get_world_size(), device)


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: shards a Hugging Face model's transformer blocks and the rest of the model over the default process
    group, each rank keeping 1/N of every parameter (rows of dim 0). For zeroth-order training: pass
    ``model.parameters()`` to an optimizer that trains shards (its ``fsdp_problem`` is None), which perturbs
    and updates each rank's shard with directions keyed by position in the whole parameter, and make the
    optimizer :func:`data_parallel` so the ranks agree on the losses.

    Every module, the root too, frees its gathered parameters after its forward: with no backward to
    follow, a module left gathered would keep serving its stale copy while the optimizer updates the shards.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in transformer_blocks(model):
        fully_shard(layer)
    fully_shard(model, reshard_after_forward=True)
    # FSDP2 makes the first module whose forward runs the root, and a root keeps its parameters gathered.
    # Scoring calls the body and the head directly, so without this one-token forward through the model
    # every layer would become a root and serve stale gathered copies after the shards are updated.
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device))
    return model


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of transformer blocks, whatever the architecture calls it (a decoder's ``layers``,
    BERT's ``encoder.layer``, GPT-2's ``h``...): its largest ModuleList by parameters."""
    lists = [module for module in model.modules() if isinstance(module, torch.nn.ModuleList) and len(module)]
    if not lists:
        raise OptionError(f"fsdp: {type(model).__name__} has no list of transformer blocks to shard")
    return max(lists, key=lambda blocks: sum(p.numel() for p in blocks.parameters()))


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole model's weights on the CPU, gathered from the shards (every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: torch.nn.Module, state: dict) -> None:
    """Loads whole weights (as :func:`full_state_dict` saves them) into a sharded model; each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def data_parallel(optimizer: torch.optim.Optimizer, group: DataParallel) -> torch.optim.Optimizer:
    """Makes a zotune optimizer's steps data parallel over ``group``: its losses (and, for first-order
    updates, its gradients) are averaged over the ranks, as the optimizer's ``data_parallel`` says. Each
    rank's closure must return the loss on its own slice of the batch (:meth:`DataParallel.shard`). Other
    optimizers (plain ``torch.optim``) are refused: wrap the model in DistributedDataParallel for them."""
    if not callable(getattr(optimizer, "data_parallel", None)):
        raise OptionError(
            f"{type(optimizer).__name__} is not a zotune optimizer: wrap the model in "
            "torch.nn.parallel.DistributedDataParallel instead"
        )
    optimizer.data_parallel(group)
    return optimizer
