"""What every way of running shares (`cdmpi train` and `cdmpi.api.launch`): SIGTERM handling, set-up phases
that every rank agrees on, resume-or-start, and the exit status of a run.

Exit statuses: 0 done; 1 failed during training (every rank ends); 2 bad input (nothing trained);
75 stopped by SIGTERM with a checkpoint (resume to continue).
"""

from __future__ import annotations

import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__, checkpoint
from .lock import run_locks, slurm_job
from .errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_STOPPED, AgreedError, CdmpiError, RunStopped, SetupFailed


def describe(err: BaseException) -> str:
    return str(err) if isinstance(err, CdmpiError) else f"{type(err).__name__}: {err}"


def agreed(phase: Callable[[], None], transport, rank: int) -> bool:
    """Run one set-up phase on every rank; if it failed anywhere, rank 0 prints the first error and every
    rank returns False together (no rank is left waiting in a collective). transport None: this process
    alone (the in-process transport could not be made)."""
    error = None
    try:
        phase()
    except Exception as err:  # noqa: BLE001 - every failure must reach the agreement
        error = describe(err)
        if not isinstance(err, CdmpiError):
            traceback.print_exc()
    agreement = transport.agree(error) if transport is not None else ((0, error) if error else None)
    if agreement:
        failed_rank, message = agreement
        if rank == 0:
            where = f" (rank {failed_rank})" if failed_rank else ""
            print(f"cdmpi: error{where}: {message}", file=sys.stderr)
        return False
    return True


def on_server(transport, work: Callable[[], None]) -> None:
    """Server-only work inside a collective phase: its error, if any, is raised on every rank."""
    error = None
    if transport.is_server:
        try:
            work()
        except CdmpiError as err:
            error = str(err)
        except OSError as err:  # a file the server could not make: the workers must not wait for it
            where = f" {err.filename}" if err.filename else ""
            error = f"cannot write{where}: {err.strerror or err}"
        except Exception as err:  # noqa: BLE001 - every rank must leave this phase together
            traceback.print_exc()
            error = describe(err)
    error = transport.share(error)
    if error is not None:
        raise CdmpiError(error)


def start(engine, out: str | Path | None, *, resume: str | None = None, overwrite: bool = False, warn=None,
          checkpoints: bool = True) -> int | None:
    """Collective: lock the run's output, resume from a checkpoint of this run (`resume` auto or a path) or
    start afresh, then open the metrics file. The lock comes before anything is deleted or truncated; a
    fresh start refuses to run over an earlier run's checkpoints unless `overwrite`, which deletes them.
    checkpoints=False: a run without any (sweeps). Returns the step resumed from, or None."""
    transport = engine.transport
    root = None
    if checkpoints and (out is not None or engine.cfg.checkpoint.dir):
        root = checkpoint.root_for(engine.cfg, out)
    if resume and root is None:
        raise CdmpiError("resume needs a run with checkpoints: give it an output file (or checkpoint.dir)")
    engine.agree_paths()
    locks = run_locks(out, root)
    if locks is not None:
        on_server(transport, locks.acquire)
        engine.lock = locks if transport.is_server else None
    try:
        engine.checkpoint_root = root
        manifest = engine.resume(resume, root, warn=warn) if resume else None
        step = int(manifest["step"]) if manifest is not None else None
        if transport.is_server:
            _continue_or_start(engine, out, root, manifest, resume, overwrite, warn)
    except BaseException:
        if engine.lock is not None:
            engine.lock.release()
        raise
    return step


def _continue_or_start(engine, out, root, manifest, resume, overwrite, warn) -> None:
    """The server's part of start after the collective restore: the metrics file must continue the
    checkpoint's run; later checkpoints go; or a fresh start clears an earlier run's checkpoints."""
    if manifest is not None:
        step = int(manifest["step"])
        if manifest.get("final") and resume == "auto":  # nothing is touched: the finished run stays as it is
            raise CdmpiError(f"{out or root} holds a finished run ({step} steps; its last checkpoint is the end of "
                             f"the run): resume='auto' has nothing to continue. Pass overwrite=True (without resume) "
                             f"to train again, or resume='{checkpoint.step_dir(root, step)}' to train on from its end")
        made_by = (manifest.get("cdmpi_version"), manifest.get("git_commit"))
        if "git_commit" not in engine.attrs:
            from .engine import provenance

            engine.attrs.update(provenance())
        running = (__version__, engine.attrs.get("git_commit"))
        if made_by != running and warn is not None and (made_by[1] or made_by[0] != running[0]):
            warn(f"the checkpoint of step {step} was written by cdmpi {made_by[0]} ({made_by[1] or 'commit unknown'}) "
                 f"and this is cdmpi {running[0]} ({running[1] or 'commit unknown'}): the resumed run may not "
                 f"give the bits the uninterrupted run would have")
        engine.attrs["run_id"] = manifest.get("run_id") or uuid.uuid4().hex
        if out is not None:
            _check_continues(Path(out), manifest)
        for later in checkpoint.remove_after(root, step):
            if warn is not None:
                warn(f"removed {later}: the run goes on from step {step}, so no later checkpoint may outlive "
                     f"the new ones")
    else:
        step = None
        engine.attrs["run_id"] = uuid.uuid4().hex
        if resume == "auto" and not overwrite and out is not None and _same_job_wrote(Path(out)):
            overwrite = True  # a SLURM job requeued before its first checkpoint: start over, as it would have
            if warn is not None:
                warn(f"no checkpoint yet: this job ({slurm_job()}) starts {out} over from step 0")
        if root is not None and checkpoint.list_checkpoints(root):
            if resume and not overwrite:
                raise CdmpiError(f"no checkpoint in {root} could be resumed (each is named above); pass "
                                 f"--overwrite to start over without them")
            if not overwrite:
                raise CdmpiError(f"checkpoints of an earlier run exist in {root}; pass --resume auto "
                                 f"to continue it or --overwrite to start over (cdmpi.launch: resume='auto' "
                                 f"or overwrite=True)")
            checkpoint.remove_all(root)
    if out is not None:
        engine.open_metrics(out, overwrite=overwrite, resume_step=step,
                            rows_step=None if manifest is None else checkpoint.rows_step(manifest))


