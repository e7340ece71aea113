from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("cdmpi/__init__.py").read_text().split('"""', 2)[2], version)

setup(
    name="cdmpi",
    version=version["__version__"],
    description="Communication-compressed distributed AMSGrad (CD-Adam) over MPI",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cdmpi", "cdmpi.*"]),
    package_data={"cdmpi": ["datasets/*.gz", "datasets/README.md"]},
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "h5py>=3.8",
        "mpi4py>=3.1",
        "scipy>=1.10",  # the sparse matrix of a LibSVM file
        "scikit-learn>=1.2",  # the digits dataset
        "tqdm>=4.60",
        "numba>=0.59",  # compiled scaled-sign kernels (cdmpi/wire.py); without it the torch path runs
    ],
    extras_require={
        "mpich": ["mpich"],  # an MPI runtime from PyPI, for machines without a system MPI
        "plot": ["matplotlib>=3.6"],
        "test": ["pytest>=7", "pytest-xdist>=3", "matplotlib>=3.6"],
    },
    entry_points={"console_scripts": ["cdmpi = cdmpi.__main__:run"]},
)
