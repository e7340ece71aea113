"""What an MPI launcher (mpiexec, srun) tells a process through its environment, read before MPI starts
(and without importing torch): whether one started this process, its rank and the world's size."""

from __future__ import annotations

import os

# Environment variables that MPI launchers (MPICH/Hydra, Open MPI, Intel MPI, SLURM's srun) set.
LAUNCHER_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
_RANK_ENV = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")
_SIZE_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS")


def launched_by_mpi() -> bool:
    return any(name in os.environ for name in LAUNCHER_ENV)


def _first_int(names) -> int | None:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def rank() -> int:
    """This process's rank as the launcher numbered it (0 without a launcher)."""
    return _first_int(_RANK_ENV) or 0 if launched_by_mpi() else 0


def world_size() -> int:
    """The number of processes the launcher started (1 without a launcher)."""
    return (_first_int(_SIZE_ENV) or 1) if launched_by_mpi() else 1
