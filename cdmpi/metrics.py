"""The HDF5 metrics file: one per run, written by the server.

Layout (see the README for the public description):

    /                 attributes: config (JSON), algorithm, compressor, n_workers, dim, world_size,
                      backend, mpi_library, cdmpi_version, created, format_version
    /train/<column>   1-D datasets of equal length, one row per logged step

Rows are buffered in memory and appended every ``flush_every`` rows and at close. A flush appends to a
copy of the file and renames it over the original, so a crash at any moment, even inside a flush, leaves
a closed, readable file holding every row of the last completed flush. A resumed run opens the existing
file and drops the rows at and after the checkpoint's step (they are recomputed), so steps stay unique
and increasing.
"""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

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

UNITS = {"step": "iterations", "bits_up": "bits", "bits_down": "bits", "wall_time": "s"}


class MetricsWriter:
    def __init__(self, path: str | Path, attrs: dict, *, flush_every: int = 50, overwrite: bool = False,
                 columns: dict | None = None, resume_step: int | None = None):
        self.path = Path(path)
        self.flush_every = flush_every
        self.columns = {"train": dict(columns or TRAIN_COLUMNS)}
        self._rows: dict[str, list[dict]] = {"train": []}
        self._last_step: dict[str, int] = {}
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
                for group, columns in self.columns.items():
                    g = fh.create_group(group)
                    for name, dtype in columns.items():
                        ds = g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                              chunks=(1024,))
                        if name in UNITS:
                            ds.attrs["units"] = UNITS[name]
            os.replace(tmp, self.path)
        except OSError as err:
            raise CdmpiError(f"cannot write metrics file {self.path}: {err}") from None

    def append(self, group: str, row: dict) -> None:
        step = int(row["step"])
        if step <= self._last_step.get(group, -1):
            raise ValueError(f"{group}: steps must increase ({step} after {self._last_step[group]})")
        self._last_step[group] = step
        self._rows[group].append(row)
        if len(self._rows[group]) >= self.flush_every:
            self.flush()

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
            for group in fh.keys():
                if "step" not in fh[group]:
                    continue
                kept = int(np.searchsorted(fh[group]["step"][()], step, side="left"))
                for ds in fh[group].values():
                    ds.resize((kept,))
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
                for name, dtype in self.columns[group].items():
                    ds = fh[group][name]
                    start = ds.shape[0]
                    ds.resize((start + len(rows),))
                    ds[start:] = np.asarray([r[name] for r in rows], dtype=dtype)

        self._commit(append)
        for rows in self._rows.values():
            rows.clear()

    def close(self) -> None:
        self.flush()


def read(path: str | Path) -> dict:
    """{'attrs': {...}, 'train': {column: ndarray}} of one metrics file."""
    path = Path(path)
    if not path.is_file():
        raise CdmpiError(f"metrics file not found: {path}")
    try:
        with h5py.File(path, "r") as fh:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in fh.attrs.items()}
            groups = {g: {k: ds[()] for k, ds in fh[g].items()} for g in fh.keys()}
    except OSError as err:
        raise CdmpiError(f"cannot read metrics file {path}: {err}") from None
    if "train" not in groups:
        raise CdmpiError(f"{path} is not a cdmpi metrics file (no /train group)")
    return {"attrs": attrs, **groups}
