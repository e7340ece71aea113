"""The HDF5 metrics file: one per run, written by the server.

Layout (see the README for the public description):

    /                 attributes: config (JSON), algorithm, compressor, n_workers, dim, world_size,
                      backend, mpi_library, cdmpi_version, created, format_version
    /train/<column>   1-D datasets of equal length, one row per logged step: step, loss, grad_norm_sq,
                      bits_up, bits_down, wall_time, and any value a user's script logs
    /final/params     the workers' final x (float64), written when the run ends
    /eval/<column>    one row per evaluation: step, bits_up, bits_down and the logged values (the
                      classifier problem: epoch, loss, accuracy on the test set)

Rows are buffered in memory and appended every ``flush_every`` rows and at close. A flush appends to a
copy of the file and renames it over the original, so a crash at any moment, even inside a flush, leaves
a closed, readable file holding every row of the last completed flush. A resumed run opens the existing
file and drops the rows at and after the checkpoint's step (they are recomputed), so steps stay unique
and increasing.

A row's values come from the workers: each worker that logged at a step gives a dict, and a reducer makes
the row from them, in worker order (``mean_of_workers`` for a user's values, ``sum_of_shares`` for the
built-in problems' metric shares). A column that a run logs for the first time is added then; earlier
rows read NaN there.
"""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import torch

from .errors import CdmpiError

FORMAT_VERSION = 1

TRAIN_COLUMNS = {
    "step": np.int64,  # completed iterations t; the row describes x_t (x_0 is the initial point)
    "loss": np.float64,  # f(x_t) over all data
    "grad_norm_sq": np.float64,  # ||grad f(x_t)||^2 of the full objective
    "bits_up": np.int64,  # cumulative bits all workers sent to the server after t iterations
    "bits_down": np.int64,  # cumulative bits all workers received from the server
    "wall_time": np.float64,  # seconds since the first iteration started
}

EVAL_COLUMNS = {
    "step": np.int64,  # completed iterations t
    "bits_up": np.int64,  # as in /train, for plots of accuracy against bits
    "bits_down": np.int64,
}
# Columns every run has, whatever it logs; the others are float64.
CORE_COLUMNS = {"train": TRAIN_COLUMNS, "eval": EVAL_COLUMNS}

UNITS = {"step": "iterations", "bits_up": "bits", "bits_down": "bits", "wall_time": "s"}


