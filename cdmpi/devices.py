"""Which torch device a rank computes on. No MPI here: the local rank comes from the transport."""

from __future__ import annotations

import torch

from .errors import CdmpiError


def use_deterministic_kernels(on: bool) -> None:
    """cuDNN picks among convolution kernels, some with atomic adds; fix the choice to deterministic ones."""
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on


def resolve(setting: str, local_rank: int = 0) -> torch.device:
    """auto: cuda:(local_rank mod device count) when CUDA is there, else cpu; cuda: the same, but required;
    cpu or cuda:N: as written."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if setting == "auto":
        return torch.device(f"cuda:{local_rank % count}") if count else torch.device("cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if not count:
        raise CdmpiError(f"device {setting!r} asked for, but torch sees no CUDA device")
    if setting == "cuda":
        return torch.device(f"cuda:{local_rank % count}")
    index = int(setting.split(":", 1)[1])
    if not 0 <= index < count:
        raise CdmpiError(f"device {setting!r} does not exist; torch sees {count} CUDA device(s)")
    return torch.device(setting)
