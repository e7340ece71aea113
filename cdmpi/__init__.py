"""cdmpi: communication-compressed distributed AMSGrad (CD-Adam) over MPI.

Your own model: ``cdmpi.launch(train, out="run.h5")`` runs ``train(run)`` on every worker (see cdmpi.api).
Importing cdmpi is cheap and never initialises MPI; only cdmpi.transport.MPITransport does.
"""

__version__ = "0.1.0"

_API = ("launch", "Run", "DistributedOptimizer")


def launched_by_mpi() -> bool:
    """Whether an MPI launcher (mpiexec, srun) started this process: cdmpi.launch then runs one rank."""
    from .launcher import launched_by_mpi as launched

    return launched()


def __getattr__(name):  # cdmpi.launch and friends, imported (with torch) on first use
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'cdmpi' has no attribute {name!r}")
