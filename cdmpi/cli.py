"""The `cdmpi` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__, config, log
from .errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_STOPPED, CdmpiError
from .signals import StopOnSigterm


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown where there is one to show (not None, not a switch's False), and the epilog's lines
    kept as written."""

    def _get_help_string(self, action) -> str:
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def _train_parser(sub) -> None:
    from . import catalog

    p = sub.add_parser(
        "train", help="run one training job (under mpiexec for the MPI backend)",
        description="Train with the configured algorithm. Under `mpiexec -n N+1`, rank 0 is the server "
                    "and ranks 1..N are workers; without an MPI launcher, N workers run in this process. "
                    "Checkpoints go next to --out (RUN.h5 -> RUN.ckpt/) every checkpoint.every steps, at the end "
                    "and on SIGTERM. "
                    "Problems: logreg (Section 7.1) and classifier (problem.model resnet18 | vgg16 | wrn16_4 | "
                    "small_cnn on data.dataset cifar10 | digits | synthetic_images; Section 7.2 configs in "
                    "configs/cifar10; writes an HDF5 group eval with test loss and accuracy every epoch), "
                    "sequence (a small GPT, problem.model gpt_nano | gpt_micro, on data.dataset addition; "
                    "configs/transformer; eval holds the exact-match accuracy every run.eval_every steps), quadratic (benchmarks). Compression "
                    "beyond the paper: compress.block, compress.name = two_level_sign, compress.warmup_steps "
                    "(docs/algorithms.md). "
                    "Devices: comm.worker_device, comm.server_device, comm.cuda_aware = auto | true | false. "
                    "comm.topology = star (rank 0 aggregates) | sharded (worker s serves slice s of the "
                    "vector, one compressor scale per slice; rank 0 only logs). comm.wait = auto | spin | sleep "
                    "(sleep: waiting ranks give their core away, for ranks that share cores). "
                    f"Exit codes: 0 done; {EXIT_FAILURE} failed during training (every rank ends); "
                    f"{EXIT_BAD_INPUT} bad input; {EXIT_STOPPED} stopped by SIGTERM after a checkpoint.",
        epilog="algorithms (optim.algorithm; compressors it takes, the first is its default for "
               "compress.name = \"auto\"):\n" + "\n".join(
                   f"  {a.name:<14} [{', '.join(a.compressors)}] {a.description}"
                   for a in catalog.ALGORITHMS.values()),
        formatter_class=_Formatter)
    p.add_argument("config", help="TOML config file (see configs/ and docs/configuration.md)")
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


def _data_parser(sub) -> None:
    p = sub.add_parser(
        "data", help="the known datasets: where each is looked for, and adding a file",
        description="Without arguments: every dataset a config can name (data.dataset), the file name looked "
                    "for, and where it is: $CDMPI_DATA_DIR, then the cache ($CDMPI_CACHE_DIR/libsvm, default "
                    "~/.cache/cdmpi/libsvm), then cdmpi's own copy (mushrooms), then a download from the LIBSVM "
                    "page (not with CDMPI_OFFLINE=1). Every file is checked against its sha256. Any other LibSVM "
                    "file can be trained on by path: --set data.dataset=/path/to/file.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    add = actions.add_parser("add", help="copy a dataset's file into the cache, after checking its sha256",
                             description="Copy FILE into the cache under its dataset's name (the one whose "
                                         "sha256 it has, or NAME), so that configs find it anywhere.")
    add.add_argument("file", help="a LIBSVM file, e.g. a9a as downloaded from the LIBSVM page")
    add.add_argument("name", nargs="?", default=None, help="the dataset it is (default: found by its sha256)")


def _watch_parser(sub) -> None:
    p = sub.add_parser("watch", help="follow a running job's metrics file to its end",
                       description="A progress bar and the latest row of RUN.h5 while a run writes it (read as an "
                                   "HDF5 SWMR reader: the run is never disturbed). Ends when the run does: exit 0 "
                                   "if it finished, 1 if it stopped or failed first.",
                       formatter_class=_Formatter)
    p.add_argument("file", help="the metrics file a run writes (its --out)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between looks")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the file to appear")


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="summarise metrics files, one row per run", formatter_class=_Formatter,
                       description="One row per run: algorithm, compressor, topology, workers, steps, final "
                                   "loss, final and minimum grad_norm_sq, the last test accuracy and the total "
                                   "bits (up + down).")
    p.add_argument("files", nargs="+", help="HDF5 metrics files written by `cdmpi train` or `cdmpi sweep`, "
                                            "or folders of them")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--best", action="store_true",
                   help="one row per dataset, algorithm and compressor: the step size with the lowest final "
                        "grad_norm_sq")
    p.add_argument("--best-by", default=None, metavar="COLUMN[:max|:min]",
                   help="--best by the last value of another /train or /eval column, e.g. --best-by "
                        "accuracy:max (default :min)")
    p.add_argument("--target", default=None, metavar="COLUMN<=VALUE|COLUMN>=VALUE",
                   help="add the first step at which COLUMN (of /train, else /eval) gets to VALUE, from above "
                        "(<=, a loss) or below (>=, an accuracy), and the bits (up + down) spent until then, "
                        "e.g. --target grad_norm_sq<=1e-4 or --target accuracy>=0.9 ('-': never reached; "
                        "COLUMN=VALUE means <=)")