def _same_job_wrote(out: Path) -> bool:
    """Whether the metrics file at `out` was written by this very SLURM job (a requeue runs the same job
    id), so that starting it over loses nothing of anyone else's."""
    from . import metrics

    job = slurm_job()
    if not job or not out.is_file():
        return False
    try:
        writer = metrics.read(out)["attrs"].get("writer") or {}
    except CdmpiError:
        return False
    return isinstance(writer, dict) and writer.get("job") == job


def _check_continues(out: Path, manifest: dict) -> None:
    """The metrics file must hold the checkpoint's run's rows: the same run id, and every row before the
    checkpoint's step that was on disk when the checkpoint was written."""
    from . import metrics

    if not out.is_file():
        raise CdmpiError(f"cannot resume: metrics file {out} not found, and the checkpoint's run continues its "
                         f"rows; restore the file, or pass --overwrite to start over from step 0")
    run = metrics.read(out)
    ours, theirs = manifest.get("run_id"), run["attrs"].get("run_id")
    if ours and theirs != ours:
        raise CdmpiError(f"metrics file {out} holds the rows of another run (run id {theirs}; the checkpoint of "
                         f"step {manifest['step']} belongs to run {ours}); resume with that run's --out")
    rows = checkpoint.rows_step(manifest)
    have = int(np.searchsorted(run["train"]["step"], rows, side="left"))
    want = manifest.get("metrics_rows")
    if want is not None and have != want:
        raise CdmpiError(f"metrics file {out} has {have} rows before step {rows}, but the checkpoint's "
                         f"run had written {want}: it is not the file this checkpoint continues")
    digest = manifest.get("metrics_sha256")
    if digest and metrics.rows_digest({g: v for g, v in run.items() if g != "attrs"}, rows) != digest:
        raise CdmpiError(f"metrics file {out}: its rows before step {rows} are not the ones the "
                         f"checkpoint's run wrote (changed or damaged since); a resume would carry them on. "
                         f"Restore the file, or start over with --overwrite")


def finish(body: Callable[[], object], transport, rank: int) -> tuple[int, object]:
    """Run the training body on this rank; map how it ended to an exit status: (status, its result)."""
    try:
        return 0, body()
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - one failing rank must end them all
        return exit_status(err, transport, rank), None
    finally:
        transport.close()


ABORT_GRACE_S = 0.5  # under load, a line printed just before MPI_Abort was lost with the killed ranks


def exit_status(err: BaseException, transport, rank: int) -> int:
    """The exit status of a run that ended with `err`, said on stderr. An agreed error or stop is reported by
    rank 0 alone; any other exception by the rank it happened on, which then aborts the communicator, so that
    no MPI job hangs on one failure."""
    if isinstance(err, SetupFailed):  # rank 0 has said why
        return EXIT_BAD_INPUT
    if isinstance(err, RunStopped):
        if rank == 0:
            print(f"cdmpi: {err}; continue with --resume auto (cdmpi.launch: resume='auto')", file=sys.stderr)
        return EXIT_STOPPED
    if isinstance(err, AgreedError):  # every rank raised it at the same step: no abort needed
        if rank == 0:
            print(f"cdmpi: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"cdmpi: error on rank {rank}: {describe(err)}", file=sys.stderr)
    if not isinstance(err, CdmpiError):
        traceback.print_exception(err)
    if transport is not None:
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)  # the launcher forwards this rank's output before the abort tears it down
        transport.abort(EXIT_FAILURE)
    return EXIT_FAILURE


__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILURE", "EXIT_STOPPED", "agreed", "exit_status", "finish", "start"]
