"""What every way of running shares (`cdmpi train` and `cdmpi.api.launch`): SIGTERM handling, set-up phases
that every rank agrees on, resume-or-start, and the exit status of a run.

Exit statuses: 0 done; 1 failed during training (every rank ends); 2 bad input (nothing trained);
75 stopped by SIGTERM with a checkpoint (resume to continue).
"""

from __future__ import annotations

import signal
import sys
import traceback
from pathlib import Path
from typing import Callable

from . import checkpoint
from .errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_STOPPED, AgreedError, CdmpiError, RunStopped, SetupFailed


class StopOnSigterm:
    """SIGTERM (SLURM's warning before the time limit, or preemption) only asks for a stop: the ranks agree
    on it at the next step, write a checkpoint there and exit with EXIT_STOPPED. Use as a context manager
    in the main thread."""

    def __init__(self):
        self.signals = 0
        self._previous = None

    def __enter__(self) -> "StopOnSigterm":
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.signals += 1

    def requested(self) -> bool:
        return self.signals > 0


def describe(err: BaseException) -> str:
    return str(err) if isinstance(err, CdmpiError) else f"{type(err).__name__}: {err}"


def agreed(phase: Callable[[], None], transport, rank: int) -> bool:
    """Run one set-up phase on every rank; if it failed anywhere, rank 0 prints the first error and every
    rank returns False together (no rank is left waiting in a collective). transport None: this process
    alone (the in-process transport could not be made)."""
    error = None
    try:
        phase()
    except Exception as err:  # noqa: BLE001 - every failure must reach the agreement
        error = describe(err)
        if not isinstance(err, CdmpiError):
            traceback.print_exc()
    agreement = transport.agree(error) if transport is not None else ((0, error) if error else None)
    if agreement:
        failed_rank, message = agreement
        if rank == 0:
            where = f" (rank {failed_rank})" if failed_rank else ""
            print(f"cdmpi: error{where}: {message}", file=sys.stderr)
        return False
    return True


def start(engine, out: str | Path | None, *, resume: str | None, overwrite: bool, warn=None) -> int | None:
    """Collective: resume from a checkpoint of this run (`resume` auto or a path) or start afresh, then open
    the metrics file. A fresh start refuses to run over an earlier run's checkpoints unless `overwrite`,
    which deletes them. Returns the step resumed from, or None."""
    root = checkpoint.root_for(engine.cfg, out) if out is not None or engine.cfg.checkpoint.dir else None
    if resume and root is None:
        raise CdmpiError("resume needs a run with checkpoints: give it an output file (or checkpoint.dir)")
    engine.checkpoint_root = root
    step = engine.resume(resume, root, warn=warn) if resume else None
    if step is None and engine.transport.is_server and root is not None and checkpoint.list_checkpoints(root):
        if not overwrite:
            raise CdmpiError(f"checkpoints of an earlier run exist in {root}; pass --resume auto "
                             f"to continue it or --overwrite to start over")
        checkpoint.remove_all(root)
    if out is not None:
        engine.open_metrics(out, overwrite=overwrite, resume_step=step)
    return step


def finish(body: Callable[[], object], transport, rank: int) -> tuple[int, object]:
    """Run the training body on this rank; map how it ended to an exit status: (status, its result)."""
    try:
        return 0, body()
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - one failing rank must end them all
        return exit_status(err, transport, rank), None


def exit_status(err: BaseException, transport, rank: int) -> int:
    """The exit status of a run that ended with `err`, said on stderr. An agreed error or stop is reported by
    rank 0 alone; any other exception by the rank it happened on, which then aborts the communicator, so that
    no MPI job hangs on one failure."""
    if isinstance(err, SetupFailed):  # rank 0 has said why
        return EXIT_BAD_INPUT
    if isinstance(err, RunStopped):
        if rank == 0:
            print(f"cdmpi: {err}; continue with --resume auto", file=sys.stderr)
        return EXIT_STOPPED
    if isinstance(err, AgreedError):  # every rank raised it at the same step: no abort needed
        if rank == 0:
            print(f"cdmpi: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"cdmpi: error on rank {rank}: {describe(err)}", file=sys.stderr)
    if not isinstance(err, CdmpiError):
        traceback.print_exception(err)
    if transport is not None:
        transport.abort(EXIT_FAILURE)
    return EXIT_FAILURE


__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILURE", "EXIT_STOPPED", "StopOnSigterm", "agreed", "exit_status", "finish",
           "start"]