def _sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="run every combination of configs, algorithms and grid values",
        description="One HDF5 file per run in --out-dir, named CONFIG_ALGORITHM_KEY=VALUE.h5. A run writes "
                    ".partial/NAME.h5 and moves it up when done, so an interrupted sweep resumes where it "
                    "stopped; a finished file from a different config is an error.",
        formatter_class=_Formatter)
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
        description="One column per dataset, one row per --x axis (and method, with --by-method), one curve "
                    "per run (or per algorithm with --best); y on a log scale where its curves span a decade or "
                    "more, bits on a log scale. Needs matplotlib.",
        formatter_class=_Formatter)
    p.add_argument("files", nargs="+", help="metrics files or folders of them")
    p.add_argument("--x", nargs="+", default=["bits", "step"], choices=("bits", "step"),
                   help="x axes, one row of panels each: bits (up + down) or step")
    p.add_argument("--y", default="grad_norm_sq",
                   help="a column of /train or /eval: grad_norm_sq, loss, accuracy, ...")
    p.add_argument("--best", action="store_true",
                   help="only the best step size of each method: by the last grad_norm_sq, or by the last value of "
                        "--y when it is another column (the highest accuracy, the lowest otherwise)")
    p.add_argument("--by-method", action="store_true",
                   help="a row of panels per method and x axis, each panel one method's step sizes (for many runs)")
    p.add_argument("--title", default=None)
    p.add_argument("--out", required=True, help="PNG (or any format matplotlib writes)")


