"""SIGTERM as a request to stop with a checkpoint (no heavy imports: it is installed first thing)."""

from __future__ import annotations

import os
import signal


EARLY: "StopOnSigterm | None" = None  # installed by the command's entry point before anything else


def install_early() -> "StopOnSigterm":
    """The `cdmpi` command's first act (cdmpi.__main__): SIGTERM becomes a stop request before the command
    line module and its imports load, which is most of a rank's start-up before torch."""
    global EARLY
    if EARLY is None:
        EARLY = StopOnSigterm().install()
    return EARLY


class StopOnSigterm:
    """SIGTERM (SLURM's warning before the time limit, or preemption) only asks for a stop: the ranks agree
    on it at the next step, write a checkpoint there and exit with status 75. Install it before anything
    slow (imports, data loading), so that a SIGTERM then is a stop too, not the end of the process."""

    def __init__(self):
        self.signals = 0
        self._previous = None

    def install(self) -> "StopOnSigterm":
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def uninstall(self, deliver: bool = False) -> None:
        """Put the previous handler back; with `deliver`, a SIGTERM received meanwhile is sent again to it."""
        if self._previous is None:
            return
        signal.signal(signal.SIGTERM, self._previous)
        self._previous = None
        if deliver and self.signals:
            os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> "StopOnSigterm":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def settle(self) -> None:
        """The run has ended and its exit status is decided: a later SIGTERM changes nothing, so from now on
        it is ignored, through MPI_Finalize and the interpreter's shutdown. (At shutdown Python puts the
        default action back for signals it handled, so a SIGTERM that reached a rank while MPI_Finalize
        waited for the others ended it with status 15, and mpiexec or srun reported 15, not 75; an ignored
        signal stays ignored.)"""
        self._previous = None
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        self.signals += 1

    def requested(self) -> bool:
        return self.signals > 0
