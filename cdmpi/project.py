"""Projected step time on other networks, from a run's measured phase times and bytes.

Model (star topology, as cdmpi runs it: the server on rank 0, every rank on its own link of bandwidth B
and one-way latency L). Rank 0's link carries every frame, so it is the bottleneck:

    step = compute + encode + (L + up_bytes / B) + aggregate + (L + down_bytes / B) + update

with compute, encode and update the workers' mean measured seconds per step, aggregate the server's,
up_bytes the n upload messages and down_bytes the n copies of the download message per step (the frames
the run counted in its bits, and each message's 40-byte control word). The measured communication time is dropped:
the link is what is projected. In the table, link_bytes is the bytes per step through the busiest link
and optimizer ms is encode + aggregate + update (update alone for the Allreduce). For comparison, uncompressed AMSGrad with a ring Allreduce of the fp32
gradient over the n workers, with the same compute and update times:

    step = compute + 2 (n - 1) L + 2 (n - 1) / n * 4 d / B + update

Sharded topology (comm.topology = "sharded": worker s serves slice s; Alltoallv, then Allgatherv). Every
worker's link carries (n - 1) slices in and (n - 1) slices out of each frame, and each collective is
n - 1 pairwise messages, so

    step = compute + encode + ((n - 1) L + up_in / B) + aggregate + ((n - 1) L + down_in / B) + update

with aggregate the workers' mean slice work, and up_in + down_in the frame bytes the busiest worker
receives per step (measured, comm/inbound_nbytes_per_step; else (n - 1) / n of one up and one down frame).

Metric values (loss and gradient-norm shares of logged steps, gathered to rank 0) cross rank 0's link too:
both models add metrics_bytes / B per step, the bytes rank 0 received per logged step
(comm/metrics_inbound_nbytes_per_logged_step) times the fraction of steps that logged a row. The table
shows them apart (metrics bytes/step), so what a run's logging costs on a slow link is visible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import analysis, metrics
from .control import HEADER_NBYTES
from .errors import CdmpiError


def parse_list(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CdmpiError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise CdmpiError(f"{what} must be positive numbers, got {text!r}")
    return values


def measured(path: str | Path, medians: bool = False) -> dict:
    """Seconds per step of each phase and bytes per step of a metrics file with timing/. medians: each
    phase's median over the steps (timing/*_median) and no metric bytes: the typical step, which logs no
    row; otherwise the means over the run, logged rows and one-off first-step costs included."""
    run = metrics.read(path)
    timing = run.get("timing")
    if medians:
        if "worker_compute_median" not in (timing or {}):
            raise CdmpiError(f"{path} has no timing/*_median (made by an older cdmpi): project it without --medians")
        timing = {key[: -len("_median")]: value for key, value in timing.items() if key.endswith("_median")}
    if not timing:
        raise CdmpiError(f"{path} has no timing/ group: it is not the metrics file of a whole run")
    train, attrs = run["train"], run["attrs"]
    steps = int(train["step"][-1])
    if steps <= 0:
        raise CdmpiError(f"{path} recorded no optimizer steps")
    sharded = attrs.get("topology", "star") == "sharded"
    n = int(attrs["n_workers"])
    # star: rank 0 aggregates; sharded: every worker aggregates its slice, inside its own timing
    aggregate = float(np.mean(timing["worker_aggregate"]) if sharded else timing["server_aggregate"][0])
    up_bytes, down_bytes = float(train["bits_up"][-1]) / 8 / steps, float(train["bits_down"][-1]) / 8 / steps
    if sharded:  # the busiest worker's inbound frame bytes, as the run measured them where it could
        inbound = run.get("comm", {}).get("inbound_nbytes_per_step")
        link_bytes = float(np.max(inbound)) if inbound is not None else (n - 1) / n * (up_bytes + down_bytes) / n
    else:  # the frames and each message's control word
        link_bytes = up_bytes + down_bytes + 2 * n * HEADER_NBYTES
    per_logged = run.get("comm", {}).get("metrics_inbound_nbytes_per_logged_step")
    logged = len(train["step"]) + len(run.get("eval", {}).get("step", ()))
    metrics_bytes = float(per_logged[0]) * min(logged, steps) / steps if per_logged is not None and not medians else 0.0
    return {"path": str(path), "algorithm": attrs["algorithm"], "compressor": attrs["compressor"],
            "topology": "sharded" if sharded else "star",
            "n_workers": n, "dim": int(attrs["dim"]), "backend": attrs["backend"],
            "compute": float(np.mean(timing["worker_compute"])), "encode": float(np.mean(timing["worker_encode"])),
            "aggregate": aggregate, "update": float(np.mean(timing["worker_update"])),
            # the workers' wait in Gather and Bcast less the server's aggregate, which they wait through;
            # a time is never negative (in process, nothing is waited for and the difference is noise)
            "communicate": max(0.0, float(np.mean(timing["worker_gather"]) + np.mean(timing["worker_broadcast"])
                                          - (0.0 if sharded else aggregate))),
            "up_bytes": up_bytes, "down_bytes": down_bytes, "link_bytes": link_bytes, "metrics_bytes": metrics_bytes}


def star_step(m: dict, gbit_per_s: float, latency: float) -> float:
    """Also the sharded model: there the latency counts (n - 1) messages per collective."""
    bytes_per_s = gbit_per_s * 1e9 / 8
    messages = m["n_workers"] - 1 if m.get("topology") == "sharded" else 1
    return (m["compute"] + m["encode"] + m["aggregate"] + m["update"] + 2 * messages * latency
            + (m["link_bytes"] + m.get("metrics_bytes", 0.0)) / bytes_per_s)


def ring_allreduce_step(m: dict, gbit_per_s: float, latency: float) -> float:
    n, bytes_per_s = m["n_workers"], gbit_per_s * 1e9 / 8
    return (m["compute"] + m["update"] + 2 * (n - 1) * latency
            + (2 * (n - 1) / n * 4 * m["dim"] + m.get("metrics_bytes", 0.0)) / bytes_per_s)


def rows(paths, bandwidths: list[float], latency: float, medians: bool = False) -> list[dict]:
    """Two rows per file: the star model of the measured run, and the ring-Allreduce comparison."""
    out = []
    for path in paths:
        m = measured(path, medians)
        ring_bytes = 2 * (m["n_workers"] - 1) / m["n_workers"] * 4 * m["dim"]
        out.append({**m, "run": f"{Path(path).name}", "model": f"{m['topology']} (as measured)",
                    "compute ms": 1e3 * m["compute"],
                    "optimizer ms": 1e3 * (m["encode"] + m["aggregate"] + m["update"]),
                    **{f"{b:g} Gbit/s ms": 1e3 * star_step(m, b, latency) for b in bandwidths}})
        out.append({**m, "run": f"{Path(path).name}", "model": "fp32 ring Allreduce", "link_bytes": ring_bytes,
                    "compute ms": 1e3 * m["compute"], "optimizer ms": 1e3 * m["update"],
                    **{f"{b:g} Gbit/s ms": 1e3 * ring_allreduce_step(m, b, latency) for b in bandwidths}})
    return out


def format_table(table_rows: list[dict], bandwidths: list[float]) -> str:
    columns = [("run", "{}"), ("algorithm", "{}"), ("model", "{}"), ("n_workers", "{}"), ("dim", "{}"),
               ("link_bytes", "{:,.0f}"), ("metrics_bytes", "{:,.0f}"), ("compute ms", "{:.3f}"),
               ("optimizer ms", "{:.3f}")] + \
              [(f"{b:g} Gbit/s ms", "{:.3f}") for b in bandwidths]
    return analysis.format_table(table_rows, columns)