def _project_parser(sub) -> None:
    p = sub.add_parser(
        "project", help="projected step time on other networks from a run's measured times and bytes",
        description="For each metrics file (with the timing/ group cdmpi train writes), the step time on "
                    "links of the given bandwidths: measured compute, encode, aggregate and update times "
                    "plus latency and the bytes per step through rank 0's link (star topology), and for "
                    "comparison an fp32 ring Allreduce of the same d with the same compute. The model is "
                    "in docs/performance.md.",
        formatter_class=_Formatter)
    p.add_argument("files", nargs="+", help="HDF5 metrics files")
    p.add_argument("--bandwidth", default="1,10,100", help="link bandwidths in Gbit/s, comma-separated")
    p.add_argument("--latency", type=float, default=5e-6, help="one-way latency per message in seconds")
    p.add_argument("--medians", action="store_true",
                   help="project the typical step: each phase's median over the steps, no metric bytes "
                        "(default: the means over the run, logged rows and first-step costs included)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdmpi", description="Communication-compressed distributed AMSGrad (CD-Adam) over MPI.")
    parser.add_argument("--version", action="version", version=f"cdmpi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _data_parser(sub)
    _sweep_parser(sub)
    _report_parser(sub)
    _watch_parser(sub)
    _plot_parser(sub)
    _project_parser(sub)
    return parser


def cmd_train(args, stop: StopOnSigterm) -> int:
    from . import launcher

    backend = args.backend
    if backend == "auto":
        backend = "mpi" if launcher.launched_by_mpi() else "local"
    # The config and the command line first, before torch and MPI start: a mistake costs a fraction of a
    # second. Every rank reads the same config and fails alike, so the launcher's rank 0 alone says why.
    try:
        cfg = _checked_config(args, backend)
    except CdmpiError as err:
        if launcher.rank() == 0:
            print(f"cdmpi: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from . import runs, transport as transports

    transport = None
    if backend == "mpi":
        try:
            transport = transports.MPITransport.from_world()
        except ImportError as err:
            print(f"cdmpi: error: the MPI backend needs mpi4py ({err}); pip install 'cdmpi[mpich]' or build "
                  f"mpi4py against your MPI", file=sys.stderr)
            return EXIT_BAD_INPUT
    rank = transport.rank if transport is not None else 0
    if transport is not None:  # from here on no rank waits for a stalled one unwatched
        from .engine import FaultHooks

        transport.watch(cfg.comm.timeout, setting_up=True)
        FaultHooks.stop_in_setup(rank)
    logger = log.setup(rank, verbose=not args.quiet)
    job = _TrainJob(args, cfg, transport)
    for phase in (job.prepare, job.build, job.start):
        if not runs.agreed(phase, job.transport, rank):
            return EXIT_BAD_INPUT
    engine = job.training.engine
    engine.stop_requested = stop.requested
    if not args.quiet:
        engine.progress_total = job.cfg.run.steps
    logger.info("%s; %s with %s, %d workers, d = %d, %s backend", engine.description, job.cfg.optim.algorithm,
                engine.attrs["compressor"], job.transport.n_workers, engine.d, job.transport.name)
    status, row = runs.finish(job.training.run, job.transport, rank)
    if status == 0 and row is not None:
        print(f"cdmpi: {job.cfg.optim.algorithm} finished {row['step']} steps: loss {row['loss']:.6g}, "
              f"grad_norm_sq {row['grad_norm_sq']:.4e}, bits up {row['bits_up']:.4e}, "
              f"down {row['bits_down']:.4e} -> {job.out}")
    return status


def _checked_config(args, backend: str) -> config.Config:
    """The config, and the command line's own mistakes, checked without torch or MPI."""
    from . import launcher

    if backend == "local" and launcher.world_size() > 1:
        raise CdmpiError(f"--backend local under an MPI launcher would start {launcher.world_size()} separate runs "
                         f"racing on one output; run `cdmpi train` without mpiexec/srun for the in-process "
                         f"backend, or drop --backend local")
    if args.workers is not None and args.workers < 1:
        raise CdmpiError(f"--workers must be >= 1, got {args.workers}")
    if args.out is not None and Path(args.out).suffix not in (".h5", ".hdf5"):
        raise CdmpiError(f"--out {args.out}: the metrics file is HDF5; name it .h5 or .hdf5")
    cfg = config.load(args.config, args.overrides)
    # What every rank can see alike on the shared file system, answered before torch starts (seconds
    # under mpiexec -n 21 on loaded cores); the set-up phases check the same again, under the lock.
    from . import data, lock

    data.check_available(cfg.data.dataset)
    if args.out is not None:
        _check_writable_folder(Path(args.out))
        lock.check_free(Path(str(args.out) + ".lock"))
        if Path(args.out).exists() and not (args.overwrite or args.resume):
            raise CdmpiError(f"metrics file {args.out} exists; pass --overwrite or choose another --out")
    return cfg


def _check_writable_folder(out: Path) -> None:
    """The metrics file's folder, or the nearest existing one above it (made on the way), can be written
    into: asked before torch starts, so that a typo is an answer in seconds."""
    import os

    folder = out.absolute().parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CdmpiError(f"--out {out}: cannot write into {existing or folder}; choose a writable folder")


class _TrainJob:
    """The set-up phases of `cdmpi train`, each run on every rank and agreed on (runs.agreed)."""

    def __init__(self, args, cfg: config.Config, transport):
        self.args = args
        self.cfg = cfg
        self.transport = transport  # None until prepare() makes the in-process one
        self.training = None

    @property
    def out(self) -> str:
        return self.args.out or f"runs/{Path(self.args.config).stem}-{self.cfg.optim.algorithm}.h5"

    def prepare(self) -> None:
        """Config and world size; rank 0 fetches the data the others will read."""
        from . import data, transport as transports

        args = self.args
        if self.transport is None:
            self.transport = transports.LocalTransport(args.workers if args.workers is not None
                                                       else self.cfg.run.workers)
        else:
            self.transport.check_workers(args.workers)
            if args.workers is None and self.cfg.run.workers != self.transport.n_workers:
                log.LOGGER.info("config asks for %d workers; the world has %d: using %d", self.cfg.run.workers,
                                self.transport.n_workers, self.transport.n_workers)
        self.cfg = config.replace(self.cfg, "run", workers=self.transport.n_workers)
        if self.transport.rank == 0:
            data.prefetch(self.cfg.data.dataset)

    def build(self) -> None:
        from . import train

        self.training = train.build(self.cfg, self.transport)  # the metrics file comes after the resume

    def start(self) -> None:
        from . import runs

        engine = self.training.engine
        step = runs.start(engine, self.out, resume=self.args.resume, overwrite=self.args.overwrite,
                          warn=log.LOGGER.warning)
        if step is not None:
            log.LOGGER.info("resuming from checkpoint step %d in %s", step, engine.checkpoint_root)


def cmd_data(args) -> int:
    from . import data

    if args.action == "add":
        name, path = data.add(Path(args.file), args.name)
        print(f"cdmpi: {args.file} is {name}: copied to {path}")
        return 0
    rows = data.status()
    width = max(len(r["dataset"]) for r in rows)
    print(f"{'dataset':<{width}}  where")
    for r in rows:
        print(f"{r['dataset']:<{width}}  {r['where']}")
    print(f"\nLooked for, by file name, in ${data.DATA_DIR_ENV} ({os.environ.get(data.DATA_DIR_ENV) or 'unset'}), "
          f"then in the cache {data.cache_dir()}; mushrooms is bundled; the others are downloaded from "
          f"{data.LIBSVM_URL.format(name='NAME')} on first use"
          f"{' (off: $' + data.OFFLINE_ENV + ')' if os.environ.get(data.OFFLINE_ENV, '') not in ('', '0') else ''}. "
          f"Add a file: cdmpi data add FILE. Any LibSVM file: --set data.dataset=/path/to/file")
    return 0


def cmd_watch(args) -> int:
    from . import watch

    if args.interval <= 0:
        raise CdmpiError(f"--interval must be > 0, got {args.interval}")
    return watch.watch(args.file, args.interval, args.wait)


def cmd_report(args) -> int:
    from . import analysis

    target = analysis.parse_target(args.target) if args.target else None
    rows = [analysis.summarize(path, target) for path in analysis.expand(args.files)]
    columns = analysis.COLUMNS
    by = analysis.parse_best_by(args.best_by) if args.best_by else None
    if args.best or by is not None:
        for warning in analysis.best_warnings(rows):
            print(f"cdmpi: warning: {warning}", file=sys.stderr)
        rows, columns = analysis.best(rows, by), analysis.BEST_COLUMNS
        if by is not None:  # the value each run was ranked by
            for row in rows:
                row[by[0]] = row["last"].get(f"train/{by[0]}", row["last"].get(f"eval/{by[0]}"))
            columns = [*columns[:-1], (by[0], "{:.6g}"), columns[-1]]
    if target is not None:
        columns = columns + analysis.TARGET_COLUMNS
    print(analysis.to_json(rows) if args.json else analysis.format_table(rows, columns))
    return 0


def cmd_sweep(args) -> int:
    from . import sweep
    from .launcher import launched_by_mpi

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

    from . import analysis, project

    bandwidths = project.parse_list(args.bandwidth, "--bandwidth")
    if args.latency < 0:
        raise CdmpiError(f"--latency must be >= 0, got {args.latency}")
    rows = project.rows(analysis.expand(args.files), bandwidths, args.latency, args.medians)
    print(json.dumps(rows, indent=1) if args.json else project.format_table(rows, bandwidths))
    return 0


def cmd_plot(args) -> int:
    from . import analysis, plot

    out = plot.figure(analysis.expand(args.files), xs=args.x, y=args.y, out=args.out, best_only=args.best,
                      title=args.title, warn=lambda text: print(f"cdmpi: warning: {text}", file=sys.stderr),
                      by_method=args.by_method)
    print(f"cdmpi: wrote {out}")
    return 0


def main(argv=None) -> int:
    code = _main(argv)
    metrics = sys.modules.get("cdmpi.metrics")
    if metrics is not None and metrics.abandoned():  # a full disk: end before HDF5 writes the file again
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv=None) -> int:
    # First thing: a SIGTERM while a run starts (imports, data loading) must stop it with exit status 75,
    # not end the process; the other commands get SIGTERM's usual meaning back once they are known.
    from . import signals

    stop = signals.EARLY if signals.EARLY is not None else StopOnSigterm().install()
    try:
        args = build_parser().parse_args(argv)
        if args.command != "train":
            stop.uninstall(deliver=True)
        commands = {"data": cmd_data, "sweep": cmd_sweep, "report": cmd_report, "watch": cmd_watch,
                    "plot": cmd_plot, "project": cmd_project}
        if args.command != "train":
            return commands[args.command](args)
        try:
            return cmd_train(args, stop)
        finally:
            stop.settle()  # see StopOnSigterm.settle: a late SIGTERM must not turn 75 or 0 into 15
    except CdmpiError as err:
        print(f"cdmpi: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("cdmpi: interrupted", file=sys.stderr)
        return 130
    # The train command keeps its handler to the end: a SIGTERM that reaches this rank after the run has
    # stopped (SLURM signals every rank, not all at once) must not turn exit status 75 into 143.
