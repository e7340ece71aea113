"""The `cdmpi` command line."""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from pathlib import Path

from . import __version__, analysis, config, log
from .errors import AgreedError, CdmpiError

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
EXIT_STOPPED = 75  # stopped by SIGTERM after writing a checkpoint; resume with --resume auto (EX_TEMPFAIL)


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="run one training job (under mpiexec for the MPI backend)",
        description="Train with the configured algorithm. Under `mpiexec -n N+1`, rank 0 is the server "
                    "and ranks 1..N are workers; without an MPI launcher, N workers run in this process. "
                    "Checkpoints go to <out>.ckpt/ every checkpoint.every steps, at the end and on SIGTERM. "
                    f"Exit codes: 0 done; {EXIT_FAILURE} failed during training (every rank ends); "
                    f"{EXIT_BAD_INPUT} bad input; {EXIT_STOPPED} stopped by SIGTERM after a checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", help="TOML config file (see configs/ and the README's config reference)")
    p.add_argument("--backend", choices=("auto", "mpi", "local"), default="auto",
                   help="mpi: one process per rank; local: all workers in this process; "
                        "auto: mpi when started by an MPI launcher, else local")
    p.add_argument("--workers", type=int, default=None,
                   help="number of workers N (default: run.workers for local, world size - 1 for mpi, "
                        "where a different value is an error)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=0.003 (repeatable; values are TOML)")
    p.add_argument("--out", default=None,
                   help="HDF5 metrics file (default: runs/<config name>-<algorithm>.h5)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing metrics file and its checkpoints (ignored when resuming)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue bit-exactly from a checkpoint: auto = the newest valid one in the run's "
                        "checkpoint directory (<out>.ckpt/ or checkpoint.dir), or a fresh start if there is "
                        "none; PATH = a step-* checkpoint directory or a directory holding them. The "
                        "metrics file is continued")
    p.add_argument("--quiet", action="store_true", help="no progress bar or info log lines")


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="summarise metrics files, one row per run",
                       description="Print algorithm, compressor, workers, steps, final loss, final and "
                                   "minimum grad_norm_sq and total bits of each run.")
    p.add_argument("files", nargs="+", help="HDF5 metrics files written by `cdmpi train`")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdmpi", description="Communication-compressed distributed AMSGrad (CD-Adam) over MPI.")
    parser.add_argument("--version", action="version", version=f"cdmpi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _report_parser(sub)
    return parser


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, CdmpiError) else f"{type(err).__name__}: {err}"


def cmd_train(args) -> int:
    stop = _StopOnSigterm()  # from here on, SIGTERM means: stop at the next check step with a checkpoint
    try:
        return _train(args, stop)
    finally:
        stop.restore()


def _train(args, stop: "_StopOnSigterm") -> int:
    from . import checkpoint, train, transport as transports

    backend = args.backend
    if backend == "auto":
        backend = "mpi" if transports.launched_by_mpi() else "local"
    transport = None
    if backend == "mpi":
        try:
            transport = transports.MPITransport.from_world()
        except ImportError as err:
            print(f"cdmpi: error: the MPI backend needs mpi4py ({err}); pip install 'cdmpi[mpich]' or build "
                  f"mpi4py against your MPI", file=sys.stderr)
            return EXIT_BAD_INPUT
    rank = transport.rank if transport is not None else 0
    logger = log.setup(rank, verbose=not args.quiet)

    error, session = None, None
    try:
        cfg = config.load(args.config, args.overrides)
        if transport is None:
            n = args.workers if args.workers is not None else cfg.run.workers
            if n < 1:
                raise CdmpiError(f"--workers must be >= 1, got {n}")
            transport = transports.LocalTransport(n)
        else:
            train.check_world(transport, args.workers)
            if args.workers is None and cfg.run.workers != transport.n_workers:
                logger.info("config asks for %d workers; the world has %d: using %d",
                            cfg.run.workers, transport.n_workers, transport.n_workers)
        cfg = config.replace(cfg, "run", workers=transport.n_workers)
        out = args.out or f"runs/{Path(args.config).stem}-{cfg.optim.algorithm}.h5"
        session = train.setup(cfg, transport, out=None)
    except Exception as err:  # every rank must reach the agreement below, whatever failed
        error = _describe(err)
        if not isinstance(err, CdmpiError):
            traceback.print_exc()
    agreed = transport.agree(error) if transport is not None else (error and (0, error))
    if not agreed:  # everyone is set up: the collective part of resuming, then the metrics file
        error = None
        try:
            root = checkpoint.root_for(cfg, out)
            session.checkpoint_root = root
            start = None
            if args.resume:
                start = checkpoint.restore(session, args.resume, root, warn=logger.warning)
            if start is None and transport.is_server:
                if checkpoint.list_checkpoints(root):
                    if not args.overwrite:
                        raise CdmpiError(f"checkpoints of an earlier run exist in {root}; pass --resume auto "
                                         f"to continue it or --overwrite to start over")
                    checkpoint.remove_all(root)
            train.open_metrics(session, out, overwrite=args.overwrite, resume_step=start)
            if start is not None:
                session.start_step = start
                logger.info("resuming from checkpoint step %d in %s", start, root)
        except Exception as err:
            error = _describe(err)
            if not isinstance(err, CdmpiError):
                traceback.print_exc()
        agreed = transport.agree(error)
    if agreed:
        failed_rank, message = agreed
        if rank == 0:
            where = f" (rank {failed_rank})" if failed_rank else ""
            print(f"cdmpi: error{where}: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT

    session.stop_requested = stop.requested

    logger.info("%s; %s with %s, %d workers, d = %d, %s backend", session.description,
                cfg.optim.algorithm, cfg.compress.name, transport.n_workers, session.d, transport.name)
    try:
        row = train.run(session, progress=not args.quiet)
    except AgreedError as err:  # every rank raised it at the same step: no abort needed
        if rank == 0:
            print(f"cdmpi: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as err:
        print(f"cdmpi: error on rank {rank}: {_describe(err)}", file=sys.stderr)
        if not isinstance(err, CdmpiError):
            traceback.print_exc()
        transport.abort(EXIT_FAILURE)  # ends every rank; an MPI job must never hang on one failure
        return EXIT_FAILURE
    if session.stopped_at is not None:
        if rank == 0:
            print(f"cdmpi: stopped by SIGTERM at step {session.stopped_at}; checkpoint {session.last_checkpoint}; "
                  f"continue with --resume auto", file=sys.stderr)
        return EXIT_STOPPED
    if row is not None:
        print(f"cdmpi: {cfg.optim.algorithm} finished {row['step']} steps: loss {row['loss']:.6g}, "
              f"grad_norm_sq {row['grad_norm_sq']:.4e}, bits up {row['bits_up']:.4e}, "
              f"down {row['bits_down']:.4e} -> {out}")
    return 0


class _StopOnSigterm:
    """SIGTERM (SLURM's warning before the time limit or at preemption) asks for a stop; the ranks agree
    on the step at the next check, write a checkpoint there and exit with EXIT_STOPPED."""

    def __init__(self):
        self.signals = 0
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, signum, frame) -> None:
        self.signals += 1

    def requested(self) -> bool:
        return self.signals > 0


def cmd_report(args) -> int:
    rows = [analysis.summarize(path) for path in args.files]
    print(analysis.to_json(rows) if args.json else analysis.format_table(rows))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "report": cmd_report}[args.command](args)
    except CdmpiError as err:
        print(f"cdmpi: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("cdmpi: interrupted", file=sys.stderr)
        return 130
