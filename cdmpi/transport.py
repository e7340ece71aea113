"""The collective contract of one training step, and its two implementations.

Every process runs the same step loop against a transport. A transport says which logical workers live
in this process (``worker_indices``) and whether it runs the server, and moves three things:

- ``gather_frames(up)``: the upload frames of the local workers, rows of a (n_local, nbytes) uint8
  tensor; the server gets all n rows in worker order, other processes get None.
- ``broadcast(down)``: the server's frame, filled in place on every worker.
- ``gather_stats(rows)``: float64 metric rows, like gather_frames.

``LocalTransport`` holds all n workers and the server in one process. ``MPITransport`` puts the server
on rank 0 and worker i on rank i + 1, with Gather and Bcast on preallocated buffers. This is the only
module that imports mpi4py, and only when an MPITransport is made.
"""

from __future__ import annotations

import os
import sys

import torch

# Environment variables that MPI launchers (MPICH/Hydra, Open MPI, Intel MPI, SLURM's srun) set.
LAUNCHER_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def launched_by_mpi() -> bool:
    return any(name in os.environ for name in LAUNCHER_ENV)


class LocalTransport:
    """n logical workers and the server in one process; frames are handed over in memory."""

    name = "local"
    rank = 0
    world_size = 1
    is_server = True
    mpi_library = "none (in-process)"

    def __init__(self, n_workers: int):
        self.n_workers = n_workers
        self.worker_indices = list(range(n_workers))

    def gather_frames(self, up: torch.Tensor) -> torch.Tensor:
        return up

    def broadcast(self, down: torch.Tensor) -> None:
        pass

    def gather_stats(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def agree(self, error: str | None) -> tuple[int, str] | None:
        return None if error is None else (0, error)

    def abort(self, code: int = 1) -> None:
        sys.stderr.flush()
        os._exit(code)


class MPITransport:
    """Server on rank 0, worker i on rank i + 1."""

    name = "mpi"

    def __init__(self, comm):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        self.n_workers = self.world_size - 1
        self.is_server = self.rank == 0
        self.worker_indices = [] if self.is_server else [self.rank - 1]
        self.mpi_library = MPI.Get_library_version().strip().splitlines()[0].strip()
        self._recv: dict[tuple, torch.Tensor] = {}
        # Bytes of the frame buffers this rank handed to MPI: sent by Gather (a worker's frame) or received
        # (the server's n frames), and the Bcast buffer (once per rank).
        self.frame_nbytes = {"gather": 0, "broadcast": 0}

    @classmethod
    def from_world(cls) -> "MPITransport":
        from mpi4py import MPI

        return cls(MPI.COMM_WORLD)

    def _root_buffer(self, width: int, dtype: torch.dtype) -> torch.Tensor:
        """(world_size, width) receive buffer, made once per frame size; row 0 is the server's slot."""
        key = (width, dtype)
        buf = self._recv.get(key)
        if buf is None:
            buf = self._recv[key] = torch.zeros(self.world_size, width, dtype=dtype)
        return buf

    def _gather(self, rows: torch.Tensor) -> torch.Tensor | None:
        if self.is_server:
            recv = self._root_buffer(rows.shape[1], rows.dtype)
            self.comm.Gather(self._mpi.IN_PLACE, recv.numpy(), root=0)
            return recv[1:]
        self.comm.Gather(rows[0].numpy(), None, root=0)
        return None

    def gather_frames(self, up: torch.Tensor) -> torch.Tensor | None:
        frames = self._gather(up)
        self.frame_nbytes["gather"] += (frames if self.is_server else up[0]).numpy().nbytes
        return frames

    def broadcast(self, down: torch.Tensor) -> None:
        buf = down.numpy()
        self.comm.Bcast(buf, root=0)
        self.frame_nbytes["broadcast"] += buf.nbytes

    def allreduce_sum_(self, buf: torch.Tensor) -> None:
        """In place: buf = the sum of buf over every rank (bench/end_to_end.py's fp32 Allreduce baseline;
        the server passes zeros). The summation order is MPI's, so it is not bit-reproducible in-process."""
        self.comm.Allreduce(self._mpi.IN_PLACE, buf.numpy(), op=self._mpi.SUM)

    def gather_stats(self, rows: torch.Tensor) -> torch.Tensor | None:
        return self._gather(rows)

    def agree(self, error: str | None) -> tuple[int, str] | None:
        """Collective: the first (rank, error) any rank reported, on every rank."""
        errors = self.comm.allgather(error)
        return next(((rank, e) for rank, e in enumerate(errors) if e is not None), None)

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)
