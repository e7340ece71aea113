"""The collectives of a run, as one typed contract (``Transport``), and its two implementations.

Every process of a run holds a transport. It says which logical workers live in this process
(``worker_indices``), whether the process runs the server (``is_server``) and which rank serves worker i
(``worker_rank(i)``), and it moves:

- ``gather_frames(up)``: the local workers' messages, rows of a (n_local, nbytes) uint8 tensor; the server
  gets all n rows in worker order, other processes get None.
- ``broadcast(down)``: the server's message, filled in place on every worker.
- ``gather_control(rows)``: one control header per process (the server's first, then worker i's), on
  every process (the sharded topology's per-step agreement).
- ``scatter_slices(up, counts)`` / ``allgather_slices(down, counts)``: the sharded topology's frames. Every
  worker's frame is cut into slices of counts[s] bytes and slice s goes to its server (Alltoallv among the
  workers); afterwards each slice server's part of the download frame goes to every worker (Allgatherv).
  Rank 0 takes no part. ``slices_served(n_slices)`` names the slices a process serves.
- ``gather_stats(rows)``: float64 rows, like gather_frames (timing and final parameters).
- ``pack_objects(objs)`` / ``gather_objects(packed, counts)``: the local workers' metric values, to the
  server in worker order: packed (pickled, under MPI) first, so that their sizes can travel in the control
  words; then one Gatherv whose counts the server read there.
- ``share(obj)`` / ``collect(obj)`` / ``allgather(obj)`` / ``agree(error)``: small Python objects for
  setup and checkpoint bookkeeping (never tensors of size d).

``LocalTransport`` holds all n workers and the server in one process. ``MPITransport`` puts the server
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
import pickle
import sys
import time
from itertools import accumulate
from typing import Protocol, Sequence

import torch

from .errors import CdmpiError



# comm.wait = auto sleeps only for vectors this long: a step then takes many milliseconds, so a wait that
# ends up to 0.5 ms late costs little, while a core freed from spinning is worth a lot. Short vectors make
# latency-bound steps, where sleeping costs more than it frees (mushrooms, 21 ranks on 2 cores: 30% slower).
SLEEP_MIN_D = 1_000_000


def _offsets(counts: list[int]) -> list[int]:
    return list(accumulate(counts, initial=0))


class Transport(Protocol):
    """What the engine, the checkpoints and the setup phases use of a transport."""

    name: str  # recorded in metrics files and checkpoints: "local" or "mpi"
    step: int  # the step in progress (the engine keeps it up to date; messages name it)
    rank: int
    world_size: int
    n_workers: int
    worker_indices: list[int]  # the workers that live in this process
    is_server: bool
    local_rank: int
    path: str  # how this process's frames reach the library: in-process, direct or staged
    mpi_library: str

    def worker_rank(self, index: int) -> int: ...
    def check_workers(self, requested: int | None) -> None: ...
    def configure(self, cuda_aware: str, device) -> str: ...
    def slices_served(self, n_slices: int) -> list[int]: ...
    def wants_sleep(self, mode: str, d: int) -> bool: ...
    def agree_wait(self, votes: list[bool]) -> bool: ...
    def gather_frames(self, up: torch.Tensor) -> torch.Tensor | None: ...
    def broadcast(self, down: torch.Tensor) -> None: ...
    def gather_control(self, rows: torch.Tensor) -> torch.Tensor: ...
    def scatter_slices(self, up: torch.Tensor, counts: list[int]) -> dict[int, torch.Tensor]: ...
    def allgather_slices(self, down: torch.Tensor, counts: list[int]) -> None: ...
    def gather_stats(self, rows: torch.Tensor) -> torch.Tensor | None: ...
    def pack_objects(self, objs: list) -> tuple[object, int]: ...
    def gather_objects(self, packed, counts: Sequence[int] | None) -> list | None: ...
    def bcast_from_worker_0(self, values: list[torch.Tensor]) -> None: ...
    def allgather(self, obj) -> list: ...
    def share(self, obj): ...
    def collect(self, obj) -> list | None: ...
    def agree(self, error: str | None) -> tuple[int, str] | None: ...
    def traffic(self) -> tuple[int, int, int, int] | None: ...
    def watch(self, timeout: float, *, setting_up: bool = False) -> None: ...
    def close(self) -> None: ...
    def abort(self, code: int = 1) -> None: ...


class LocalTransport:
    """n logical workers and the server in one process; frames are handed over in memory."""

    name = "local"
    step = 0
    rank = 0
    world_size = 1
    is_server = True
    mpi_library = "none (in-process)"
    local_rank = 0
    path = "in-process"

    def __init__(self, n_workers: int):
        if n_workers < 1:
            raise CdmpiError(f"the number of workers must be >= 1, got {n_workers}")
        self.n_workers = n_workers
        self.worker_indices = list(range(n_workers))

    def worker_rank(self, index: int) -> int:
        return 0

    def check_workers(self, requested: int | None) -> None:
        if requested is not None and requested != self.n_workers:
            raise CdmpiError(f"{requested} workers asked for; this in-process run has {self.n_workers}")

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

    def gather_control(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def gather_stats(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def pack_objects(self, objs: list) -> tuple[list, int]:
        return list(objs), 0  # handed over in memory

    def gather_objects(self, packed: list | None, counts=None) -> list:
        return packed or []

    def bcast_from_worker_0(self, values: list[torch.Tensor]) -> None:
        """values[i]: worker i's tensor; every one becomes worker 0's."""
        for value in values[1:]:
            value.copy_(values[0])

    def traffic(self) -> None:
        return None  # nothing crosses a link

    def watch(self, timeout: float, *, setting_up: bool = False) -> None:
        pass  # one process: nothing to wait for

    def close(self) -> None:
        pass

    def share(self, obj):
        return obj

    def collect(self, obj) -> list:
        return [obj]

    def agree(self, error: str | None) -> tuple[int, str] | None:
        return None if error is None else (0, error)

    def abort(self, code: int = 1) -> None:
        pass  # one process: there is no other rank to end; the caller returns its exit status


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
        self._control: dict[int, torch.Tensor] = {}
        self._host: dict[tuple, torch.Tensor] = {}
        # Frame bytes this rank receives from other ranks, and sends to them, counted from the buffers and
        # counts handed to MPI as the collectives define them (an MPI library's trees and rings may relay
        # more): the load on this rank's link.
        self.inbound_nbytes = 0
        self.outbound_nbytes = 0
        # The same for the metric values of logged steps (the workers' pickled values, to the server).
        self.metrics_inbound_nbytes = 0
        self.metrics_outbound_nbytes = 0
        # The workers' communicator of the sharded topology, made here because every rank constructs the
        # transport together (setup phases may fail on one rank, so they hold no collectives).
        self._workers_comm = comm.Split(MPI.UNDEFINED if self.is_server else 0, key=self.rank)
        self._watch_comm = comm.Dup()  # the watchdog's own channel (see Watchdog)
        self.watchdog: Watchdog | None = None
        self.step = 0
        self.activity = "computing"  # what this rank does outside collectives, as the watchdog reports it
        self._end_job_on_sigint()

    def _end_job_on_sigint(self) -> None:
        """Ctrl-C (SIGINT, which mpiexec passes to every rank) ends the whole job at once. A rank waiting in a
        collective is inside MPI's C code, where Python's KeyboardInterrupt cannot reach it; the signal's
        wake-up byte can: a thread reads it and aborts the job (exit 130). Needs MPI_THREAD_MULTIPLE."""
        import signal
        import threading

        if (self._mpi.Query_thread() != self._mpi.THREAD_MULTIPLE
                or threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:
            os.close(read_fd)
            os.close(write_fd)
            return

        def watch() -> None:
            while True:
                received = os.read(read_fd, 64)
                if not received:
                    return
                if signal.SIGINT in received:  # SIGTERM's byte also comes here: it asks for a checkpoint
                    print(f"cdmpi: interrupted (SIGINT) on rank {self.rank}: ending the job", file=sys.stderr,
                          flush=True)
                    self.comm.Abort(130)

        threading.Thread(target=watch, name="cdmpi-sigint", daemon=True).start()

    def watch(self, timeout: float, *, setting_up: bool = False) -> None:
        """comm.timeout: a watchdog ends the job when this rank waits longer than `timeout` seconds in one
        of the run's collectives (0: no watchdog). Needs MPI_THREAD_MULTIPLE, which mpi4py asks for.
        setting_up: from the start of the set-up, where a rank busy loading data is alive, not stalled (a
        stopped one does not answer)."""
        if setting_up:
            self.activity = "setting up"
        if timeout > 0 and self.watchdog is None and self._mpi.Query_thread() == self._mpi.THREAD_MULTIPLE:
            self.watchdog = Watchdog(self, timeout)
        elif self.watchdog is not None and timeout > 0:
            self.watchdog.timeout = timeout

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None

    def _waiting(self, what: str):
        return self.watchdog.waiting(what) if self.watchdog is not None else _NOT_WATCHED

    def worker_rank(self, index: int) -> int:
        return index + 1

    def check_workers(self, requested: int | None) -> None:
        """The world must hold the server and at least one worker, and as many workers as asked for."""
        if self.world_size < 2:
            raise CdmpiError(f"the MPI backend needs at least 2 ranks (rank 0 is the server, the others are "
                             f"workers); got world size {self.world_size}. Run under mpiexec -n N+1 "
                             f"for N workers, or use the in-process backend")
        if requested is not None and requested != self.n_workers:
            raise CdmpiError(f"{requested} workers asked for, but the world size {self.world_size} holds "
                             f"1 server + {self.n_workers} workers; launch with mpiexec -n {requested + 1}")

    def traffic(self) -> tuple[int, int, int, int]:
        """Bytes so far: (frames and control words in, out, metric values in, out) of this rank."""
        return self.inbound_nbytes, self.outbound_nbytes, self.metrics_inbound_nbytes, self.metrics_outbound_nbytes

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
        with self._waiting("allgather"):
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
        with self._waiting("Gather"):
            frames = self._gather(up, self.path == "staged")
        if self.is_server:  # uint8 bytes
            self.inbound_nbytes += frames.numel()
        else:
            self.outbound_nbytes += up[0].numel()
        return frames

    def broadcast(self, down: torch.Tensor) -> None:
        with self._waiting("Bcast"):
            self._broadcast(down)

    def _broadcast(self, down: torch.Tensor) -> None:
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
        with self._waiting("Alltoallv"):
            self._arrive(self._workers_comm)
            self._workers_comm.Alltoallv([self._mpi_buffer(send), (counts, offsets[:-1]), mpi.BYTE],
                                         [self._mpi_buffer(into), ([width] * n, [i * width for i in range(n)]),
                                          mpi.BYTE])
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
        with self._waiting("Allgatherv"):
            self._arrive(self._workers_comm)
            self._workers_comm.Allgatherv(mpi.IN_PLACE, [self._mpi_buffer(buf), (counts, offsets[:-1]), mpi.BYTE])
        if buf is not down:
            down.copy_(buf)  # blocking: buf is reused by the next MPI call
        self.inbound_nbytes += offsets[-1] - counts[mine]
        self.outbound_nbytes += counts[mine] * (self.n_workers - 1)

    def allreduce_sum_(self, buf: torch.Tensor) -> None:
        """In place: buf = the sum of buf over every rank, after waiting as comm.wait says (the fp32 Allreduce
        baselines of bench/end_to_end.py, where the server passes zeros, and bench/ring_allreduce.py). The
        summation order is MPI's, so it is not bit-reproducible in-process."""
        self._arrive()
        self.comm.Allreduce(self._mpi.IN_PLACE, self._mpi_buffer(buf), op=self._mpi.SUM)

    def gather_stats(self, rows: torch.Tensor) -> torch.Tensor | None:
        with self._waiting("Gather"):
            return self._gather(rows.cpu(), False)

    def gather_control(self, rows: torch.Tensor) -> torch.Tensor:
        """Allgather of one control row per rank (uint8, on the host): rank r's row at index r."""
        width = rows.shape[1]
        table = self._control.get(width)
        if table is None:
            table = self._control[width] = torch.zeros(self.world_size, width, dtype=torch.uint8)
        with self._waiting("Allgather"):
            self._arrive()
            self.comm.Allgather(rows[0].contiguous().numpy(), table.numpy())
        self.inbound_nbytes += (self.world_size - 1) * width
        self.outbound_nbytes += (self.world_size - 1) * width
        return table

    def bcast_from_worker_0(self, values: list[torch.Tensor]) -> None:
        """Set-up: this worker's tensor becomes worker 0's (Bcast among the workers, through host memory)."""
        if self.is_server:
            return
        host = values[0].detach().cpu().contiguous()
        self._workers_comm.Bcast(host.numpy(), root=0)
        values[0].copy_(host)

    def pack_objects(self, objs: list) -> tuple[bytes, int]:
        payload = pickle.dumps(list(objs), protocol=pickle.HIGHEST_PROTOCOL)
        return payload, len(payload)

    def gather_objects(self, packed: bytes | None, counts: Sequence[int] | None) -> list | None:
        """One Gatherv of every worker's packed objects to the server (counts: each worker's size, known at
        the server from the control words), in worker order. A worker with nothing to send passes None."""
        mpi = self._mpi
        if not self.is_server:
            packed = packed or b""
            with self._waiting("Gatherv"):
                self.comm.Gatherv([packed, len(packed), mpi.BYTE], None, root=0)
            self.metrics_outbound_nbytes += len(packed)
            return None
        counts = [0, *counts]
        offsets = _offsets(counts)
        recv = bytearray(offsets[-1])
        with self._waiting("Gatherv"):
            self.comm.Gatherv(mpi.IN_PLACE, [recv, (counts, offsets[:-1]), mpi.BYTE], root=0)
        self.metrics_inbound_nbytes += offsets[-1]
        view = memoryview(recv)
        return [obj for r in range(1, self.world_size) if counts[r]
                for obj in pickle.loads(view[offsets[r]:offsets[r + 1]])]

    def share(self, obj):
        with self._waiting("bcast"):
            return self.comm.bcast(obj, root=0)

    def collect(self, obj) -> list | None:
        with self._waiting("gather"):
            return self.comm.gather(obj, root=0)

    def agree(self, error: str | None) -> tuple[int, str] | None:
        """Collective: the first (rank, error) any rank reported, on every rank."""
        with self._waiting("allgather"):
            errors = self.comm.allgather(error)
        return next(((rank, e) for rank, e in enumerate(errors) if e is not None), None)

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


