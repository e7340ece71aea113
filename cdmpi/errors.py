"""The exceptions that reach users as a one-line message instead of a traceback, and the exit codes."""

EXIT_FAILURE = 1  # the run failed during training (every rank ends)
EXIT_BAD_INPUT = 2  # bad input: config, options, data, checkpoint or command line; nothing was trained
EXIT_STOPPED = 75  # stopped by SIGTERM after writing a checkpoint; resume to continue (EX_TEMPFAIL)


class CdmpiError(Exception):
    """Bad input or an unrecoverable run condition; str(err) is the whole message."""


class AgreedError(CdmpiError):
    """Raised on every process at the same step (after a collective decision): no abort is needed, and the
    server alone reports it."""


class RunStopped(SystemExit):
    """Every rank stopped at the same step after SIGTERM, with a checkpoint written there. A SystemExit with
    code 75, so that a user's `except Exception` lets it through and an uncaught one ends the process with
    the exit status that tells a requeue wrapper to resume."""

    def __init__(self, step: int, checkpoint=None):
        super().__init__(EXIT_STOPPED)
        self.step = step
        self.checkpoint = checkpoint  # the checkpoint directory (on the server; None elsewhere)

    def __str__(self) -> str:
        where = f"; checkpoint {self.checkpoint}" if self.checkpoint else ""
        return f"stopped by SIGTERM at step {self.step}{where}"


class SetupFailed(SystemExit):
    """Set-up failed on some rank and every rank knows it (rank 0 said why): exit status 2 on every rank."""

    def __init__(self):
        super().__init__(EXIT_BAD_INPUT)
