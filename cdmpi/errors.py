"""The one exception type that reaches users as a one-line message instead of a traceback."""


class CdmpiError(Exception):
    """Bad input or an unrecoverable run condition; str(err) is the whole message."""


class AgreedError(CdmpiError):
    """Raised on every process at the same step (after a collective check): no abort is needed, and the
    server alone reports it."""
