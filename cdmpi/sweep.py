"""Sweeps: every combination of configs x algorithms x grid values, one HDF5 file per run.

A run is finished when its file exists: it is written as .partial/NAME.h5 and moved up when the run ends,
so an interrupted sweep restarts where it stopped. A finished file whose stored config differs from the
planned one is an error (a changed sweep must not silently mix old and new runs).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from . import catalog, config
from .errors import AgreedError, CdmpiError

PARTIAL = ".partial"  # the folder, inside --out-dir, of runs not yet finished


def parse_grid(text: str) -> tuple[str, list]:
    """`optim.lr=0.001:0.011:0.002` (start:stop:step, stop excluded) or `key=v1,v2,...` (TOML values)."""
    key, sep, spec = text.partition("=")
    key, spec = key.strip(), spec.strip()
    if not sep or not key or not spec:
        raise CdmpiError(f"--grid expects key=start:stop:step or key=v1,v2,..., got {text!r}")
    if ":" in spec:
        try:
            start, stop, step = (Decimal(p) for p in spec.split(":"))
        except (ValueError, InvalidOperation):
            raise CdmpiError(f"--grid {text}: start:stop:step must be three numbers") from None
        if step <= 0 or stop <= start:
            raise CdmpiError(f"--grid {text}: needs step > 0 and stop > start")
        values, v = [], start  # Decimal steps: 0.001 + 2 * 0.002 is 0.005, not 0.005000000000000001
        while v < stop:
            values.append(int(v) if all(x == x.to_integral_value() for x in (start, step)) else float(v))
            v += step
        return key, values
    return key, [config.parse_override(f"{key}={part}")[1] for part in spec.split(",")]


def parse_algorithms(text: str) -> list[tuple[str, str | None]]:
    """`cdadam,amsgrad:identity` -> [('cdadam', None), ('amsgrad', 'identity')]: an optional compressor
    per algorithm (None: the config's compress.name)."""
    out = []
    for item in text.split(","):
        name, _, compressor = item.strip().partition(":")
        if name not in catalog.ALGORITHMS:
            raise CdmpiError(f"--algorithms: unknown algorithm {name!r}; choose from "
                             f"{', '.join(catalog.ALGORITHMS)}")
        out.append((name, compressor or None))
    return out


@dataclass(frozen=True)
class Run:
    config_path: str
    overrides: tuple[str, ...]  # --set values, then the algorithm, compressor and grid point
    cfg: config.Config
    out: Path

    @property
    def partial(self) -> Path:
        """Where the run is written until it ends: a hidden folder beside run.out, so that `report DIR` and
        `plot DIR` see finished runs only, and the name keeps its .h5."""
        return self.out.parent / PARTIAL / self.out.name


def _value_text(value) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def plan(config_paths, algorithm_specs, grids, out_dir, overrides=()) -> list[Run]:
    runs = []
    keys = [key for key, _ in grids]
    for path in config_paths:
        for name, compressor in algorithm_specs:
            for point in itertools.product(*(values for _, values in grids)):
                sets = [*overrides, f'optim.algorithm="{name}"']
                if compressor:
                    sets.append(f'compress.name="{compressor}"')
                sets += [f"{key}={_value_text(value)}" for key, value in zip(keys, point)]
                cfg = config.load(path, sets)
                catalog.compressor_for(cfg.optim.algorithm, cfg.compress.name)  # a bad pair fails now
                label = "_".join([Path(path).stem, name + (f"-{compressor}" if compressor else "")]
                                 + [f"{key.split('.')[-1]}={value}" for key, value in zip(keys, point)])
                runs.append(Run(str(path), tuple(sets), cfg, Path(out_dir) / f"{label}.h5"))
    names = [r.out.name for r in runs]
    if len(set(names)) != len(names):
        raise CdmpiError("two runs of this sweep would write the same file (same config file name twice?)")
    return runs


def is_finished(run: Run, workers: int) -> bool:
    """True if run.out exists with the planned config; an existing file with another config is an error."""
    if not run.out.exists():
        return False
    from . import metrics

    stored = _flat(metrics.read(run.out)["attrs"]["config"])
    planned = _flat(config.replace(run.cfg, "run", workers=workers).applicable())
    differ = sorted(key for key in stored.keys() | planned.keys() if stored.get(key) != planned.get(key))
    if differ:
        shown = "; ".join(f"{key} = {stored.get(key, '(unset)')!r} there, {planned.get(key, '(unset)')!r} planned"
                          for key in differ[:3])
        raise CdmpiError(f"{run.out} exists from a different config ({shown}); remove it or choose another "
                         f"--out-dir")
    return True


# Keys that do not change a run's numbers: a finished run stays finished when only these differ.
COSMETIC_KEYS = ("run.threads", "run.flush_every", "run.progress_every", "comm.wait", "comm.timeout")


def _flat(values: dict) -> dict:
    return {f"{section}.{key}": value for section, table in values.items() if section != "checkpoint"
            for key, value in table.items() if f"{section}.{key}" not in COSMETIC_KEYS}


def run_local(run: Run, workers: int) -> str:
    """One run in this process (called in a pool worker)."""
    from . import train
    from .transport import LocalTransport

    if run.out.exists():  # finished meanwhile by another sweep over the same folder
        return f"{run.out.name}: already finished"
    cfg = config.replace(run.cfg, "run", workers=workers)
    run.partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        row = train.build(cfg, LocalTransport(workers), out=run.partial, overwrite=True).run()
    except AgreedError as err:
        if not str(err).startswith("non-finite"):
            raise
        # a step size too large for the problem is a result of the sweep: its rows up to there are kept
        os.replace(run.partial, run.out)
        return f"{run.out.name}: stopped, {str(err).split(';')[0]}"
    os.replace(run.partial, run.out)
    return f"{run.out.name}: grad_norm_sq {row['grad_norm_sq']:.4e}"


def run_mpi(run: Run, workers: int, mpiexec: str) -> str:
    cmd = [mpiexec, "-n", str(workers + 1), sys.executable, "-m", "cdmpi", "train", run.config_path,
           "--out", str(run.partial), "--overwrite", "--quiet"]
    for text in run.overrides:
        cmd += ["--set", text]
    run.partial.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise CdmpiError(f"{run.out.name}: mpiexec failed ({result.returncode}): "
                         f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}")
    os.replace(run.partial, run.out)
    return f"{run.out.name}: done under MPI"


def execute(runs: list[Run], *, workers: int | None, backend: str, jobs: int, mpiexec: str | None,
            log=print) -> tuple[int, int]:
    """Run what is not finished; returns (ran, skipped)."""
    todo, skipped = [], 0
    for run in runs:
        n = workers or run.cfg.run.workers
        if is_finished(run, n):
            skipped += 1
        else:
            todo.append((run, n))
    if todo:
        todo[0][0].out.parent.mkdir(parents=True, exist_ok=True)
    log(f"cdmpi sweep: {len(runs)} runs, {skipped} already finished, {len(todo)} to run "
        f"({backend}, {jobs} at a time)")
    if backend == "mpi":
        if mpiexec is None:
            raise CdmpiError("--backend mpi needs mpiexec on PATH (or beside this Python)")
        pool, submit = ThreadPoolExecutor(jobs), lambda r, n: pool.submit(run_mpi, r, n, mpiexec)
    elif jobs > 1:
        pool, submit = ProcessPoolExecutor(jobs), lambda r, n: pool.submit(run_local, r, n)
    else:
        pool, submit = None, None
    done = 0
    if pool is None:
        for run, n in todo:
            done += 1
            log(f"[{done}/{len(todo)}] {run_local(run, n)}")
        return done, skipped
    with pool:
        futures = [submit(run, n) for run, n in todo]
        try:
            for future in futures:
                message = future.result()
                done += 1
                log(f"[{done}/{len(todo)}] {message}")
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return done, skipped
