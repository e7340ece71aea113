"""The HDF5 metrics file: one per run, written in place by the server for the run's whole life.

Layout (see the README for the public description):

    /                 attributes: config (JSON), algorithm, compressor, n_workers, dim, world_size, backend,
                      mpi_library, cdmpi_version, created, format_version, run_id, comm paths, ...
    /train/<column>   1-D datasets of equal length, one row per logged step: step, loss, grad_norm_sq,
                      bits_up, bits_down, wall_time, and any value a user's script logs
    /eval/<column>    one row per evaluation: step, bits_up, bits_down and the logged values (the
                      classifier problem: epoch, loss, accuracy on the test set)
    /final, /timing, /comm   end-of-run arrays (final parameters, time per phase, bytes per rank): made
                      with the file, NaN until the run ends

The file is written with HDF5's single-writer/multiple-reader mode (SWMR): made complete under a temporary
name and renamed into place, then opened once and appended to in place (rows buffered and written every
``flush_every`` rows, at each checkpoint and at the end). Readers open it with ``swmr=True`` (as
``read`` does) at any moment and never disturb the writer; after a crash it opens the same way and holds
every flushed row. SWMR cannot make attributes or datasets while it runs, so everything the run knows of
is made before it starts; a column first logged mid-run is added by closing SWMR, adding it and starting
SWMR again (a reader opening the file in that instant is retried by ``read``). A resumed run rebuilds the
file from the one it continues (rows before the checkpoint's step; steps stay unique and increasing).

A row's values come from the workers: each worker that logged at a step gives a dict, and a reducer makes
the row from them, in worker order (``cdmpi.rows``). A column that a run logs for the first time is added
then; earlier rows read NaN there.

This module reads and writes files with h5py and NumPy only: `cdmpi report`, `plot`, `watch` and
`project` import neither torch nor MPI.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import time
from pathlib import Path

import h5py
import numpy as np

from .errors import CdmpiError

FORMAT_VERSION = 2  # 2: written in place (SWMR); end-of-run arrays made with the file

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
# Columns every row of a group has, whatever it logs; the others are float64.
CORE_COLUMNS = {"train": TRAIN_COLUMNS, "eval": EVAL_COLUMNS}

UNITS = {"step": "iterations", "bits_up": "bits", "bits_down": "bits", "wall_time": "s"}


class MetricsWriter:
    """The server's writer of one metrics file. `columns` (group -> {name: dtype}) and `finals` (name ->
    (shape, dtype), the end-of-run arrays) are what the file is made with; `attrs` are its attributes.
    resume_step: continue the file of a run resumed at that step, keeping its rows before rows_step (default:
    resume_step; rows at and after it are dropped)."""

    def __init__(self, path: str | Path, attrs: dict, *, flush_every: int = 50, overwrite: bool = False,
                 resume_step: int | None = None, rows_step: int | None = None, columns: dict | None = None,
                 finals: dict | None = None):
        self.path = Path(path)
        self.flush_every = flush_every
        self.columns: dict[str, dict] = {g: dict(c) for g, c in (columns or {"train": TRAIN_COLUMNS}).items()}
        self.finals = dict(finals or {})
        self._rows: dict[str, list[dict]] = {group: [] for group in self.columns}
        self._last_step: dict[str, int] = {}
        self._fh: h5py.File | None = None
        source = None
        if resume_step is not None:
            if not self.path.is_file():
                raise CdmpiError(f"cannot resume: metrics file {self.path} not found (the checkpoint's rows "
                                 f"continue it); pass the --out of the interrupted run")
            source = read(self.path, decode=False)  # the attributes as stored, to store again
        elif self.path.exists() and not overwrite:
            raise CdmpiError(f"metrics file {self.path} exists; pass --overwrite or choose another --out")
        try:
            self._make(attrs, source, resume_step, resume_step if rows_step is None else rows_step)
        except OSError as err:
            raise CdmpiError(f"cannot write metrics file {self.path}: {err}") from None

    def _make(self, attrs: dict, source: dict | None, resume_step: int | None, rows_step: int | None) -> None:
        """The complete file, made under a temporary name and put in SWMR mode before it is renamed into
        place: at its path it is never open for plain writing, which readers could not open."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        rows: dict[str, dict] = {}
        fh = h5py.File(tmp, "w", libver="latest", locking=False)
        try:
            if source is not None:  # the interrupted run's attributes and rows before the checkpoint
                for key, value in source["attrs"].items():
                    fh.attrs[key] = value
                for group, data in source.items():
                    if isinstance(data, dict) and "step" in data and group != "attrs":
                        kept = int(np.searchsorted(data["step"], rows_step, side="left"))
                        rows[group] = {name: values[:kept] for name, values in data.items()}
                        self.columns.setdefault(group, {}).update(
                            {name: values.dtype.type for name, values in data.items()})
                        if kept:
                            self._last_step[group] = int(data["step"][kept - 1])
                fh.attrs["resumed_at_steps"] = np.append(source["attrs"].get("resumed_at_steps",
                                                                             np.zeros(0, np.int64)),
                                                         np.int64(resume_step))
            else:
                fh.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
            for key, value in attrs.items():
                fh.attrs[key] = value
            fh.attrs["format_version"] = FORMAT_VERSION
            for group in dict.fromkeys([*self.columns, *rows]):
                self._add_columns(fh, group, rows.get(group, {}))
            for name, (shape, dtype) in self.finals.items():
                # storage allocated now: the first write must not change the dataset's layout under an SWMR
                # reader that holds the file open (it then fails with "invalid dataset size")
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                fh.create_dataset(name, shape=shape, dtype=dtype, fillvalue=np.nan if dtype == np.float64 else -1,
                                  dcpl=dcpl)
            fh.swmr_mode = True
            os.replace(tmp, self.path)
        except BaseException:
            fh.close()
            tmp.unlink(missing_ok=True)
            raise
        self._fh = fh

    def _open(self) -> None:
        # locking=False: a reader holding the file must not stop the writer (the run lock keeps writers one)
        self._fh = h5py.File(self.path, "r+", libver="latest", locking=False)
        self._fh.swmr_mode = True

    def _add_columns(self, fh, group: str, rows: dict | None = None) -> None:
        """Make the group's missing datasets; a new column reads NaN (or 0 for integers) in earlier rows."""
        g = fh.require_group(group)
        rows = rows or {}
        count = max((len(v) for v in rows.values()), default=next((ds.shape[0] for ds in g.values()), 0))
        for name, dtype in self.columns[group].items():
            if name in g:
                continue
            data = rows.get(name)
            ds = g.create_dataset(name, shape=(count,), maxshape=(None,), dtype=dtype, chunks=(1024,),
                                  fillvalue=np.nan if dtype == np.float64 else 0)
            if data is not None and len(data):
                ds[:] = data
            if name in UNITS:
                ds.attrs["units"] = UNITS[name]

    def append(self, group: str, row: dict) -> None:
        step = int(row["step"])
        if step <= self._last_step.get(group, -1):
            raise ValueError(f"{group}: steps must increase ({step} after {self._last_step[group]})")
        self._last_step[group] = step
        columns = self.columns.setdefault(group, dict(CORE_COLUMNS.get(group, {"step": np.int64})))
        for name in row:
            columns.setdefault(name, np.float64)
        self._rows.setdefault(group, []).append(row)
        if len(self._rows[group]) >= self.flush_every:
            self.flush()

    def _restart(self, change) -> None:
        """What SWMR cannot do while it runs: end it, change(file), start it again."""
        self._fh.close()
        with h5py.File(self.path, "r+", libver="latest", locking=False) as fh:
            change(fh)
        self._open()

    def flush(self) -> None:
        if not any(self._rows.values()):
            return
        fh = self._fh
        touched = []  # the datasets this flush writes
        try:
            pending = [g for g, rows in self._rows.items() if rows]
            if any(g not in fh or any(c not in fh[g] for c in self.columns[g]) for g in pending):
                self._restart(lambda f: [self._add_columns(f, g) for g in pending])
                fh = self._fh
            # every value converted before the file changes: a bad one leaves the file as it was
            columns = {(group, name): np.asarray([r.get(name, np.nan if dtype == np.float64 else 0)
                                                  for r in self._rows[group]], dtype=dtype)
                       for group in pending for name, dtype in self.columns[group].items()}
            # `step` last, after the other columns are on disk: readers take the rows every column has, so a
            # flush cut short (a full disk, a kill) leaves no row whose other columns read as fill values
            for last in (False, True):
                for (group, name), values in columns.items():
                    if (name == "step") == last:
                        ds = fh[group][name]
                        touched.append(ds)
                        start = ds.shape[0]
                        ds.resize((start + len(values),))
                        ds[start:] = values
                fh.flush()
        except (OSError, RuntimeError) as err:  # h5py reports some write failures (ENOSPC) as RuntimeError
            ABANDONED.extend(touched)  # not collected either: see _abandon
            self._abandon()
            raise CdmpiError(f"cannot write metrics file {self.path}: {_first_line(err)}") from None
        for rows in self._rows.values():
            rows.clear()

    def digest_before(self, step: int) -> str:
        """sha256 of every flushed row before `step` (all groups and columns, in name order): a resume checks
        that the rows it continues are the ones its checkpoint's run wrote."""
        return rows_digest({g: {k: ds[()] for k, ds in self._fh[g].items()} for g in self._fh
                            if isinstance(self._fh[g], h5py.Group) and "step" in self._fh[g]}, step)

    def rows_before(self, group: str, step: int) -> int:
        """Rows of `group` in the file (flushed) with a step before `step`."""
        if self._fh is None or group not in self._fh:
            return 0
        return int(np.searchsorted(self._fh[group]["step"][()], step, side="left"))

    def write_array(self, name: str, array: np.ndarray) -> None:
        """An end-of-run array (made with the file: written in place)."""
        array = np.asarray(array)
        if name not in self._fh or self._fh[name].shape != array.shape:
            def make(fh):
                if name in fh:
                    del fh[name]
                fh.create_dataset(name, data=array)
            self._restart(make)
        else:
            self._fh[name][...] = array
        self._fh.flush()

    def _abandon(self) -> None:
        """After a failed write: this writer writes nothing more. The HDF5 handle is kept, not closed:
        closing it (or collecting it at exit) makes HDF5 write again, fail again and, with h5py, print a
        traceback per object or crash; the process ends through `abandoned()` without closing it. The rows
        on disk stay as the last whole flush left them."""
        if self._fh is not None:
            ABANDONED.append(self._fh)
        self._fh = None
        for rows in self._rows.values():
            rows.clear()

    def close(self) -> None:
        if self._fh is None:
            return
        try:
            self.flush()
        finally:
            self._fh.close()
            self._fh = None




