"""cdmpi sweep / report --best --target / plot, through the command line."""

import json

import h5py
import numpy as np
import pytest

from cdmpi import metrics, sweep
from cdmpi.errors import CdmpiError

from conftest import REPO, run_cdmpi as _run_cdmpi, run_main


def run_cdmpi(args, **kw):
    kw.setdefault("timeout", 300)  # a sweep runs several jobs; the timeout only catches hangs
    return _run_cdmpi(args, **kw)

SWEEP = ["--grid", "optim.lr=0.004:0.013:0.008", "--algorithms", "cdadam,amsgrad:identity",
         "--set", "run.steps=15", "--workers", 2]


def test_grid_values_are_exact():
    assert sweep.parse_grid("optim.lr=0.001:0.011:0.002") == ("optim.lr", [0.001, 0.003, 0.005, 0.007, 0.009])
    assert sweep.parse_grid("run.steps=10:31:10") == ("run.steps", [10, 20, 30])
    assert sweep.parse_grid('compress.name=topk,"randk"') == ("compress.name", ["topk", "randk"])
    with pytest.raises(CdmpiError, match="start:stop:step"):
        sweep.parse_grid("optim.lr=a:b:c")


def test_sweep_resumes_and_refuses_a_changed_config(tmp_path, small_config):
    out = tmp_path / "sweep"
    r = run_main(["sweep", small_config, *SWEEP, "--out-dir", out])
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in out.glob("*.h5"))
    assert files == ["small_amsgrad-identity_lr=0.004.h5", "small_amsgrad-identity_lr=0.012.h5",
                     "small_cdadam_lr=0.004.h5", "small_cdadam_lr=0.012.h5"]
    # An interrupted run leaves only its file in .partial/, which report DIR does not see: the restart runs
    # just that one.
    victim = out / "small_cdadam_lr=0.012.h5"
    before = h5py.File(victim, "r")["train"]["grad_norm_sq"][()]
    victim.rename(out / ".partial" / victim.name)
    r = run_main(["report", out])
    assert r.returncode == 0 and "cdadam_lr=0.012" not in r.stdout and "cdadam_lr=0.004" in r.stdout, r.stderr
    r = run_main(["sweep", small_config, *SWEEP, "--out-dir", out])
    assert r.returncode == 0, r.stderr
    assert "4 runs, 3 already finished, 1 to run" in r.stdout
    np.testing.assert_array_equal(h5py.File(victim, "r")["train"]["grad_norm_sq"][()], before)
    assert not list((out / ".partial").iterdir())
    r = run_main(["sweep", small_config, *SWEEP, "--out-dir", out, "--set", "run.steps=16"])
    assert r.returncode == 2 and "exists from a different config" in r.stderr


def test_sweep_rejects_nonsense_pairs(tmp_path, small_config):
    r = run_main(["sweep", small_config, "--algorithms", "amsgrad:scaled_sign", "--out-dir", tmp_path])
    assert r.returncode == 2
    assert "algorithm 'amsgrad' does not work with compressor 'scaled_sign'" in r.stderr
    r = run_main(["sweep", small_config, "--algorithms", "adamw", "--out-dir", tmp_path])
    assert r.returncode == 2 and "unknown algorithm 'adamw'" in r.stderr


def _final(path):
    with h5py.File(path, "r") as fh:
        return fh["train"]["grad_norm_sq"][-1], json.loads(fh.attrs["config"])["optim"]["lr"]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """One small sweep that the report and plot tests only read."""
    from conftest import SMALL_CONFIG, write_config

    root = tmp_path_factory.mktemp("finished")
    config = write_config(root / "small.toml", SMALL_CONFIG)
    r = run_main(["sweep", config, *SWEEP, "--out-dir", root / "sweep"])
    assert r.returncode == 0, r.stderr
    return root / "sweep"


