"""cdmpi: communication-compressed distributed AMSGrad (CD-Adam) over MPI.

Importing cdmpi never initialises MPI; only cdmpi.transport.MPITransport does.
"""

__version__ = "0.1.0"