# Attributes stored as JSON text (HDF5 attributes hold no nested values); read() returns them decoded.
JSON_ATTRS = ("config", "versions", "hosts", "comm_paths", "writer")


def _attr(name: str, value, decode: bool):
    if isinstance(value, bytes):
        value = value.decode()
    if decode and name in JSON_ATTRS and isinstance(value, str):
        return json.loads(value)
    return value


def rows_digest(groups: dict, step: int) -> str:
    """sha256 over the rows with step < `step` of each group that has rows (groups and columns by name)."""
    digest = hashlib.sha256()
    for group in sorted(groups):
        columns = groups[group]
        if "step" not in columns:
            continue
        kept = int(np.searchsorted(columns["step"], step, side="left"))
        for name in sorted(columns):
            digest.update(f"{group}/{name}".encode())
            digest.update(np.ascontiguousarray(columns[name][:kept]).tobytes())
    return digest.hexdigest()


ABANDONED: list = []  # HDF5 files a failed write left open (see MetricsWriter._abandon)


def abandoned() -> bool:
    """Whether a metrics file was abandoned after a failed write: the process must then end with os._exit,
    before HDF5's own clean-up tries to write it again."""
    return bool(ABANDONED)


def _first_line(err: BaseException) -> str:
    """One line of an HDF5 error: its system error where it names one (HDF5's text spans several lines)."""
    text = str(err)
    found = re.search(r"error message = '([^']+)'", text)
    return found.group(1) if found else (text.strip().splitlines() or [type(err).__name__])[0]


