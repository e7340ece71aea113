"""The engine's runs take the compiled kernels (cdmpi.wire) wherever d is at least NUMBA_MIN_D: star and
sharded, in process and under MPI. The kernels give the same bits as the torch path (test_compiled_kernels),
so only this test notices when a frame the engine hands over stops qualifying (e.g. a strided slice)."""

from __future__ import annotations

import json

import pytest

from cdmpi import metrics, wire
from cdmpi.timing import PHASES
from conftest import run_main, run_python, write_config

D = 2 * wire.NUMBA_MIN_D + 1001  # two sharded slices of at least NUMBA_MIN_D each
CONFIG = f"""
[run]
steps = 3
workers = 2
dtype = "float32"
log_every = 2
[problem]
name = "quadratic"
dim = {D}
[optim]
algorithm = "cdadam"
lr = 0.001
[checkpoint]
every = 0
"""

# Records every wire.compiled call (d, the tensors' dimensions, whether the kernels were given): run in
# this process by exec, and on every rank of an MPI job in PROBE, around the real `cdmpi train`.
SPY = """
calls = []
real = wire.compiled
def spy(d, *tensors):
    k = real(d, *tensors)
    calls.append([d, [t.dim() for t in tensors], k is not None])
    return k
"""
PROBE = "import json, sys\nfrom cdmpi import wire\n" + SPY + """
wire.compiled = spy
from cdmpi import cli
code = cli.main(sys.argv[2:])
from mpi4py import MPI
with open(f"{sys.argv[1]}.{MPI.COMM_WORLD.rank}", "w") as fh:
    json.dump(calls, fh)
sys.exit(code)
"""


def check(calls: list) -> None:
    large = [c for c in calls if c[0] >= wire.NUMBA_MIN_D]
    assert large, "no kernel call at d >= NUMBA_MIN_D"
    refused = [c for c in large if not c[2]]
    assert not refused, f"the torch path ran at d >= NUMBA_MIN_D for {refused[:3]}"


@pytest.mark.parametrize("topology", ["star", "sharded"])
def test_in_process_run_takes_the_compiled_kernels(tmp_path, monkeypatch, topology):
    spying = {"wire": wire}
    exec(SPY, spying)
    monkeypatch.setattr(wire, "compiled", spying["spy"])
    calls = spying["calls"]
    config = write_config(tmp_path / "q.toml", CONFIG)
    result = run_main(["train", config, "--backend", "local", "--set", f'comm.topology="{topology}"',
                       "--out", tmp_path / "run.h5", "--quiet"])
    assert result.returncode == 0, result.stderr
    check(calls)
    if topology == "star":  # the server's sum of the (n, frame) rows behind the control words
        assert any(dims == [2, 1] and ok for _, dims, ok in calls)


@pytest.mark.mpi
@pytest.mark.parametrize("topology", ["star", "sharded"])
def test_mpi_run_takes_the_compiled_kernels_on_every_rank(tmp_path, topology):
    config = write_config(tmp_path / "q.toml", CONFIG)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    result = run_python([probe, tmp_path / "calls", "train", config, "--set", f'comm.topology="{topology}"',
                         "--out", tmp_path / "run.h5", "--quiet"], ranks=3, timeout=240)
    assert result.returncode == 0, result.stderr
    per_rank = [json.loads((tmp_path / f"calls.{r}").read_text()) for r in range(3)]
    for rank in (1, 2):  # the workers encode and update
        check(per_rank[rank])
    if topology == "star":  # rank 0 aggregates the strided rows of its receive buffer
        check(per_rank[0])
        assert any(dims == [2, 1] and ok for _, dims, ok in per_rank[0])
    run = metrics.read(tmp_path / "run.h5")
    # Metric values travel apart from the frames: rows at steps 0, 2 and 3, each worker's share [f_i, g_i]
    # as f_i in float64 and g_i in the run's float32 (rows.Share: half of float64's bytes) plus a little
    # pickle framing; rank 0 receives what the workers send.
    comm = run["comm"]
    share = 8 + 4 * D
    inbound, outbound = comm["metrics_inbound_nbytes_per_logged_step"], comm["metrics_outbound_nbytes_per_logged_step"]
    assert list(run["train"]["step"]) == [0, 2, 3]
    assert 2 * share < inbound[0] < 2 * share + 2000 and list(inbound[1:]) == [0, 0]
    assert outbound[0] == 0 and outbound[1] + outbound[2] == inbound[0]
    # per-step medians of each phase and of the whole step, beside the means
    timing = run["timing"]
    for rank in range(2):
        total = sum(timing[f"worker_{p}"][rank] for p in PHASES) * 3
        assert 0 < timing["worker_step_median"][rank] <= total
