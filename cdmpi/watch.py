"""`cdmpi watch RUN.h5`: follow a running job's metrics file (as an SWMR reader: it never disturbs the run)
with a progress bar and the latest row, until the run ends.

It follows the run that holds the output's lock (RUN.h5.lock names its host, pid and start time; the file
records the same holder as its `writer` attribute). While a new run (an `--overwrite` or a resume) is
starting, the file on disk is still the earlier run's: watch waits for the new one instead of reporting the
old run's end. The last line gives the row the file ends with, read after `final/steps` (the run flushes
every row before it writes final/steps), so it is the row `cdmpi report` shows."""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import lock, metrics
from .errors import CdmpiError

SHOWN = ("loss", "grad_norm_sq", "accuracy")


def _snapshot(path: Path) -> dict:
    """The file's run, whether it finished (final/steps, read first), its last rows and planned steps."""
    with metrics.open_file(path) as fh:
        steps = fh.get("final/steps")
        final = int(steps[0]) if steps is not None and len(steps) else -1
        train = metrics.datasets(fh, "train", path)
        if "step" not in train:
            raise KeyError("no /train/step")
        rows = min(ds.shape[0] for ds in train.values())
        last = {name: ds[rows - 1].item() for name, ds in train.items()} if rows else {}
        ev = metrics.datasets(fh, "eval", path) if "eval" in fh else None
        if ev:
            count = min(ds.shape[0] for ds in ev.values())
            if count and "accuracy" in ev:
                last["accuracy"] = ev["accuracy"][count - 1].item()
        writer = fh.attrs.get("writer")
        return {"last": last, "planned": int(fh.attrs.get("steps", 0) or 0), "final": final,
                "run_id": str(fh.attrs.get("run_id", "?")), "created": str(fh.attrs.get("created", "?")),
                "writer": json.loads(writer) if isinstance(writer, (str, bytes)) else None}


def _holder(path: Path) -> dict | None:
    """The live process that holds the run's lock (cdmpi.lock), or None when none does."""
    return lock.live_holder(Path(str(path) + ".lock"))


def _same(a: dict | None, b: dict | None) -> bool:
    keys = ("host", "pid", "started")
    return a is not None and b is not None and all(a.get(k) == b.get(k) for k in keys)


def watch(path: str | Path, interval: float = 1.0, wait: float = 60.0) -> int:
    """Follow the run to its end. 0: it finished; 1: it ended without finishing (stopped, failed)."""
    path = Path(path)
    deadline = time.monotonic() + wait
    snap, announced = None, None
    while True:  # a readable file of the run that holds the lock (or of a run that no longer runs)
        if path.is_file():
            holder = _holder(path)
            try:
                snap = _snapshot(path)
            except (OSError, KeyError, ValueError) as err:  # being made, or the writer adds a column this instant
                snap = None
                if holder is None:  # no run is writing it: it will not get better
                    raise CdmpiError(f"{path} is not a readable cdmpi metrics file: {err}") from None
            if snap is not None and (holder is None or snap["writer"] is None or _same(holder, snap["writer"])):
                break
            if holder is not None and announced is None:
                announced = holder
                print(f"cdmpi watch: waiting for the run that holds {path}.lock (host {holder.get('host')}, "
                      f"pid {holder.get('pid')}, started {holder.get('started')}) to write its file", flush=True)
        if time.monotonic() > deadline:
            raise CdmpiError(f"{path} did not appear within {wait:g} s; is a run writing it?"
                             if not path.is_file() else
                             f"{path} is not readable as the metrics file of the run holding its lock within "
                             f"{wait:g} s")
        time.sleep(interval)
    print(f"cdmpi watch: {path}: run {snap['run_id']}, created {snap['created']}", flush=True)
    if snap["final"] < 0 and _holder(path) is not None:
        snap = _follow(path, snap, interval)
    row = snap["last"]
    values = ", ".join(f"{k} {row[k]:.6g}" for k in SHOWN if k in row)
    if snap["final"] >= 0:
        print(f"cdmpi watch: {path} finished after {snap['final']} steps" + (f"; last row, step "
              f"{row.get('step', '-')}: {values}" if values else ""))
        return 0
    print(f"cdmpi watch: {path}: the run ended without finishing, last row at step {row.get('step', '-')}"
          + (f" ({values})" if values else "") + "; resume it with --resume auto")
    return 1


def _follow(path: Path, snap: dict, interval: float) -> dict:
    """A progress bar while the run holds its lock; returns the snapshot taken after it let go (or
    finished): final/steps first, then the rows, so the last row is the file's last."""
    from tqdm import tqdm

    first = int(snap["last"].get("step", 0))
    bar = tqdm(total=snap["planned"] or None, initial=first, unit="step", desc=path.name, dynamic_ncols=True)
    try:
        while True:
            holder = _holder(path)
            try:
                snap = _snapshot(path)
            except (OSError, KeyError):
                time.sleep(interval)
                continue
            step = int(snap["last"].get("step", first))
            bar.update(max(step, snap["final"]) - bar.n)
            bar.set_postfix({k: f"{snap['last'][k]:.4g}" for k in SHOWN if k in snap["last"]}, refresh=True)
            if holder is None or (snap["writer"] is not None and not _same(holder, snap["writer"])):
                break  # the writer let go (finished, stopped or died), or another run took the output
            if snap["final"] >= 0:
                while _holder(path) is not None and _same(_holder(path), snap["writer"]):
                    time.sleep(interval)  # the run is writing its end-of-run arrays and closing the file
                return _snapshot(path)
            time.sleep(interval)
    finally:
        bar.close()
    return snap
