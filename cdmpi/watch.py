"""`cdmpi watch RUN.h5`: follow a running job's metrics file (as an SWMR reader: it never disturbs the run)
with a progress bar and the latest row, until the run ends."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import h5py

from .errors import CdmpiError

SHOWN = ("loss", "grad_norm_sq", "accuracy")


def _snapshot(path: Path) -> dict:
    """The file's steps so far, its last rows, the run's planned steps and whether it finished."""
    with h5py.File(path, "r", swmr=True, locking=False) as fh:
        train = fh["train"]
        rows = min(ds.shape[0] for ds in train.values())
        last = {name: ds[rows - 1].item() for name, ds in train.items()} if rows else {}
        ev = fh.get("eval")
        if ev is not None and len(ev):
            count = min(ds.shape[0] for ds in ev.values())
            if count and "accuracy" in ev:
                last["accuracy"] = ev["accuracy"][count - 1].item()
        steps = fh.get("final/steps")
        return {"last": last, "planned": int(fh.attrs.get("steps", 0) or 0),
                "final": int(steps[0]) if steps is not None and len(steps) else -1}


def _running(path: Path) -> bool:
    """Whether the run writing `path` is alive: its lock file names the holder (cdmpi.lock)."""
    lock = Path(str(path) + ".lock")
    try:
        holder = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return False
    if holder.get("host") != socket.gethostname():
        return True  # another node's process: the lock file's presence is all we can see
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        pass
    return True


def watch(path: str | Path, interval: float = 1.0, wait: float = 60.0) -> int:
    """Follow the run to its end. 0: it finished; 1: it ended without finishing (stopped, failed)."""
    from tqdm import tqdm

    path = Path(path)
    deadline = time.monotonic() + wait
    while not path.is_file():
        if time.monotonic() > deadline:
            raise CdmpiError(f"{path} did not appear within {wait:g} s; is a run writing it?")
        time.sleep(interval)
    snap = None
    bar = None
    try:
        while True:
            try:
                snap = _snapshot(path)
            except (OSError, KeyError):  # the writer is adding a column this instant
                time.sleep(interval)
                continue
            if bar is None:
                bar = tqdm(total=snap["planned"] or None, unit="step", desc=path.name, dynamic_ncols=True)
            step = int(snap["last"].get("step", 0))
            bar.n = max(step, snap["final"])
            bar.set_postfix({k: f"{snap['last'][k]:.4g}" for k in SHOWN if k in snap["last"]}, refresh=True)
            if snap["final"] >= 0 or not _running(path):
                break
            time.sleep(interval)
    finally:
        if bar is not None:
            bar.close()
    row = snap["last"]
    values = ", ".join(f"{k} {row[k]:.6g}" for k in SHOWN if k in row)
    if snap["final"] >= 0:
        print(f"cdmpi watch: {path} finished after {snap['final']} steps" + (f": {values}" if values else ""))
        return 0
    print(f"cdmpi watch: {path}: the run ended without finishing, last row at step {row.get('step', '-')}"
          + (f" ({values})" if values else "") + "; resume it with --resume auto")
    return 1