def _truncated(path: Path) -> bool:
    """Whether the file is shorter than its HDF5 superblock says (version 2 and 3 superblocks, which cdmpi
    writes, keep the end-of-file address at byte 28). An SWMR reader of a truncated file can retry for
    minutes; this check answers at once."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(36)
    except OSError:
        return False
    if len(head) < 36 or head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] not in (2, 3) or head[9] != 8:
        return False
    end = int.from_bytes(head[28:36], "little")
    return path.stat().st_size < end


def open_file(path: str | Path) -> h5py.File:
    """A metrics file opened for reading: a finished one plainly (a damaged or foreign file fails at once),
    one being written, or whose writer died, as an SWMR reader (HDF5 refuses a plain open of those)."""
    path = Path(path)
    if _truncated(path):
        raise OSError(f"truncated file: {path.stat().st_size} bytes, shorter than its HDF5 superblock says")
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as err:
        text = str(err)
        if "consistency flags" not in text and "already open for write" not in text:
            raise
    return h5py.File(path, "r", swmr=True, locking=False)


def _group(fh: h5py.File, name: str, path: Path) -> dict:
    """A group's 1-D numeric datasets, read whole; links (soft, external) are not followed, and a dataset
    that is not a column (strings, compounds, 2-D) or declares far more rows than the file could hold is
    refused."""
    return {key: ds[()] for key, ds in datasets(fh, name, path).items()}


def datasets(fh: h5py.File, name: str, path: Path) -> dict:
    """The checked datasets of group `name` (see _group), not read."""
    out = {}
    group = fh[name]
    for key in group:
        link = group.get(key, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise CdmpiError(f"{path} is not a cdmpi metrics file: {name}/{key} is a link")
        ds = group[key]
        if not isinstance(ds, h5py.Dataset):
            continue
        if ds.dtype.kind not in "iuf" or (name in CORE_COLUMNS and ds.ndim != 1):
            raise CdmpiError(f"{path} is not a cdmpi metrics file: {name}/{key} is not a column of numbers "
                             f"({ds.dtype}, shape {ds.shape})")
        if ds.size * ds.dtype.itemsize > 64 * path.stat().st_size + (1 << 20):
            raise CdmpiError(f"{path} is not a cdmpi metrics file: {name}/{key} declares {ds.size} values, far "
                             f"more than its {path.stat().st_size} bytes hold")
        out[key] = ds
    return out


def read(path: str | Path, retry_seconds: float = 5.0, decode: bool = True) -> dict:
    """{'attrs': {...}, 'train': {column: ndarray}, ...} of one metrics file, finished or being written
    (see open_file). An open that fails while the writer adds a column is retried. The attributes
    in JSON_ATTRS come back decoded (unless decode=False): attrs['config'] is the run's config as a dict.
    A file that is not a whole cdmpi metrics file (truncated, foreign, hostile) is a CdmpiError."""
    path = Path(path)
    if not path.is_file():
        raise CdmpiError(f"metrics file not found: {path}")
    if _truncated(path):  # before the retries: it will not get better
        raise CdmpiError(f"cannot read metrics file {path}: truncated: {path.stat().st_size} bytes, shorter than "
                         f"its HDF5 superblock says")
    deadline = time.monotonic() + retry_seconds
    while True:
        try:
            with open_file(path) as fh:
                attrs = {k: _attr(k, v, decode) for k, v in fh.attrs.items()}
                groups = {g: _group(fh, g, path) for g in fh.keys()
                          if isinstance(fh.get(g, getlink=True), h5py.HardLink) and isinstance(fh[g], h5py.Group)}
            break
        except OSError as err:
            if time.monotonic() > deadline or not path.is_file():
                raise CdmpiError(f"cannot read metrics file {path}: {err}") from None
            time.sleep(0.05)
        except (ValueError, TypeError, KeyError, RecursionError) as err:  # attributes or JSON that are not cdmpi's
            raise CdmpiError(f"{path} is not a cdmpi metrics file: {type(err).__name__}: {err}") from None
    if "train" not in groups or "step" not in groups["train"]:
        raise CdmpiError(f"{path} is not a cdmpi metrics file (no /train/step)")
    for columns in groups.values():  # a row is whole once every column has it (a flush cut short by a crash)
        if "step" in columns:
            rows = min(len(values) for values in columns.values())
            for name in columns:
                columns[name] = columns[name][:rows]
    return {"attrs": attrs, **groups}
