"""One writer per run: an exclusive lock on a run's output (metrics file and checkpoint folder).

The lock is ``RUN.h5.lock`` beside the metrics file, held by the server's process for the run's whole
life with ``flock``: the kernel drops it when that process ends, however it ends (SIGKILL included), so a
killed run never blocks its own resume. The file names the holder (host, pid, start time, SLURM job);
a second run on the same output reads it and stops with that in its message, having changed nothing.

A stale lock is one whose holder is gone but whose flock outlives it: on a network filesystem whose
client node died, the server may keep the lock for a while. A run takes such a lock over when it belongs
to the same SLURM job (a requeued job is one job id, and SLURM runs one copy of a job at a time) and the
holder is on another host, or on this host with its pid gone.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from .errors import CdmpiError


def slurm_job() -> str:
    job = os.environ.get("SLURM_JOB_ID", "")
    task = os.environ.get("SLURM_ARRAY_TASK_ID", "")
    return f"{job}_{task}" if job and task else job


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_alive_anywhere(holder: dict) -> bool:
    """Whether the holder may still run: on another host we cannot tell, so it may."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        return _pid_alive(int(holder.get("pid", -1)))
    except (TypeError, ValueError, OverflowError):
        return False


def read_holder(path: Path) -> dict:
    """The holder a lock file names ({} when there is none, or it is unreadable)."""
    try:
        holder = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def live_holder(path: Path) -> dict | None:
    """The holder a lock file names while it may still run (`cdmpi watch`), else None."""
    holder = read_holder(path)
    return holder if holder and _pid_alive_anywhere(holder) else None


def _in_use(what: str, holder: dict) -> CdmpiError:
    return CdmpiError(f"{what} is in use by another run ({describe(holder)}); wait for it to end or choose "
                      f"another --out")


def check_free(path: Path) -> None:
    """Raise CdmpiError naming the holder if a live process holds the lock at `path` (without taking it:
    a quick test before a run starts; RunLock.acquire decides)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file, or not ours to read: acquire will say
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            holder = read_holder(path)
            if not (holder.get("job") and holder.get("job") == slurm_job()):  # a requeue takes its own over
                raise _in_use(str(path.with_suffix("")), holder) from None
    finally:
        os.close(fd)


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}{job}"


class RunLock:
    """Hold with acquire() and release() (or as a context manager)."""

    def __init__(self, path: str | Path, what: str | None = None):
        self.path = Path(path)
        self.what = what or str(self.path.with_suffix(""))  # what the lock guards, for messages
        self._fd: int | None = None
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "job": slurm_job(),
                   "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def _stale(self, holder: dict) -> bool:
        if not self.me["job"] or holder.get("job") != self.me["job"]:
            return False
        return holder.get("host") != self.me["host"] or not _pid_alive(int(holder.get("pid", -1)))

    def _holder(self) -> dict:
        return read_holder(self.path)

    def acquire(self) -> None:
        """Take the lock, or raise CdmpiError naming the run that holds it (or why it cannot be made)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CdmpiError(f"cannot make the folder of {self.what}: {err.strerror or err} "
                             f"({self.path.parent}); choose an --out in a folder you can write") from None
        for _ in range(3):  # a holder may release (and remove the file) between our open and our flock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                holder = self._holder()
                if holder:  # another user's lock file: say whose run it is
                    state = "in use by" if not self._stale(holder) and _pid_alive_anywhere(holder) else \
                        "locked by a file of an ended run of"
                    raise CdmpiError(f"{self.what} is {state} another user's run "
                                     f"({describe(holder)}); {err.strerror}: {self.path}") from None
                raise CdmpiError(f"cannot write {self.path}: {err.strerror or err}; choose an --out in a folder "
                                 f"you can write") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise CdmpiError(f"cannot lock {self.path}: {err}") from None
                holder = self._holder()
                if self._stale(holder):
                    self.path.unlink(missing_ok=True)  # our own job's earlier run, on a node that is gone
                    continue
                raise _in_use(self.what, holder) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the file we locked was removed by its holder on release: take the new one
                os.close(fd)
                continue
            try:  # other users may take over the lock of a run that died (umask would make it 0644)
                os.fchmod(fd, 0o666)
            except OSError:
                pass
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(self.me).encode())
            os.fsync(fd)
            self._fd = fd
            return
        raise CdmpiError(f"cannot lock {self.path}: it keeps changing under this run")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def run_locks(out: str | Path | None, checkpoint_root: Path | None) -> "RunLocks | None":
    """The locks of a run: RUN.h5.lock beside the metrics file, and run.lock in the checkpoint folder, which
    two outputs can share (run.h5 and run.hdf5, or one checkpoint.dir): one run per folder, or the second
    one's --overwrite would delete the first one's checkpoints."""
    locks = []
    if out is not None:
        locks.append(RunLock(Path(str(out) + ".lock")))
    if checkpoint_root is not None:
        locks.append(RunLock(Path(checkpoint_root) / "run.lock", what=f"checkpoint folder {checkpoint_root}"))
    return RunLocks(locks) if locks else None


class RunLocks:
    """Several RunLocks taken in order and released together; `me` names this process as each of them does."""

    def __init__(self, locks: list[RunLock]):
        self.locks = locks
        self.me = locks[0].me

    def acquire(self) -> None:
        taken = []
        try:
            for lock in self.locks:
                lock.acquire()
                taken.append(lock)
        except BaseException:
            for lock in reversed(taken):
                lock.release()
            raise

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
