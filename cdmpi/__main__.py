"""The `cdmpi` command (`python -m cdmpi` and the console script): SIGTERM is made a stop request first,
then the command line is imported and run."""

import sys


def run() -> None:
    from .signals import install_early

    install_early()
    from .cli import main

    sys.exit(main())


if __name__ == "__main__":
    run()