class _NotWatched:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NOT_WATCHED = _NotWatched()


class Watchdog:
    """comm.timeout: no silent stall. A thread on every rank notes when the rank enters and leaves a
    collective (two attribute writes; the thread wakes every 0.1 s), from the start of the set-up (where a
    rank loading data answers that it is setting up, and is waited for). When rank 0 has waited `timeout`
    seconds in one, its thread asks every rank, on a channel of its own, where it is; ranks that do not
    answer within ANSWER_S
    (stopped, or frozen) and ranks busy outside a collective (computing, writing a checkpoint) are named,
    and the job is aborted. A worker that has waited `timeout` + GRACE_S seconds without rank 0 acting asks
    rank 0 itself, and names it. So comm.timeout must exceed the longest step and checkpoint write."""

    QUERY, ANSWER = 7001, 7002
    BUSY = ("replaying", "setting up")  # outside collectives for long, and alive
    ANSWER_S = 3.0
    GRACE_S = 6.0

    def __init__(self, transport: MPITransport, timeout: float):
        import threading

        self.transport = transport
        self.comm = transport._watch_comm
        self.timeout = timeout
        self._since: float | None = None  # while inside a watched collective: when it was entered
        self._what = ""
        self._left = time.monotonic()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="cdmpi-watchdog", daemon=True)
        self._thread.start()

    def waiting(self, what: str) -> "Watchdog":
        self._what = what
        return self

    def __enter__(self):
        self._since = time.monotonic()
        return self

    def __exit__(self, *exc):
        self._since = None
        self._left = time.monotonic()
        return False

    def stop(self) -> None:
        self._stopped = True
        self._thread.join(timeout=2)

    def _status(self) -> dict:
        now, since = time.monotonic(), self._since
        if since is not None:
            return {"step": self.transport.step, "state": f"waiting in {self._what}", "for": now - since}
        return {"step": self.transport.step, "state": self.transport.activity, "for": now - self._left}

    def _run(self) -> None:
        any_source = self.transport._mpi.ANY_SOURCE
        request = self.comm.irecv(source=any_source, tag=self.QUERY)
        while not self._stopped:
            time.sleep(0.1)
            done, asker = request.test()
            if done:  # rank 0 asks where this rank is (or a worker asks rank 0)
                self.comm.send(self._status(), dest=asker, tag=self.ANSWER)
                request = self.comm.irecv(source=any_source, tag=self.QUERY)
            since = self._since
            if since is None:
                continue
            waited = time.monotonic() - since
            if self.transport.is_server and waited > self.timeout:
                answers = self._ask(range(1, self.transport.world_size))
                if self._alive(answers):
                    continue
                self._end(answers, waited)
            elif not self.transport.is_server and waited > self.timeout + self.GRACE_S:
                answers = self._ask([0])
                if answers[0] is not None and (answers[0]["state"].startswith("waiting")
                                               or answers[0]["state"] in self.BUSY):
                    self._since = time.monotonic()  # rank 0 waits too, and watches every rank
                    continue
                self._end(answers, waited)
        request.Cancel()

    def _alive(self, answers: dict[int, dict | None]) -> bool:
        """Every rank answered, and the ones not waiting in a collective are BUSY: setting up (loading data),
        or replaying a resumed loop's steps (which talk to no one; cdmpi.api). Then the wait goes on,
        watched afresh."""
        if any(a is None for a in answers.values()):
            return False
        states = [a["state"] for a in answers.values()]
        if any(state in self.BUSY for state in states) and "computing" not in states:
            if self._since is not None:
                self._since = time.monotonic()
            return True
        return False

    def _ask(self, ranks) -> dict[int, dict | None]:
        """Every rank's answer (None: none within ANSWER_S)."""
        ranks = list(ranks)
        for rank in ranks:
            self.comm.isend(self.transport.rank, dest=rank, tag=self.QUERY)
        answers: dict[int, dict | None] = dict.fromkeys(ranks)
        deadline = time.monotonic() + self.ANSWER_S
        status = self.transport._mpi.Status()
        while time.monotonic() < deadline and any(a is None for a in answers.values()):
            if self.comm.iprobe(source=self.transport._mpi.ANY_SOURCE, tag=self.ANSWER, status=status):
                answers[status.Get_source()] = self.comm.recv(source=status.Get_source(), tag=self.ANSWER)
            else:
                time.sleep(0.05)
        return answers

    def _end(self, answers: dict[int, dict | None], waited: float) -> None:
        silent = [r for r, a in answers.items() if a is None]
        busy = [f"rank {r} has been {a['state']} at step {a['step']} for {a['for']:.0f} s"
                for r, a in answers.items() if a is not None and a["state"] == "computing"]
        parts = ([f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} did not answer "
                  f"(stopped or hung)"] if silent else []) + busy
        who = "" if self.transport.is_server else f" on rank {self.transport.rank}"
        print(f"cdmpi: error{who}: no progress for {waited:.0f} s at step {self.transport.step} (comm.timeout = "
              f"{self.timeout:g} s; rank {self.transport.rank} waits in {self._what}): "
              f"{'; '.join(parts) or 'every rank answered and waits'}", file=sys.stderr, flush=True)
        self.transport.comm.Abort(1)