class MetricsWriter:
    def __init__(self, path: str | Path, attrs: dict, *, flush_every: int = 50, overwrite: bool = False,
                 resume_step: int | None = None):
        self.path = Path(path)
        self.flush_every = flush_every
        self.columns: dict[str, dict] = {g: dict(c) for g, c in CORE_COLUMNS.items()}  # group -> columns
        self._rows: dict[str, list[dict]] = {group: [] for group in self.columns}
        self._last_step: dict[str, int] = {}
        self._in_file: dict[str, int] = {}  # group -> rows already in the file
        if resume_step is not None:
            self._resume(attrs, resume_step)
            return
        if self.path.exists() and not overwrite:
            raise CdmpiError(f"metrics file {self.path} exists; pass --overwrite or choose another --out")
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with h5py.File(tmp, "w") as fh:
                for key, value in attrs.items():
                    fh.attrs[key] = value
                fh.attrs["format_version"] = FORMAT_VERSION
                fh.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
                self._add_columns(fh, "train")
            os.replace(tmp, self.path)
        except OSError as err:
            raise CdmpiError(f"cannot write metrics file {self.path}: {err}") from None

    def append(self, group: str, row: dict) -> None:
        step = int(row["step"])
        if step <= self._last_step.get(group, -1):
            raise ValueError(f"{group}: steps must increase ({step} after {self._last_step[group]})")
        self._last_step[group] = step
        columns = self.columns.setdefault(group, {"step": np.int64})
        for name in row:
            columns.setdefault(name, np.float64)
        self._rows.setdefault(group, []).append(row)
        if len(self._rows[group]) >= self.flush_every:
            self.flush()

    def _add_columns(self, fh, group: str) -> None:
        """Create the group's missing datasets; a new column reads NaN in the rows before it."""
        g = fh.require_group(group)
        count = self._in_file.setdefault(group, 0)
        for name, dtype in self.columns[group].items():
            if name in g:
                continue
            ds = g.create_dataset(name, shape=(count,), maxshape=(None,), dtype=dtype, chunks=(1024,),
                                  fillvalue=np.nan if dtype == np.float64 else 0)
            if name in UNITS:
                ds.attrs["units"] = UNITS[name]

    def _commit(self, change) -> None:
        """Apply change(h5py.File) to a copy of the file, then rename the copy over it (crash-safe)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            shutil.copyfile(self.path, tmp)
            with h5py.File(tmp, "a") as fh:
                change(fh)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as err:
            raise CdmpiError(f"cannot write metrics file {self.path}: {err}") from None

    def _resume(self, attrs: dict, step: int) -> None:
        """Continue an existing file from a checkpoint at `step`: rows with step >= `step` are dropped."""
        if not self.path.is_file():
            raise CdmpiError(f"cannot resume: metrics file {self.path} not found (the checkpoint's rows "
                             f"continue it); pass the --out of the interrupted run")

        def truncate(fh):
            for key, value in attrs.items():
                fh.attrs[key] = value
            fh.attrs["resumed_at_steps"] = np.append(fh.attrs.get("resumed_at_steps", np.zeros(0, np.int64)),
                                                     np.int64(step))
            if "final" in fh:  # the end of the run is still to come
                del fh["final"]
            for group in list(fh.keys()):
                if not isinstance(fh[group], h5py.Group) or "step" not in fh[group]:
                    continue
                kept = int(np.searchsorted(fh[group]["step"][()], step, side="left"))
                columns = self.columns.setdefault(group, {})
                for name, ds in fh[group].items():
                    ds.resize((kept,))
                    columns.setdefault(name, ds.dtype.type)
                self._in_file[group] = kept
                self._rows.setdefault(group, [])
                if kept:
                    self._last_step[group] = int(fh[group]["step"][kept - 1])

        try:
            self._commit(truncate)
        except OSError as err:
            raise CdmpiError(f"cannot resume metrics file {self.path}: {err}") from None

    def flush(self) -> None:
        if not any(self._rows.values()):
            return

        def append(fh):
            for group, rows in self._rows.items():
                if not rows:
                    continue
                self._add_columns(fh, group)
                for name, dtype in self.columns[group].items():
                    ds = fh[group][name]
                    start = ds.shape[0]
                    missing = np.nan if dtype == np.float64 else 0
                    ds.resize((start + len(rows),))
                    ds[start:] = np.asarray([r.get(name, missing) for r in rows], dtype=dtype)
                self._in_file[group] += len(rows)

        self._commit(append)
        for rows in self._rows.values():
            rows.clear()

    def write_array(self, name: str, array: np.ndarray) -> None:
        """A fixed dataset, e.g. final/params (replaced if present)."""
        def write(fh):
            if name in fh:
                del fh[name]
            fh.create_dataset(name, data=array)

        self._commit(write)

    def set_attrs(self, attrs: dict) -> None:
        def write(fh):
            for key, value in attrs.items():
                fh.attrs[key] = value

        self._commit(write)

    def close(self) -> None:
        self.flush()


# ---- rows from the workers' values ----------------------------------------------------------------------

def _ordered_sum(values: list):
    total = values[0].clone() if isinstance(values[0], torch.Tensor) else values[0]
    for value in values[1:]:
        total = total + value
    return total


def _as_number(value):
    return float(value) if not isinstance(value, torch.Tensor) or value.numel() == 1 else value


def mean_of_workers(values: list[dict]) -> dict:
    """Each key: the mean over the workers that gave it, summed in worker order (a user's values); a value
    that every worker gave alike (a learning rate, an epoch) is kept as it is."""
    keys = list(dict.fromkeys(k for v in values for k in v))
    row = {}
    for key in keys:
        given = [torch.as_tensor(v[key], dtype=torch.float64) for v in values if key in v]
        same = all(torch.equal(g, given[0]) for g in given[1:])
        row[key] = _as_number(given[0] if same else _ordered_sum(given) / len(given))
    return row


def sum_of_shares(values: list[dict]) -> dict:
    """Each key: the sum over the workers in worker order of their shares (the built-in problems, whose
    shares add up to the value over all data). The share "loss_and_grad" is the vector [f, grad f] of a
    worker's part of the objective: its sum gives loss and grad_norm_sq, the squared norm of the gradient."""
    keys = list(dict.fromkeys(k for v in values for k in v))
    row = {}
    for key in keys:
        total = _ordered_sum([torch.as_tensor(v[key], dtype=torch.float64) for v in values if key in v])
        if key == "loss_and_grad":
            row["loss"] = float(total[0])
            row["grad_norm_sq"] = float(torch.dot(total[1:], total[1:]))
        else:
            row[key] = _as_number(total)
    return row


REDUCERS = {"mean": mean_of_workers, "shares": sum_of_shares}


def read(path: str | Path) -> dict:
    """{'attrs': {...}, 'train': {column: ndarray}} of one metrics file."""
    path = Path(path)
    if not path.is_file():
        raise CdmpiError(f"metrics file not found: {path}")
    try:
        with h5py.File(path, "r") as fh:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in fh.attrs.items()}
            groups = {g: {k: ds[()] for k, ds in fh[g].items()} for g in fh.keys()
                      if isinstance(fh[g], h5py.Group)}
    except OSError as err:
        raise CdmpiError(f"cannot read metrics file {path}: {err}") from None
    if "train" not in groups:
        raise CdmpiError(f"{path} is not a cdmpi metrics file (no /train group)")
    return {"attrs": attrs, **groups}
