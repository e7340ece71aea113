"""The control word: what every step's message says besides its frame, and the decision made from it.

Each worker's message of a step starts with a 40-byte header of little-endian 8-byte fields: int64 flags,
the step the worker is at, on check steps the checksum of its copy of x, the float64 learning rate it will
step with, and the int64 size of the metric values it logs this step (the server gathers them next, in one
Gatherv whose counts these are). The server (every rank, in the
sharded topology, from the same table) turns the n headers into one decision, which travels back in the
header of the download message. So the server needs no step count, no extra collective and no schedule of
its own: a run ends when the workers say DONE, as mpi4py's server loops stop on an in-band message.

Pure functions; no MPI, no tensors of size d.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch
# torch is imported where tensors are made: `cdmpi project` reads HEADER_NBYTES and must not load torch.

HEADER_NBYTES = 40  # int64 flags, step, checksum; float64 learning rate; int64 metric bytes


class Flag(enum.IntFlag):
    NONE = 0
    # From a worker: it has metric values for this step. In a decision: the server gathers them.
    LOG = 1
    EVAL = 2
    # From a worker: its process got SIGTERM. In a decision: checkpoint after this step, then stop (exit 75).
    STOP = 4
    # From a worker: it takes no more steps (its message holds no frame). In a decision: the run ends.
    DONE = 8
    # From a worker: the checksum field holds the checksum of its x at this step.
    CHECK = 16
    # From a worker: its gradient at this step is not finite (the frame is not valid).
    NONFINITE = 32
    # From a worker: it asks for a checkpoint after this step. In a decision: write one.
    CHECKPOINT = 64
    # Decisions only: an agreed error (every rank stops, rank 0 says why).
    ABORT = 128
    # From a worker: its gradient overflowed (fp16 GradScaler) and its frame is not valid. In a decision:
    # no worker updates x this step, and every encoder's state stays as it was before the step.
    SKIP = 256
    # From a worker: opt.step() came without a gradient (no backward() since the previous step).
    NOGRAD = 512


NON_FINITE = -2  # in place of a checksum: this worker's x holds inf or nan


def x_checksum(x: torch.Tensor) -> int:
    """A 62-bit digest of x's bytes (copies of x on different workers must agree bit for bit), or
    NON_FINITE."""
    import torch

    if not bool(torch.isfinite(x).all()):
        return NON_FINITE
    digest = hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


@dataclass(frozen=True)
class Header:
    flags: Flag
    step: int
    checksum: int = 0
    lr: float = 0.0
    metrics_nbytes: int = 0


def pack_headers(headers: Sequence[Header]) -> torch.Tensor:
    """(len(headers), HEADER_NBYTES) uint8 on the CPU, one row per header."""
    words = np.array([[int(h.flags), h.step, h.checksum, 0, h.metrics_nbytes] for h in headers],
                     dtype="<i8").reshape(-1, 5)
    words[:, 3] = np.array([h.lr for h in headers], dtype="<f8").view("<i8")
    import torch

    return torch.from_numpy(words.view(np.uint8))


def unpack_headers(rows: torch.Tensor) -> list[Header]:
    """The headers in the first HEADER_NBYTES bytes of each row of a (k, >= HEADER_NBYTES) uint8 tensor."""
    words = rows[:, :HEADER_NBYTES].cpu().contiguous().numpy().view("<i8")
    lrs = words[:, 3].copy().view("<f8")
    return [Header(Flag(int(f)), int(s), int(c), float(lr), int(m)) for (f, s, c, _, m), lr in zip(words, lrs)]


@dataclass(frozen=True)
class Decision:
    flags: Flag
    error: str | None = None  # with ABORT, on the rank that decided: what went wrong
    metrics_nbytes: tuple[int, ...] = ()  # on the rank that decided: each worker's metric bytes this step

    def __contains__(self, flag: Flag) -> bool:
        return bool(self.flags & flag)


def checksum_error(step: int, checksums: Sequence[int], where: Callable[[Sequence[int]], str]) -> str | None:
    """What is wrong with the workers' x checksums (worker i's at index i), or None: some x is not finite,
    or the copies differ (the minority is named)."""
    bad = [i for i, c in enumerate(checksums) if c == NON_FINITE]
    if bad:
        return f"non-finite x at step {step} on {where(bad)}"
    values = sorted(set(checksums), key=list(checksums).count, reverse=True)
    if len(values) > 1:
        odd = [i for i, c in enumerate(checksums) if c != values[0]]
        return (f"the workers' copies of x differ at step {step}: {where(odd)} disagree(s) with the other "
                f"{len(checksums) - len(odd)} worker(s)")
    return None


def decide(step: int, workers: Sequence[Header], stop: bool, *, checkpoint_every: int,
           worker_rank: Callable[[int], int]) -> Decision:
    """The decision of one step from the n workers' headers (worker i's at index i) and the deciding
    process's own stop request. Every rank that decides from the same input decides the same."""
    def where(indices) -> str:
        return ", ".join(f"worker {i} (rank {worker_rank(i)})" for i in indices)

    def abort(message: str) -> Decision:
        return Decision(Flag.ABORT, message)

    astray = [i for i, h in enumerate(workers) if h.step != step]
    if astray:
        i = astray[0]
        return abort(f"{where([i])} is at step {workers[i].step} while the run is at step {step}: every "
                     f"worker must take the same steps (an optimizer state loaded on its own? the server's "
                     f"half of the state comes from the run's checkpoint: resume with resume='auto')")
    done = [i for i, h in enumerate(workers) if Flag.DONE in h.flags]
    if done and len(done) != len(workers):
        going = [i for i in range(len(workers)) if i not in done]
        return abort(f"{where(done)} finished at step {step} while {where(going)} went on: every worker must "
                     f"take the same number of steps")
    bad = [i for i, h in enumerate(workers) if Flag.NOGRAD in h.flags]
    if bad:
        return abort(f"optimizer.step() at step {step} without a gradient on {where(bad[:1])}: no backward() since "
                     f"the previous step (it would step on zero gradients)")
    bad = [i for i, h in enumerate(workers) if Flag.NONFINITE in h.flags]
    if bad:
        return abort(f"non-finite loss or gradient at step {step} from {where(bad[:1])}")
    stepping = [i for i, h in enumerate(workers) if Flag.DONE not in h.flags]
    odd = [i for i in stepping if workers[i].lr != workers[stepping[0]].lr]
    if odd:
        i, j = stepping[0], odd[0]
        return abort(f"the workers step with different learning rates at step {step}: {where([i])} with "
                     f"{workers[i].lr!r}, {where([j])} with {workers[j].lr!r}; every worker must use the same "
                     f"schedule (or their copies of x part)")
    checked = [h.checksum for h in workers if Flag.CHECK in h.flags]
    if len(checked) == len(workers):
        error = checksum_error(step, checked, where)
        if error:
            return abort(error)
    flags = Flag.NONE
    for h in workers:
        flags |= h.flags & (Flag.LOG | Flag.EVAL | Flag.CHECKPOINT | Flag.SKIP)
    if done:
        flags |= Flag.DONE
    elif stop or any(Flag.STOP in h.flags for h in workers):
        flags |= Flag.STOP | Flag.CHECKPOINT
    elif checkpoint_every > 0 and (step + 1) % checkpoint_every == 0:
        flags |= Flag.CHECKPOINT
    return Decision(flags, metrics_nbytes=tuple(h.metrics_nbytes for h in workers))
