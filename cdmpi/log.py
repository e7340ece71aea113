"""Log lines that carry the rank: `cdmpi[rank 3] WARNING ...` on stderr."""

from __future__ import annotations

import logging

LOGGER = logging.getLogger("cdmpi")


def setup(rank: int, verbose: bool = True) -> logging.Logger:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s cdmpi[rank {rank}] %(levelname)s %(message)s",
                                           "%H:%M:%S"))
    LOGGER.handlers[:] = [handler]
    LOGGER.propagate = False
    LOGGER.setLevel(logging.INFO if (verbose and rank == 0) else logging.WARNING)
    return LOGGER
