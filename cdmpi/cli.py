"""The `cdmpi` command line."""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from pathlib import Path

from . import __version__, algorithms, analysis, config, log
from .errors import AgreedError, CdmpiError

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
EXIT_STOPPED = 75  # stopped by SIGTERM after writing a checkpoint; resume with --resume auto (EX_TEMPFAIL)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the epilog's lines kept as written."""


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="run one training job (under mpiexec for the MPI backend)",
        description="Train with the configured algorithm. Under `mpiexec -n N+1`, rank 0 is the server "
                    "and ranks 1..N are workers; without an MPI launcher, N workers run in this process. "
                    "Checkpoints go to <out>.ckpt/ every checkpoint.every steps, at the end and on SIGTERM. "
                    "Problems: logreg (Section 7.1) and classifier (problem.model resnet18 | vgg16 | wrn16_4 | "
                    "small_cnn on data.dataset cifar10 | digits | synthetic_images; Section 7.2 configs in "
                    "configs/cifar10; writes an HDF5 group eval with test loss and accuracy every epoch). "
                    "Devices: comm.worker_device, comm.server_device, comm.cuda_aware = auto | true | false. "
                    "comm.topology = star (rank 0 aggregates) | sharded (worker s serves slice s of the "
                    "vector, one compressor scale per slice; rank 0 only logs). comm.wait = auto | spin | sleep "
                    "(sleep: waiting ranks give their core away, for ranks that share cores). "
                    f"Exit codes: 0 done; {EXIT_FAILURE} failed during training (every rank ends); "
                    f"{EXIT_BAD_INPUT} bad input; {EXIT_STOPPED} stopped by SIGTERM after a checkpoint.",
        epilog="algorithms (optim.algorithm; compressors it takes, the first is its default for "
               "compress.name = \"auto\"):\n" + "\n".join(
                   f"  {a.name:<14} [{', '.join(a.compressors)}] {a.description}"
                   for a in algorithms.ALGORITHMS.values()),
        formatter_class=_Formatter)
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
    p.add_argument("files", nargs="+", help="HDF5 metrics files written by `cdmpi train` or `cdmpi sweep`, "
                                            "or folders of them")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--best", action="store_true",
                   help="one row per dataset, algorithm and compressor: the step size with the lowest final "
                        "grad_norm_sq")
    p.add_argument("--target", default=None, metavar="COLUMN=VALUE",
                   help="add the first step at which COLUMN <= VALUE and the bits (up + down) spent until "
                        "then, e.g. --target grad_norm_sq=1e-4 ('-': never reached)")


def _sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="run every combination of configs, algorithms and grid values",
        description="One HDF5 file per run in --out-dir, named CONFIG_ALGORITHM_KEY=VALUE.h5. A run writes "
                    "NAME.h5.partial and renames it when done, so an interrupted sweep resumes where it "
                    "stopped; a finished file from a different config is an error.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="TOML config files")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=SPEC",
                   help="a swept key: start:stop:step (stop excluded), e.g. optim.lr=0.001:0.011:0.002, or "
                        "a list v1,v2,... (repeatable: the grids are crossed)")
    p.add_argument("--algorithms", default=None, metavar="A[:C],...",
                   help="algorithms to run, each with an optional compressor, e.g. "
                        "cdadam,amsgrad:identity,ef21:topk (default: the config's optim.algorithm)")
    p.add_argument("--out-dir", required=True, help="folder for the metrics files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every run (repeatable)")
    p.add_argument("--workers", type=int, default=None, help="workers per run (default: run.workers)")
    p.add_argument("--backend", choices=("local", "mpi"), default="local",
                   help="local: in-process runs in a pool of --jobs processes; mpi: each run under "
                        "mpiexec -n workers+1, --jobs at a time")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether they are finished")


