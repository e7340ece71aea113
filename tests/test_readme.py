"""The README's quick start runs exactly as typed, after its one set-up command, on a machine with no data
folder and no network: every ```bash block of README.md, in order, in one shell."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import REPO, scaled, subprocess_env


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.mpi
@pytest.mark.slow
def test_the_readme_quick_start_runs_as_typed(tmp_path):
    commands = readme_commands()
    assert commands[0] == "make install && source .venv/bin/activate"  # the one set-up command comes first
    assert len(commands) >= 5
    env = subprocess_env(CDMPI_CACHE_DIR=tmp_path / "cache", CDMPI_OFFLINE=1, MPLBACKEND="Agg")
    for name in ("CDMPI_DATA_DIR", "PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    (REPO / "runs" / "quick.png").unlink(missing_ok=True)  # made again below, or the test fails
    script = "set -euo pipefail\n" + "\n".join(commands) + "\n"
    r = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=scaled(900))
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "mushrooms" in r.stdout and (REPO / "runs" / "quick.png").is_file()
