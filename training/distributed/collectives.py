"""Small collectives over the training process group, for figures computed on CPU copies.

NCCL reduces CUDA tensors only, so each collective runs on the model's device and returns a CPU tensor.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def to_device(x, device: torch.device):
    """``x`` (tensor, KeyedJaggedTensor or batch with ``.to``) on ``device``; itself when that is the CPU."""
    return x if device.type == "cpu" else x.to(device)


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` summed over the ranks, as a CPU tensor (the collective on ``device``)."""
    t = to_device(t, device)
    dist.all_reduce(t)
    return t.cpu()


def all_reduce_max(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t``'s element-wise maximum over the ranks, as a CPU tensor (the collective on ``device``)."""
    t = to_device(t, device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu()


def all_gather_arrays(*arrays: np.ndarray) -> list[np.ndarray]:
    """Each of ``arrays`` concatenated over the ranks, in rank order (every rank gets all)."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, arrays)
    return [np.concatenate([g[i] for g in gathered]) for i in range(len(arrays))]
