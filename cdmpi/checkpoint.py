"""Checkpoints: every process's part of the run state at a step boundary, written atomically.

One checkpoint is a directory ``step-<t>`` (t zero-padded to 9 digits) under the checkpoint root
(``RUN.ckpt/`` next to ``RUN.h5`` unless ``checkpoint.dir`` says otherwise):

    manifest.json    format_version, step, n_workers, world_size, backend, d, config, config_hash,
                     files {name: {nbytes, sha256}}, cdmpi_version, created
    server.pt        the server's state: its g_hat and g_tilde, the bit counters, the wall time
    worker-0003.pt   worker 3's state: x, m, v, v_hat, its g_hat_i, its copy of g_tilde, its sampler
    slice-0003.pt    sharded topology: the state of slice 3's server (its part of g_hat and g_tilde)

The state is taken at the top of iteration t, before the gradient at x_t is computed, so a resumed run
starts its loop at t and recomputes row t. Files hold dicts of tensors and numbers, written with
torch.save and read with torch.load(weights_only=True): nothing is unpickled. The roles, not the ranks,
name the files, so a checkpoint of an MPI run resumes in process and the other way round.

Writing is collective: every process writes its files into ``step-<t>.tmp/`` and reports their sizes and
sha256; the server writes the manifest and renames the directory. A directory named ``step-<t>`` is
therefore complete, and a crash while writing leaves the previous checkpoint as it was. Reading is
collective too: the server checks the manifest and the file sizes, and every process checks the sha256 of
the files it loads, so a resume hashes the state in parallel, each file once.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Protocol

import torch

from . import __version__, control
from .config import Config
from .errors import AgreedError, CdmpiError

FORMAT_VERSION = 2  # 2: worker files hold the driver state (sampler or user state) beside params and algorithm
STEP_DIR = re.compile(r"^step-(\d+)$")
# Keys a resumed run may change: they do not change the trajectory of x. run.workers is checked as the
# world size, with its own message.
MUTABLE_KEYS = ("run.steps", "run.threads", "run.flush_every", "run.log_every", "run.workers", "run.progress_every",
                "comm.wait", "comm.timeout")
MUTABLE_SECTIONS = ("checkpoint",)
MANIFEST_KEYS = ("format_version", "step", "n_workers", "world_size", "backend", "d", "config", "config_hash",
                 "files")
OWN_MODEL = "own_model"  # problem.name of the runs of cdmpi.api: a user's loop, which decides the steps


def root_for(cfg: Config, out: str | Path) -> Path:
    """Where this run's checkpoints live: checkpoint.dir, or RUN.ckpt/ next to the metrics file RUN.h5."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(out).with_suffix(".ckpt")


def fixed_config(cfg: Config | dict) -> dict:
    """The flattened config keys a resume must not change."""
    values = cfg.to_dict() if isinstance(cfg, Config) else cfg
    flat = {f"{section}.{key}": value for section, table in values.items() for key, value in table.items()}
    return {k: v for k, v in flat.items()
            if k not in MUTABLE_KEYS and k.split(".")[0] not in MUTABLE_SECTIONS}


def config_hash(cfg: Config | dict) -> str:
    return hashlib.sha256(json.dumps(fixed_config(cfg), sort_keys=True).encode()).hexdigest()[:16]


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:09d}"


def rows_step(manifest: dict) -> int:
    """The step from which the checkpoint's run had written no metrics rows yet: a resume keeps the rows
    before it."""
    return int(manifest.get("rows_step", manifest["step"]))


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under root, newest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


# ---- writing ------------------------------------------------------------------------------------------

class Run(Protocol):
    """What checkpoints need of a run (cdmpi.engine.Engine)."""

    cfg: Config
    transport: object
    d: int

    attrs: dict  # the run's record: run_id, data_path, data_sha256 go into the manifest

    def roles(self) -> dict[str, tuple[str, object]]: ...  # file name -> (role, its state_dict holder)
    def metrics_rows_before(self, step: int) -> int: ...  # train rows in the metrics file before `step`
    def metrics_digest_before(self, step: int) -> str | None: ...  # sha256 of those rows (metrics.rows_digest)
    def checksums(self) -> dict[int, int]: ...  # worker index -> checksum of its x, for this process's workers
    def flush_metrics(self) -> None: ...