def _plot_parser(sub) -> None:
    p = sub.add_parser(
        "plot", help="draw log-scale curves from metrics files",
        description="One column per dataset, one row per --x axis, one curve per run (or per algorithm "
                    "with --best); y on a log scale, bits on a log scale too. Needs matplotlib.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("files", nargs="+", help="metrics files or folders of them")
    p.add_argument("--x", nargs="+", default=["bits", "step"], choices=("bits", "step"),
                   help="x axes, one row of panels each: bits (up + down) or step")
    p.add_argument("--y", default="grad_norm_sq", help="a column of /train: grad_norm_sq, loss, ...")
    p.add_argument("--best", action="store_true", help="only the best step size of each algorithm")
    p.add_argument("--title", default=None)
    p.add_argument("--out", required=True, help="PNG (or any format matplotlib writes)")


def _project_parser(sub) -> None:
    p = sub.add_parser(
        "project", help="projected step time on other networks from a run's measured times and bytes",
        description="For each metrics file (with the timing/ group cdmpi train writes), the step time on "
                    "links of the given bandwidths: measured compute, encode, aggregate and update times "
                    "plus latency and the bytes per step through rank 0's link (star topology), and for "
                    "comparison an fp32 ring Allreduce of the same d with the same compute. The model is "
                    "in cdmpi/project.py and the README.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("files", nargs="+", help="HDF5 metrics files")
    p.add_argument("--bandwidth", default="1,10,100", help="link bandwidths in Gbit/s, comma-separated")
    p.add_argument("--latency", type=float, default=5e-6, help="one-way latency per message in seconds")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdmpi", description="Communication-compressed distributed AMSGrad (CD-Adam) over MPI.")
    parser.add_argument("--version", action="version", version=f"cdmpi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _sweep_parser(sub)
    _report_parser(sub)
    _plot_parser(sub)
    _project_parser(sub)
    return parser


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, CdmpiError) else f"{type(err).__name__}: {err}"


def _agreed(phase, transport, rank: int) -> bool:
    """Run one setup phase on every rank; if it failed anywhere, rank 0 prints the first error and every
    rank returns False together (no rank is left waiting in a collective)."""
    error = None
    try:
        phase()
    except Exception as err:
        error = _describe(err)
        if not isinstance(err, CdmpiError):
            traceback.print_exc()
    if transport is not None:
        agreed = transport.agree(error)
    else:  # the local transport could not even be made
        agreed = (0, error) if error else None
    if agreed:
        failed_rank, message = agreed
        if rank == 0:
            where = f" (rank {failed_rank})" if failed_rank else ""
            print(f"cdmpi: error{where}: {message}", file=sys.stderr)
        return False
    return True


def cmd_train(args) -> int:
    stop = _StopOnSigterm()  # from here on, SIGTERM means: stop at the next check step with a checkpoint
    try:
        return _train(args, stop)
    finally:
        stop.restore()


def _train(args, stop: "_StopOnSigterm") -> int:
    from . import checkpoint, data, train, transport as transports

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

    cfg, session = None, None

    def prepare():  # phase 1: config and world size; rank 0 fetches data the others will read
        nonlocal cfg, transport
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
        if transport.rank == 0:
            data.prefetch(cfg.data.dataset)

    def build():  # phase 2: every rank builds its part
        nonlocal session
        session = train.setup(cfg, transport, out=None)  # the metrics file comes after the resume

    def resume():  # phase 3, collective: the checkpoint to start from, then the metrics file
        root = checkpoint.root_for(cfg, out())
        session.checkpoint_root = root
        start = None
        if args.resume:
            start = checkpoint.restore(session, args.resume, root, warn=logger.warning)
        if start is None and transport.is_server and checkpoint.list_checkpoints(root):
            if not args.overwrite:
                raise CdmpiError(f"checkpoints of an earlier run exist in {root}; pass --resume auto "
                                 f"to continue it or --overwrite to start over")
            checkpoint.remove_all(root)
        train.open_metrics(session, out(), overwrite=args.overwrite, resume_step=start)
        if start is not None:
            session.start_step = start
            logger.info("resuming from checkpoint step %d in %s", start, root)

    def out():
        return args.out or f"runs/{Path(args.config).stem}-{cfg.optim.algorithm}.h5"

    for phase in (prepare, build, resume):
        if not _agreed(phase, transport, rank):
            return EXIT_BAD_INPUT
    session.stop_requested = stop.requested

    logger.info("%s; %s with %s, %d workers, d = %d, %s backend", session.description,
                cfg.optim.algorithm, algorithms.compressor_for(cfg.optim.algorithm, cfg.compress.name),
                transport.n_workers, session.d, transport.name)
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
              f"down {row['bits_down']:.4e} -> {out()}")
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
    target = analysis.parse_target(args.target) if args.target else None
    rows = [analysis.summarize(path, target) for path in analysis.expand(args.files)]
    columns = analysis.COLUMNS
    if args.best:
        rows, columns = analysis.best(rows), analysis.BEST_COLUMNS
    if target is not None:
        columns = columns + analysis.TARGET_COLUMNS
    print(analysis.to_json(rows) if args.json else analysis.format_table(rows, columns))
    return 0


def cmd_sweep(args) -> int:
    from . import sweep
    from .transport import launched_by_mpi

    if launched_by_mpi():
        raise CdmpiError("run `cdmpi sweep` itself without mpiexec; --backend mpi launches each run")
    if args.jobs < 1 or (args.workers is not None and args.workers < 1):
        raise CdmpiError("--jobs and --workers must be >= 1")
    grids = [sweep.parse_grid(text) for text in args.grid]
    specs = sweep.parse_algorithms(args.algorithms) if args.algorithms else [(None, None)]
    if specs == [(None, None)]:
        specs = [(config.load(args.configs[0], args.overrides).optim.algorithm, None)]
    runs = sweep.plan(args.configs, specs, grids, args.out_dir, args.overrides)
    if args.dry_run:
        for run in runs:
            state = "finished" if sweep.is_finished(run, args.workers or run.cfg.run.workers) else "to run"
            print(f"{run.out}  {state}")
        return 0
    mpiexec = None
    if args.backend == "mpi":
        from shutil import which

        local = Path(sys.executable).parent / "mpiexec"
        mpiexec = str(local) if local.exists() else which("mpiexec")
    ran, skipped = sweep.execute(runs, workers=args.workers, backend=args.backend, jobs=args.jobs,
                                 mpiexec=mpiexec, log=lambda m: print(m, flush=True))
    print(f"cdmpi sweep: {ran} run, {skipped} skipped -> {args.out_dir}")
    return 0


def cmd_project(args) -> int:
    import json

    from . import project

    bandwidths = project.parse_list(args.bandwidth, "--bandwidth")
    if args.latency < 0:
        raise CdmpiError(f"--latency must be >= 0, got {args.latency}")
    rows = project.rows(analysis.expand(args.files), bandwidths, args.latency)
    print(json.dumps(rows, indent=1) if args.json else project.format_table(rows, bandwidths))
    return 0


def cmd_plot(args) -> int:
    from . import plot

    out = plot.figure(analysis.expand(args.files), xs=args.x, y=args.y, out=args.out, best_only=args.best,
                      title=args.title)
    print(f"cdmpi: wrote {out}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"train": cmd_train, "sweep": cmd_sweep, "report": cmd_report, "plot": cmd_plot,
                    "project": cmd_project}
        return commands[args.command](args)
    except CdmpiError as err:
        print(f"cdmpi: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("cdmpi: interrupted", file=sys.stderr)
        return 130