def test_report_best_and_target_match_the_files(finished_sweep):
    out = finished_sweep
    target = 0.15
    r = run_main(["report", out, "--best", "--target", f"grad_norm_sq={target}", "--json"])
    assert r.returncode == 0, r.stderr
    rows = {row["algorithm"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"cdadam", "amsgrad"}
    for name, row in rows.items():
        finals = {lr: g for g, lr in (_final(p) for p in out.glob(f"small_{name}*.h5"))}
        assert row["lr"] == min(finals, key=finals.get)  # the lowest final grad_norm_sq
        with h5py.File(row["file"], "r") as fh:
            g = fh["train"]["grad_norm_sq"][()]
            bits = fh["train"]["bits_up"][()] + fh["train"]["bits_down"][()]
        first = next((i for i, value in enumerate(g) if value <= target), None)
        assert first is not None  # the target is loose enough for both
        assert row["steps_to_target"] == first and row["bits_to_target"] == bits[first]
    r = run_main(["report", out, "--target", "accuracy=1"])
    assert r.returncode == 2 and "no column 'accuracy'" in r.stderr


def test_plot_writes_a_png(tmp_path, finished_sweep):
    out = finished_sweep
    png = tmp_path / "fig.png"
    r = run_main(["plot", out, "--x", "bits", "step", "--y", "loss", "--best", "--out", png])
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    r = run_main(["plot", out, "--y", "nope", "--out", png])
    assert r.returncode == 2 and "no column 'nope'" in r.stderr


def test_best_warns_when_the_runs_it_compares_differ(tmp_path, finished_sweep):
    for path in finished_sweep.glob("*.h5"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    r = run_main(["report", tmp_path, "--best"])
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    longer = tmp_path / "longer.h5"  # a cdadam run on the same data, 20 steps where the sweep ran 15
    r = run_main(["train", finished_sweep.parent / "small.toml", "--backend", "local", "--workers", 2,
                   "--set", "run.steps=20", "--set", "optim.lr=0.02", "--out", longer, "--quiet"])
    assert r.returncode == 0, r.stderr
    for command in (["report", tmp_path, "--best"], ["plot", tmp_path, "--best", "--out", tmp_path / "f.png"]):
        r = run_main(command)
        assert r.returncode == 0, r.stderr
        warnings = [line for line in r.stderr.splitlines() if "warning" in line]
        assert warnings == ["cdmpi: warning: --best compares cdadam (scaled_sign) runs on synthetic that differ "
                            "in steps: 15, 20"], r.stderr


def test_plot_labels_every_curve_with_its_step_size(tmp_path, finished_sweep):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cdmpi import analysis, plot

    captured = {}
    savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):  # look at the figure plot.figure made, then save it as it would
        captured["fig"] = fig
        return savefig(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        plot.figure(analysis.expand([finished_sweep]), xs=("step",), out=tmp_path / "all.png")
        ax = captured["fig"].axes[0]
        plot.figure(analysis.expand([finished_sweep]), xs=("step",), y="loss", out=tmp_path / "loss.png")
        loss_ax = captured["fig"].axes[0]
        plot.figure(analysis.expand([finished_sweep]), xs=("step",), y="bits_up", out=tmp_path / "bits.png")
        bits_ax = captured["fig"].axes[0]
        plot.figure(analysis.expand([finished_sweep]), xs=("step", "bits"), out=tmp_path / "by.png", by_method=True)
        by_method = captured["fig"].axes
    finally:
        plt.Figure.savefig = savefig
    runs = [metrics.read(f)["train"] for f in analysis.expand([finished_sweep])]
    losses = np.concatenate([train["loss"] for train in runs])
    assert losses.max() < 10 * losses.min() and loss_ax.get_yscale() == "linear"  # under a decade: linear
    assert all(train["bits_up"][-1] >= 10 * train["bits_up"][0] for train in runs)  # 15 steps: over a decade
    assert bits_ax.get_yscale() == "log"
    low, high = bits_ax.get_ylim()
    assert np.log10(high / low) >= 1
    assert all(label.get_text() == "" for label in bits_ax.yaxis.get_minorticklabels())  # decades only
    lines = ax.get_lines()
    labels = sorted(line.get_label() for line in lines)
    assert labels == sorted(f"{name} lr={lr:g}" for name in ("amsgrad (identity)", "cdadam (scaled_sign)")
                            for lr in (0.004, 0.012))
    looks = {(line.get_color(), str(line.get_linestyle())) for line in lines}
    assert len(looks) == len(lines)  # no two curves drawn alike
    # --by-method: a row per method, a column per dataset and x axis, each panel one method's step sizes
    assert len(by_method) == 4
    for ax, (axis, method) in zip(by_method, [(x, m) for m in ("amsgrad (identity)", "cdadam (scaled_sign)")
                                             for x in ("step", "bits")]):  # row by row
        assert sorted(line.get_label() for line in ax.get_lines()) == [f"{method} lr=0.004", f"{method} lr=0.012"]
        assert ax.get_title().endswith(method) and ax.get_xlabel() == plot.X_AXES[axis]


@pytest.mark.mpi
def test_sweep_under_mpi_matches_in_process(tmp_path, small_config):
    args = [small_config, "--grid", "optim.lr=0.01,0.02", "--algorithms", "onebit-adam", "--set", "run.steps=10",
            "--set", "optim.warmup_steps=4", "--workers", 2]
    r1 = run_main(["sweep", *args, "--out-dir", tmp_path / "local"])
    r2 = run_cdmpi(["sweep", *args, "--out-dir", tmp_path / "mpi", "--backend", "mpi", "--jobs", 2],
                   timeout=240)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    for name in ("small_onebit-adam_lr=0.01.h5", "small_onebit-adam_lr=0.02.h5"):
        with h5py.File(tmp_path / "local" / name, "r") as a, h5py.File(tmp_path / "mpi" / name, "r") as b:
            assert a.attrs["backend"] == "local" and b.attrs["backend"] == "mpi"
            for column in ("loss", "grad_norm_sq", "bits_up"):
                np.testing.assert_array_equal(a["train"][column][()], b["train"][column][()])


def test_one_colour_per_method_in_every_figure():
    """plot.method_colour is the only mapping: every method of the catalog has its own colour, the sharded
    topology a shade of its own, and the answer never depends on which other runs a figure holds."""
    from cdmpi import catalog, plot

    algorithms = list(catalog.ALGORITHMS)
    colours = {(a, t): plot.method_colour(a, t) for a in algorithms for t in ("star", "sharded")}
    assert len(set(colours.values())) == len(colours)
    assert plot.method_colour("cdadam") == plot.method_colour("cdadam", "star")
    for script in ("results/digits/figure.py", "results/network/make_readme.py"):
        text = (REPO / script).read_text()
        assert "method_colour" in text and "tab:" not in text and "cmap" not in text, script


def test_labels_name_the_quantity_and_every_run(tmp_path):
    from cdmpi import plot

    assert plot.quantity("grad_norm_sq", "logreg on mushrooms: 8124 samples") == \
        "‖∇f(x_t)‖² (grad_norm_sq), logreg on mushrooms"


def test_a_diverging_run_is_a_result_of_the_sweep(tmp_path):
    """EF21 (SGD) on a quadratic with a step size past 2: x grows 9x a step until it is not finite. The sweep
    keeps that run's rows up to there, says where it stopped, and runs the other step size."""
    config = tmp_path / "quadratic.toml"
    config.write_text('[run]\nsteps = 200\ndtype = "float32"\nworkers = 2\n[problem]\nname = "quadratic"\ndim = 20\n'
                      '[optim]\nalgorithm = "ef21"\n[compress]\nname = "topk"\nratio = 1.0\n')
    r = run_main(["sweep", config, "--grid", "optim.lr=0.5,10.0", "--out-dir", tmp_path / "sweep"])
    assert r.returncode == 0, r.stderr
    assert "stopped, non-finite" in r.stdout
    stopped = metrics.read(tmp_path / "sweep" / "quadratic_ef21_lr=10.0.h5")
    assert 5 < stopped["train"]["step"][-1] < 200
    assert np.isfinite(stopped["train"]["loss"]).all()
    assert metrics.read(tmp_path / "sweep" / "quadratic_ef21_lr=0.5.h5")["train"]["step"][-1] == 200
    r = run_main(["sweep", config, "--grid", "optim.lr=0.5,10.0", "--out-dir", tmp_path / "sweep"])
    assert r.returncode == 0 and "2 already finished" in r.stdout  # a second sweep does not run it again
