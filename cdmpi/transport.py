"""The collective contract of one training step, and its two implementations.

Every process runs the same step loop against a transport. A transport says which logical workers live
in this process (``worker_indices``) and whether it runs the server, and moves three things:

- ``gather_frames(up)``: the upload frames of the local workers, rows of a (n_local, nbytes) uint8
  tensor; the server gets all n rows in worker order, other processes get None.
- ``broadcast(down)``: the server's frame, filled in place on every worker.
- ``gather_stats(rows)``: float64 metric rows, like gather_frames.
- ``check(stop, hashes)``: every few steps, one tiny collective that tells every process whether any
  process wants to stop (SIGTERM) and every worker's checksum of x, in worker order.
- ``share(obj)`` / ``collect(obj)``: small Python objects from the server to all / from all to the server
  (checkpoint bookkeeping; never tensors of size d).

With ``topology = "sharded"`` the workers also serve the slices of the vector (slice s on worker s), and
two more collectives carry the frames instead of gather_frames/broadcast:

- ``scatter_slices(up, counts)``: every worker's frame is cut into slices of counts[s] bytes and slice s
  goes to its server (Alltoallv among the workers); returns {slice: (n, counts[slice]) frames} for the
  slices this process serves.
- ``allgather_slices(down, counts)``: each slice server has written its slice of the down frame in place;
  afterwards every worker holds the whole frame (Allgatherv among the workers). Rank 0 takes no part.

``slices_served(n_slices)`` names the slices a process serves. ``LocalTransport`` holds all n workers and the server in one process. ``MPITransport`` puts the server
on rank 0 and worker i on rank i + 1, with Gather and Bcast on preallocated buffers. This is the only
module that imports mpi4py, and only when an MPITransport is made.

Frames may live on a GPU. ``configure(cuda_aware, device)`` picks the path of this rank's frames:
"direct" hands the frame's own memory to MPI (host memory, or device memory when the MPI library is
CUDA-aware), "staged" copies frames through host buffers (pinned when CUDA is there). Metric rows are
always small host tensors.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from itertools import accumulate

import torch

# Environment variables that MPI launchers (MPICH/Hydra, Open MPI, Intel MPI, SLURM's srun) set.
LAUNCHER_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


# comm.wait = auto sleeps only for vectors this long: a step then takes many milliseconds, so a wait that
# ends up to 0.5 ms late costs little, while a core freed from spinning is worth a lot. Short vectors make
# latency-bound steps, where sleeping costs more than it frees (mushrooms, 21 ranks on 2 cores: 30% slower).
SLEEP_MIN_D = 1_000_000


def launched_by_mpi() -> bool:
    return any(name in os.environ for name in LAUNCHER_ENV)


def _offsets(counts: list[int]) -> list[int]:
    return list(accumulate(counts, initial=0))


def sharded_exchange(transport, slice_servers: dict, up: torch.Tensor, down: torch.Tensor, up_compressor,
                     down_compressor, lap=lambda phase: None) -> None:
    """One step of the sharded topology between encode and update: slice s of every up frame to its server
    (Alltoallv), each server's slice of the down frame to every worker (Allgatherv). `lap(phase)` marks
    the end of "gather", "aggregate" and "broadcast" for a PhaseTimer."""
    parts = transport.scatter_slices(up, up_compressor.slice_nbytes)
    lap("gather")
    offsets = down_compressor.offsets
    for s, slice_server in slice_servers.items():
        slice_server.aggregate(parts[s], down[offsets[s]:offsets[s + 1]])
    lap("aggregate")
    transport.allgather_slices(down, down_compressor.slice_nbytes)
    lap("broadcast")


class LocalTransport:
    """n logical workers and the server in one process; frames are handed over in memory."""

    name = "local"
    rank = 0
    world_size = 1
    is_server = True
    mpi_library = "none (in-process)"
    local_rank = 0
    path = "in-process"

    def __init__(self, n_workers: int):
        self.n_workers = n_workers
        self.worker_indices = list(range(n_workers))

    def configure(self, cuda_aware: str, device) -> str:
        return self.path

    def slices_served(self, n_slices: int) -> list[int]:
        return list(range(n_slices))

    def wants_sleep(self, mode: str, d: int) -> bool:
        return False  # one process: nothing to wait for

    def agree_wait(self, votes: list[bool]) -> bool:
        return False

    def scatter_slices(self, up: torch.Tensor, counts: list[int]) -> dict[int, torch.Tensor]:
        offsets = _offsets(counts)
        return {s: up[:, offsets[s]:offsets[s + 1]] for s in range(len(counts))}

    def allgather_slices(self, down: torch.Tensor, counts: list[int]) -> None:
        pass

    def allgather(self, obj) -> list:
        return [obj]

    def gather_frames(self, up: torch.Tensor) -> torch.Tensor:
        return up

    def broadcast(self, down: torch.Tensor) -> None:
        pass

    def gather_stats(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def check(self, stop: bool, hashes: list[int]) -> tuple[bool, list[int]]:
        return stop, list(hashes)

    def share(self, obj):
        return obj

    def collect(self, obj) -> list:
        return [obj]

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
        # Open MPI pads the version string with NULs, which HDF5 string attributes refuse.
        self.mpi_library = MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0].strip()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)  # the ranks sharing this node's memory
        self.local_rank = node.Get_rank()
        self.node_size = node.Get_size()
        node.Free()
        self.sleep_wait = False  # see agree_wait
        self.path = "direct"
        self.device = torch.device("cpu")
        self._recv: dict[tuple, torch.Tensor] = {}
        self._check_table = torch.zeros(self.world_size, 2, dtype=torch.int64)
        self._host: dict[tuple, torch.Tensor] = {}
        # Frame bytes this rank receives from other ranks, and sends to them, counted from the buffers and
        # counts handed to MPI as the collectives define them (an MPI library's trees and rings may relay
        # more): the load on this rank's link.
        self.inbound_nbytes = 0
        self.outbound_nbytes = 0
        # The workers' communicator of the sharded topology, made here because every rank constructs the
        # transport together (setup phases may fail on one rank, so they hold no collectives).
        self._workers_comm = comm.Split(MPI.UNDEFINED if self.is_server else 0, key=self.rank)

    def cuda_support(self) -> bool:
        """The MPI library's own answer (MPIX_Query_cuda_support, in Open MPI and MPICH); False if absent."""
        try:
            query = ctypes.CDLL(self._mpi.__file__).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            return False
        query.restype = ctypes.c_int
        return bool(query())

    def configure(self, cuda_aware: str, device) -> str:
        """Choose this rank's frame path: true -> direct, false -> staged (also for host frames, which is
        how the CPU-only tests run the staging code), auto -> direct for host frames or a CUDA-aware MPI."""
        self.device = torch.device(device)
        if cuda_aware == "auto":
            direct = self.device.type == "cpu" or self.cuda_support()
        else:
            direct = cuda_aware == "true"
        self.path = "direct" if direct else "staged"
        return self.path

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def wants_sleep(self, mode: str, d: int) -> bool:
        """This rank's vote for comm.wait: sleep when asked, or (auto) for long vectors when more ranks share
        this node than it has cores for this process."""
        if mode != "auto":
            return mode == "sleep"
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return d >= SLEEP_MIN_D and self.node_size > cores

    def agree_wait(self, votes: list[bool]) -> bool:
        """Every rank must wait the same way (the sleeping wait adds a barrier): sleep if any rank voted so."""
        self.sleep_wait = any(votes)
        return self.sleep_wait

    def _arrive(self, comm=None) -> None:
        """With sleep_wait: before a blocking collective, wait for every rank of comm in a barrier that
        sleeps between polls. MPI's own wait spins on a core, which is right when every rank has one; when
        ranks share cores, a spinning rank takes CPU from the ranks it is waiting for. The collective
        itself then starts with every rank there and does not spin."""
        if not self.sleep_wait:
            return
        request = (comm or self.comm).Ibarrier()
        pause = 20e-6
        while not request.Test():
            time.sleep(pause)
            pause = min(2 * pause, 5e-4)  # a long wait polls rarely; it ends at most ~0.5 ms late

    def _staging(self, shape, dtype) -> torch.Tensor:
        key = (tuple(shape), dtype)
        buf = self._host.get(key)
        if buf is None:
            buf = torch.zeros(shape, dtype=dtype, pin_memory=torch.cuda.is_available())
            self._host[key] = buf
        return buf

    def _mpi_buffer(self, t: torch.Tensor):
        if t.device.type == "cpu":
            return t.numpy()
        torch.cuda.current_stream(t.device).synchronize()  # kernels that wrote t must finish before MPI reads
        return t  # __cuda_array_interface__; needs a CUDA-aware MPI

    @classmethod
    def from_world(cls) -> "MPITransport":
        from mpi4py import MPI

        return cls(MPI.COMM_WORLD)

    def _root_buffer(self, width: int, dtype: torch.dtype, device) -> torch.Tensor:
        """(world_size, width) receive buffer, made once per frame size; row 0 is the server's slot."""
        key = (width, dtype, str(device))
        buf = self._recv.get(key)
        if buf is None:
            buf = self._recv[key] = torch.zeros(self.world_size, width, dtype=dtype, device=device)
        return buf

    def _gather(self, rows: torch.Tensor, staged: bool) -> torch.Tensor | None:
        width = rows.shape[1]
        self._arrive()
        if self.is_server:
            recv = self._root_buffer(width, rows.dtype, "cpu" if staged else rows.device)
            self.comm.Gather(self._mpi.IN_PLACE, self._mpi_buffer(recv), root=0)
            if staged and rows.device.type != "cpu":
                out = self._root_buffer(width, rows.dtype, rows.device)
                out.copy_(recv)  # blocking: recv is reused by the next MPI call
                return out[1:]
            return recv[1:]
        send = rows[0]
        if staged:
            send = self._staging((width,), rows.dtype)
            send.copy_(rows[0])
        self.comm.Gather(self._mpi_buffer(send), None, root=0)
        return None

    def gather_frames(self, up: torch.Tensor) -> torch.Tensor | None:
        """up: (n_local, nbytes) on this rank's frame device; the server passes a (0, nbytes) tensor."""
        frames = self._gather(up, self.path == "staged")
        if self.is_server:  # uint8 bytes
            self.inbound_nbytes += frames.numel()
        else:
            self.outbound_nbytes += up[0].numel()
        return frames

    def broadcast(self, down: torch.Tensor) -> None:
        self._arrive()
        if self.is_server:
            self.outbound_nbytes += down.numel() * self.n_workers
        else:
            self.inbound_nbytes += down.numel()
        if self.path == "direct":
            self.comm.Bcast(self._mpi_buffer(down), root=0)
            return
        host = self._staging(down.shape, down.dtype)
        if self.is_server:
            host.copy_(down)
        self.comm.Bcast(host.numpy(), root=0)
        if not self.is_server:
            down.copy_(host)  # blocking: host is reused by the next MPI call

    def slices_served(self, n_slices: int) -> list[int]:
        """Slice rank - 1 on a worker: the sharded topology has one slice per worker."""
        if n_slices != self.n_workers:
            raise ValueError(f"the sharded topology serves one slice per worker ({self.n_workers}), not {n_slices}")
        return [] if self.is_server else [self.rank - 1]

    def scatter_slices(self, up: torch.Tensor, counts: list[int]) -> dict[int, torch.Tensor]:
        """Alltoallv among the workers: slice s of every worker's frame to worker s."""
        if self.is_server:
            return {}
        mine = self.rank - 1
        n, width = self.n_workers, counts[mine]
        recv = self._root_buffer(width, up.dtype, up.device)[:n]  # (n, width): row i from worker i
        send, into = up[0], recv
        if self.path == "staged":
            send = self._staging((up.shape[1],), up.dtype)
            send.copy_(up[0])
            into = self._staging((n, width), up.dtype)
        offsets = _offsets(counts)
        mpi = self._mpi
        self._arrive(self._workers_comm)
        self._workers_comm.Alltoallv([self._mpi_buffer(send), (counts, offsets[:-1]), mpi.BYTE],
                                     [self._mpi_buffer(into), ([width] * n, [i * width for i in range(n)]), mpi.BYTE])
        if into is not recv:
            recv.copy_(into)
        self.inbound_nbytes += (n - 1) * width
        self.outbound_nbytes += offsets[-1] - width
        return {mine: recv}

    def allgather_slices(self, down: torch.Tensor, counts: list[int]) -> None:
        """Allgatherv in place among the workers: each worker's slice of down to every other worker."""
        if self.is_server:
            return
        mine = self.rank - 1
        offsets = _offsets(counts)
        buf = down
        if self.path == "staged":
            buf = self._staging(down.shape, down.dtype)
            buf[offsets[mine]:offsets[mine + 1]].copy_(down[offsets[mine]:offsets[mine + 1]])
        mpi = self._mpi
        self._arrive(self._workers_comm)
        self._workers_comm.Allgatherv(mpi.IN_PLACE, [self._mpi_buffer(buf), (counts, offsets[:-1]), mpi.BYTE])
        if buf is not down:
            down.copy_(buf)  # blocking: buf is reused by the next MPI call
        self.inbound_nbytes += offsets[-1] - counts[mine]
        self.outbound_nbytes += counts[mine] * (self.n_workers - 1)

    def allreduce_sum_(self, buf: torch.Tensor) -> None:
        """In place: buf = the sum of buf over every rank (bench/end_to_end.py's fp32 Allreduce baseline;
        the server passes zeros). The summation order is MPI's, so it is not bit-reproducible in-process."""
        self._arrive()
        self.comm.Allreduce(self._mpi.IN_PLACE, self._mpi_buffer(buf), op=self._mpi.SUM)

    def gather_stats(self, rows: torch.Tensor) -> torch.Tensor | None:
        return self._gather(rows.cpu(), False)

    def check(self, stop: bool, hashes: list[int]) -> tuple[bool, list[int]]:
        """Allgather of (stop flag, checksum of x) per rank: 16 bytes each. The server sends hash -1."""
        row = torch.tensor([int(stop), hashes[0] if hashes else -1], dtype=torch.int64)
        table = self._check_table
        self._arrive()
        self.comm.Allgather(row.numpy(), table.numpy())
        return bool(table[:, 0].any()), table[1:, 1].tolist()

    def share(self, obj):
        return self.comm.bcast(obj, root=0)

    def collect(self, obj) -> list | None:
        return self.comm.gather(obj, root=0)

    def agree(self, error: str | None) -> tuple[int, str] | None:
        """Collective: the first (rank, error) any rank reported, on every rank."""
        errors = self.comm.allgather(error)
        return next(((rank, e) for rank, e in enumerate(errors) if e is not None), None)

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)
