"""The one exception type that reaches users as a one-line message instead of a traceback."""


class CdmpiError(Exception):
    """Bad input or an unrecoverable run condition; str(err) is the whole message."""