def _write_file(path: Path, obj: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal: no half-written file is left behind
        tmp.unlink(missing_ok=True)
        raise
    return {"nbytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save(session: Run, step: int, root: Path, *, final: bool = False) -> Path | None:
    """Collective: write this process's files, then (on the server) check that every worker's copy of x is
    finite and the same, write the manifest and rename the directory. Returns the checkpoint directory on
    the server, None elsewhere; raises AgreedError on every process when the copies of x are bad (nothing
    is kept then), CdmpiError when a file cannot be written."""
    transport = session.transport
    tmp_dir = root / f"step-{step:09d}.tmp"
    report: dict = {"checksums": session.checksums(), "files": {}}
    try:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        for name, (role, runtime) in session.roles().items():
            report["files"][name] = _write_file(tmp_dir / name, {"role": role, "step": step,
                                                                  "state": runtime.state_dict()})
        session.flush_metrics()  # rows before `step` are on disk whenever the checkpoint is
    except (OSError, CdmpiError) as err:  # a full disk: the server removes the unfinished folder below
        report["error"] = f"rank {transport.rank}: {err}"
    reports = transport.collect(report)
    verdict = None
    if transport.is_server:
        checksums = dict(sorted((i, c) for r in reports for i, c in r["checksums"].items()))
        verdict = control.checksum_error(step, list(checksums.values()), lambda indices: ", ".join(
            f"worker {i} (rank {transport.worker_rank(i)})" for i in indices))
        if verdict is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            verdict = f"{verdict} (checked before writing checkpoint {step_dir(root, step)}, which was not kept)"
    verdict = transport.share(verdict)
    if verdict is not None:
        raise AgreedError(verdict)
    if not transport.is_server:
        return None
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # every rank has finished writing into it (collect)
        raise CdmpiError(f"cannot write checkpoint {tmp_dir}: {errors[0]}")
    files = {name: info for r in reports for name, info in r["files"].items()}
    cfg = session.cfg
    rows = min(step, session.rows_from)  # rows from here on come after the checkpoint (a loop's late row)
    manifest = {"format_version": FORMAT_VERSION, "step": step, "run_id": session.attrs.get("run_id"),
                "metrics_rows": session.metrics_rows_before(rows), "metrics_sha256": session.metrics_digest_before(rows),
                "rows_step": rows, "final": final,
                "git_commit": session.attrs.get("git_commit"), "data_path": session.attrs.get("data_path"),
                "data_sha256": session.attrs.get("data_sha256"), "n_workers": transport.n_workers,
                "world_size": transport.world_size, "backend": transport.name, "d": session.d,
                "config": cfg.to_dict(), "config_hash": config_hash(cfg), "files": dict(sorted(files.items())),
                "cdmpi_version": __version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    final = step_dir(root, step)
    try:
        _write_file_text(tmp_dir / "manifest.json", json.dumps(manifest, indent=1))
        if final.exists():  # a checkpoint of the same step from an earlier attempt; this one replaces it
            shutil.rmtree(final)
        os.replace(tmp_dir, final)
    except OSError as err:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise CdmpiError(f"cannot write checkpoint {final}: {err}") from None
    prune(root, session.cfg.checkpoint.keep)
    return final


def _write_file_text(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def prune(root: Path, keep: int) -> None:
    if keep > 0:
        for old in list_checkpoints(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)


def remove_after(root: Path, step: int) -> list[Path]:
    """A run resumed at `step` makes a new future: checkpoints of later steps (damaged ones that auto
    passed over, or an abandoned future) go, so that none outlives the new ones. Returns them."""
    later = [p for p in list_checkpoints(root) if int(STEP_DIR.match(p.name).group(1)) > step]
    for path in later:
        shutil.rmtree(path, ignore_errors=True)
    return later


def remove_all(root: Path) -> None:
    """A fresh run with --overwrite: the old run's checkpoints would otherwise be found by --resume auto."""
    for old in list_checkpoints(root):
        shutil.rmtree(old)
    for stale in root.glob("step-*.tmp") if root.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)


# ---- reading ------------------------------------------------------------------------------------------

def validate(path: Path, hash_files: bool = True) -> dict:
    """The manifest of a complete, undamaged checkpoint; CdmpiError naming the bad file otherwise.
    hash_files=False checks the manifest and every file's presence and size only (restore leaves the
    sha256 of each file to the rank that loads it)."""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        int(manifest["step"])
        missing = [k for k in MANIFEST_KEYS if k not in manifest]
        if missing:
            raise KeyError(", ".join(missing))
    except FileNotFoundError:
        raise CdmpiError(f"checkpoint {path} is incomplete: {manifest_path} not found") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CdmpiError(f"checkpoint manifest {manifest_path} is corrupt: {err}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CdmpiError(f"checkpoint {manifest_path} has format_version {manifest.get('format_version')!r}; "
                         f"this cdmpi reads {FORMAT_VERSION}")
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            raise CdmpiError(f"checkpoint file {file} is missing")
        size = file.stat().st_size
        if size != info["nbytes"]:
            raise CdmpiError(f"checkpoint file {file} is truncated or corrupt: {size} bytes, "
                             f"the manifest says {info['nbytes']}")
        if hash_files:
            _check_sha256(file, file.read_bytes(), info)
    return manifest


def _check_sha256(file: Path, data: bytes, info: dict) -> None:
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise CdmpiError(f"checkpoint file {file} is corrupt: its sha256 differs from the manifest's")


def check_compatible(path: Path, manifest: dict, cfg: Config, n_workers: int, world_size: int, d: int,
                     data_sha256: str | None = None) -> None:
    """CdmpiError naming what differs between the checkpoint's run and this one."""
    if manifest["n_workers"] != n_workers:
        raise CdmpiError(f"checkpoint {path} was written by a run with {manifest['n_workers']} workers "
                         f"(world size {manifest['world_size']}, {manifest['backend']} backend); this run has "
                         f"{n_workers} workers (world size {world_size}): launch with "
                         f"mpiexec -n {manifest['n_workers'] + 1} or --backend local --workers "
                         f"{manifest['n_workers']}")
    if manifest["d"] != d:
        raise CdmpiError(f"checkpoint {path} has dimension d = {manifest['d']}; this run's problem has "
                         f"d = {d}")
    if manifest["config_hash"] != config_hash(cfg):
        then, now = fixed_config(manifest["config"]), fixed_config(cfg)
        changed = [f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(then) | set(now))
                   if then.get(k) != now.get(k)]
        raise CdmpiError(f"checkpoint {path} was written with a different config ({'; '.join(changed)}); "
                         f"only {', '.join(MUTABLE_KEYS)} and [checkpoint] may change on resume")
    then = manifest.get("data_sha256")
    if then and data_sha256 and then != data_sha256:
        raise CdmpiError(f"the data file {manifest.get('data_path') or cfg.data.dataset} changed since checkpoint {path} "
                         f"was written (sha256 {then[:12]}... then, {data_sha256[:12]}... now); a resume must read "
                         f"the same data")
    if cfg.problem.name != OWN_MODEL and manifest["step"] > cfg.run.steps:  # a user's loop sets no run.steps
        raise CdmpiError(f"checkpoint {path} is at step {manifest['step']}, past run.steps = {cfg.run.steps}")


def _candidates(spec: str, root: Path, warn=None) -> tuple[list[tuple[Path, dict]], bool]:
    """The checkpoints restore may try, newest first, each complete with every file at its size, and whether
    the choice is strict (spec names one step-* directory: it must be usable; otherwise an unusable one is
    skipped with a warning, as for auto)."""
    path = Path(spec) if spec != "auto" else root
    if spec != "auto" and STEP_DIR.match(path.name):
        if not path.is_dir():
            raise CdmpiError(f"checkpoint {path} not found")
        return [(path, validate(path, hash_files=False))], True
    found = []
    candidates = list_checkpoints(path)
    for candidate in candidates:
        try:
            found.append((candidate, validate(candidate, hash_files=False)))
        except CdmpiError as err:
            if warn is not None:
                warn(f"{err}; trying an older checkpoint")
    if not found and spec != "auto":
        what = "no valid checkpoint" if candidates else "no checkpoint (step-* directory)"
        raise CdmpiError(f"--resume {spec}: {what} found in {path}")
    return found, False


def _read_own(session, path: Path, manifest: dict) -> tuple[dict, str | None]:
    """This process's files of one checkpoint, each checked against its sha256 and unpickled (not yet
    applied): ({name: state}, None), or ({}, what is wrong). Never raises: the ranks must all reach the
    collective that follows."""
    states = {}
    step = int(manifest["step"])
    try:
        for name, (role, _) in session.roles().items():
            file = path / name
            info = manifest["files"].get(name)
            if info is None:
                return {}, f"checkpoint {path} has no {name} (its manifest lists {', '.join(manifest['files'])})"
            data = file.read_bytes()
            _check_sha256(file, data, info)
            try:
                loaded = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
                return {}, f"checkpoint file {file} is unreadable: {type(err).__name__}: {err}"
            if not isinstance(loaded, dict) or loaded.get("role") != role or loaded.get("step") != step:
                return {}, f"checkpoint file {file} does not hold the {role} state of step {step}"
            states[name] = loaded["state"]
    except CdmpiError as err:
        return {}, str(err)
    except Exception as err:  # noqa: BLE001
        return {}, f"checkpoint {path}: {type(err).__name__}: {err}"
    return states, None


def restore(session, spec: str, root: Path, warn=None) -> dict | None:
    """Collective: the server lists the checkpoints to try (manifests and file sizes), then for each, newest
    first, every process checks the sha256 of its own files and reads them, in parallel; the first
    checkpoint that every process could read is applied. Returns its manifest (its "step" is where the run
    goes on), or None when `auto` found no usable checkpoint (a fresh start)."""
    transport = session.transport
    plan = None
    if transport.is_server:
        try:
            found, strict = _candidates(spec, root, warn)
            plan = ("ok", ([(str(p), m) for p, m in found], strict))
        except Exception as err:  # every rank must get an answer, whatever failed
            plan = ("error", _message(err))
    status, value = transport.share(plan)
    if status == "error":
        raise CdmpiError(value if transport.is_server else "see the server's error")
    found, strict = value
    unfit: list[str] = []  # why newer checkpoints did not fit this run
    for path_text, manifest in found:
        path = Path(path_text)
        verdict = None
        if transport.is_server:
            try:
                check_compatible(path, manifest, session.cfg, transport.n_workers, transport.world_size, session.d,
                                 session.attrs.get("data_sha256"))
                verdict = "ok"
            except Exception as err:
                verdict = _message(err)
        verdict = transport.share(verdict)
        if verdict != "ok":
            if strict:
                raise CdmpiError(verdict if transport.is_server else "see the server's error")
            unfit.append(verdict)  # auto: another run's checkpoint, or this one's under another config
            continue
        states, error = _read_own(session, path, manifest)
        errors = transport.collect(error)
        decision = None
        if transport.is_server:
            bad = next((e for e in errors if e is not None), None)
            decision = "use" if bad is None else ("error", bad) if strict else "next"
            if decision == "next" and warn is not None:
                warn(f"{bad}; trying an older checkpoint")
        decision = transport.share(decision)
        if decision == "next":
            continue
        if decision != "use":
            raise CdmpiError(decision[1] if transport.is_server else "see the server's error")
        if unfit and warn is not None and transport.is_server:
            for why in unfit:
                warn(f"skipped a newer checkpoint: {why}")
        for name, (role, runtime) in session.roles().items():
            try:
                runtime.load_state_dict(states[name])
            except (KeyError, RuntimeError, TypeError, ValueError) as err:
                raise CdmpiError(f"checkpoint file {path / name} does not fit this run: "
                                 f"{type(err).__name__}: {err}") from None
        return manifest
    if spec != "auto":
        raise CdmpiError(f"--resume {spec}: no valid checkpoint found in {Path(spec)}" if transport.is_server
                         else "see the server's error")
    if unfit:  # none fits: the newest one's reason is the answer
        raise CdmpiError(unfit[0] if transport.is_server else "see the server's error")
    return None


def _message(err: Exception) -> str:
    return str(err) if isinstance(err, CdmpiError) else f"{type(err).__name__}: {err}"
