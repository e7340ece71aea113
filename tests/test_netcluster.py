"""bench/netcluster.sh: its usage and refusals everywhere; where the machine allows it (root, ip, tc, network
namespaces, veth, bridge, tbf), a 3-node emulated cluster at 1gbit: its own throughput check, a cdmpi run
with one rank per node, and nothing left after `down`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from conftest import REPO, mpiexec_path, scaled, subprocess_env

SCRIPT = REPO / "bench" / "netcluster.sh"
STATE = Path("/run/cdmpi-netcluster.env")
MARK = "# cdmpi-netcluster"


def netcluster(*args, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = ["bash", str(SCRIPT), *map(str, args)]
    timeout = scaled(timeout)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env=env or subprocess_env())
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\nstdout: {err.stdout}\nstderr: {err.stderr}")


def test_help_names_every_command():
    result = netcluster("--help")
    assert result.returncode == 0, result.stderr
    for command in ("up --nodes N --rate RATE", "down", "status", "mpiexec", "check", "wrapper"):
        assert command in result.stdout


@pytest.mark.parametrize("rate", ["bogus", "10gbits", "1.5", "-1gbit"])
def test_a_malformed_rate_is_refused_before_anything_is_touched(rate):
    # Parsed before the root check, so this is the answer as any user.
    result = netcluster("up", "--nodes", "3", "--rate", rate)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"'{rate}'" in lines[0] and "rate" in lines[0], result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("nodes", ["0", "251", "three"])
def test_a_node_count_out_of_range_is_refused(nodes):
    result = netcluster("up", "--nodes", nodes, "--rate", "1gbit")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and f"'{nodes}'" in result.stderr


def leftovers() -> list[str]:
    """What of an emulated cluster this machine still has: namespaces n<i>, links cdmpi-*, /etc/hosts lines."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    found += [f"namespace {name}" for name in netns if name[:1] == "n" and name[1:].isdigit()]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout.splitlines()
    found += [f"link {line.split(': ')[1]}" for line in links if ": cdmpi-" in line]
    found += [f"/etc/hosts: {line}" for line in Path("/etc/hosts").read_text().splitlines() if line.endswith(MARK)]
    if STATE.exists():
        found.append(str(STATE))
    return found


@pytest.fixture
def machine():
    """A skip where this machine cannot make an emulated cluster, or has one up already; takes down
    whatever the test made, and checks that nothing is left."""
    if os.geteuid() != 0:
        pytest.skip("bench/netcluster.sh needs root (network namespaces, links, qdiscs, /etc/hosts)")
    probe = netcluster("probe")
    if probe.returncode != 0:
        pytest.skip(f"no emulated cluster here: {probe.stderr.strip()}")
    if netcluster("status").returncode == 0 or STATE.exists():
        pytest.skip("an emulated cluster is already up (bench/netcluster.sh status): this test leaves it alone")
    try:
        yield
    finally:
        down = netcluster("down")
        assert down.returncode == 0, down.stderr
    assert leftovers() == []


@pytest.fixture
def cluster(machine):
    """A 3-node cluster at 1gbit."""
    if mpiexec_path() is None:
        pytest.skip("no mpiexec (install the mpich extra)")
    up = netcluster("up", "--nodes", 3, "--rate", "1gbit")
    assert up.returncode == 0, up.stderr


@pytest.mark.mpi
def test_three_nodes_at_1gbit_carry_a_cdmpi_run(cluster, tmp_path):
    env = subprocess_env(PYTHON=sys.executable, MPIEXEC=mpiexec_path())
    status = netcluster("status", env=env)
    assert status.returncode == 0 and "nodes: 3" in status.stdout and "rate: 1gbit" in status.stdout

    check = netcluster("check", "--repeats", 5, timeout=120, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "within 10%" in check.stdout

    out = tmp_path / "nc.h5"
    train = netcluster("mpiexec", "--", sys.executable, "-m", "cdmpi", "train", "bench/quadratic.toml",
                       "--set", "run.steps=3", "--set", "problem.dim=100000", "--out", out, "--overwrite", "--quiet",
                       timeout=300, env=env)
    assert train.returncode == 0, train.stdout + train.stderr
    with h5py.File(out, "r") as f:
        hosts = json.loads(f.attrs["hosts"])
    assert hosts == ["n1", "n2", "n3"]  # rank i on node n(i+1), each its own host

    again = netcluster("up", "--nodes", 2, "--rate", "100mbit")  # up on a running cluster: exactly the new one
    assert again.returncode == 0, again.stderr
    found = leftovers()
    assert sorted(x.split("@")[0] for x in found) == sorted([
        "namespace n1", "namespace n2", "link cdmpi-br0", "link cdmpi-v1", "link cdmpi-v2",
        f"/etc/hosts: 10.77.0.1 n1 {MARK}", f"/etc/hosts: 10.77.0.2 n2 {MARK}", str(STATE)])
    assert "rate: 100mbit" in netcluster("status").stdout


@pytest.mark.mpi  # root and network namespaces, like the MPI test above; out of `make test-fast`
def test_down_twice_and_failed_ups_leave_nothing(machine):
    assert netcluster("down").returncode == 0
    assert netcluster("down").returncode == 0  # nothing up: nothing to do
    assert leftovers() == []

    refused = netcluster("up", "--nodes", 3, "--rate", "99999999999tbit")  # tc does not take it
    assert refused.returncode == 2 and "99999999999tbit" in refused.stderr
    assert leftovers() == []

    # A failure half-way (the wrapper cannot be written: a directory holds its path) removes what up built.
    blocker = Path("/run/cdmpi-netcluster-rsh")
    blocker.mkdir()
    try:
        failed = netcluster("up", "--nodes", 3, "--rate", "1gbit")
    finally:
        blocker.rmdir()
    assert failed.returncode == 1 and "removing what it built" in failed.stderr
    assert leftovers() == []
    assert netcluster("status").returncode == 1
