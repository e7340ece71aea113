"""The loops people really write (tests/idioms.py, and the README's example as printed) keep cdmpi's
promises: stopped by SIGTERM mid-run and resumed, in process and under mpiexec, each gives the rows and
final parameters of its uninterrupted in-process run, bit for bit; and every row is there, at its step."""

from __future__ import annotations

import json
import os
import re
import signal

import numpy as np
import pytest

import torch

import cdmpi
from cdmpi import metrics

from conftest import REPO, finish, rank_pid, run_main, run_python, start_mpi, subprocess_env, wait_for

IDIOMS = REPO / "tests" / "idioms.py"
STEPS = 12
STOP_AT = 6  # every process sends itself SIGTERM as this step begins
EXIT_STOPPED = 75
NAMES = ["dataloader", "cosine", "onecycle", "trainer", "frozen_bn", "param_groups", "generator", "loader", "amp"]


def assert_same_run(path, reference) -> None:
    run = metrics.read(path)
    for group in ("train", "eval"):
        ours, theirs = run.get(group) or {}, reference.get(group) or {}
        assert sorted(ours) == sorted(theirs), group
        for column in theirs:
            if column != "wall_time":
                np.testing.assert_array_equal(ours[column], theirs[column], err_msg=f"{group}/{column}")
    np.testing.assert_array_equal(run["final"]["params"], reference["final"]["params"])


def stopped_and_resumed(args, out, ranks=None, cwd=None) -> None:
    r = run_python([*args, "--out", out], ranks=ranks, env=subprocess_env(CDMPI_TEST_SIGTERM_AT=STOP_AT), cwd=cwd)
    assert r.returncode == EXIT_STOPPED, r.stderr
    stopped = re.search(r"stopped by SIGTERM at step (\d+)", r.stderr)  # the signal arrives as step STOP_AT begins
    assert stopped and STOP_AT < int(stopped.group(1)) < STEPS, r.stderr
    r = run_python([*args, "--out", out, "--resume", "auto"], ranks=ranks, cwd=cwd)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idioms")
    runs = {}
    for name in NAMES:
        r = run_python([IDIOMS, name, "--out", folder / f"{name}.h5"])
        assert r.returncode == 0, r.stderr
        runs[name] = metrics.read(folder / f"{name}.h5")
        assert runs[name]["train"]["step"].tolist() == list(range(STEPS)), name  # row 0 there, none shifted
    return runs


@pytest.mark.parametrize("name", NAMES)
def test_idiom_stopped_and_resumed_in_process_is_the_uninterrupted_run(tmp_path, references, name):
    out = tmp_path / "run.h5"
    stopped_and_resumed([IDIOMS, name, "--every", "4"], out)
    assert_same_run(out, references[name])


@pytest.mark.mpi
@pytest.mark.parametrize("name", NAMES)
def test_idiom_under_mpiexec_stopped_and_resumed_is_the_in_process_run(tmp_path, references, name):
    out = tmp_path / "run.h5"
    stopped_and_resumed([IDIOMS, name], out, ranks=3)
    assert_same_run(out, references[name])


def test_rows_are_at_their_steps(references):
    """Each loop's row of step t holds what its body logged at step t."""
    cosine = references["cosine"]["train"]  # lr logged after sched.step(): the rate of step t + 1
    assert np.allclose(cosine["lr"], [0.005 * (1 + np.cos(np.pi * (t + 1) / STEPS)) for t in range(STEPS)])
    onecycle = references["onecycle"]["train"]
    assert len(set(onecycle["beta1"].tolist())) > 3  # cycle_momentum moved beta1
    amp = references["amp"]["train"]  # worker 1 overflowed at steps 3 and 8: both scalers halved there
    assert amp["scale"][3] == amp["scale"][2] / 2 and amp["scale"][8] == amp["scale"][7] / 2
    x_sum = amp["x_sum"]  # x after each step: the skipped steps left it as it was, the others moved it
    assert x_sum[3] == x_sum[2] and x_sum[8] == x_sum[7] and x_sum[4] != x_sum[3]


@pytest.mark.mpi
def test_the_readme_example_gives_the_same_bits_in_process_and_under_mpiexec_and_resumes(tmp_path):
    """The README's own-model example, exactly as printed (it writes runs/mine.h5 in its folder): in process,
    and under mpiexec -n 5 and in process stopped by SIGTERM mid-run and resumed."""
    text = (REPO / "README.md").read_text()
    code = re.search(r"## Your own model\n.*?```python\n(.*?)```", text, re.S).group(1)
    steps = int(re.search(r"run\.steps\((\d+)\)", code).group(1))
    local = tmp_path / "local"
    local.mkdir()
    (local / "mine.py").write_text(code)
    r = run_python([local / "mine.py"], cwd=local)
    assert r.returncode == 0, r.stderr
    reference = metrics.read(local / "runs" / "mine.h5")
    assert reference["train"]["step"].tolist() == list(range(steps))
    stop = tmp_path / "mpi"
    stop.mkdir()
    (stop / "mine.py").write_text(code)
    r = run_python([stop / "mine.py"], cwd=stop, ranks=5, env=subprocess_env(CDMPI_TEST_SIGTERM_AT=steps // 2))
    assert r.returncode == EXIT_STOPPED, r.stderr
    r = run_python([stop / "mine.py"], cwd=stop, ranks=5)  # resume="auto", as printed
    assert r.returncode == 0, r.stderr
    assert not re.search(r"ucx|mpool|warning", r.stderr, re.I), r.stderr  # a clean run says nothing amiss
    assert_same_run(stop / "runs" / "mine.h5", reference)
    here = tmp_path / "stopped-in-process"
    here.mkdir()
    (here / "mine.py").write_text(code)
    r = run_python([here / "mine.py"], cwd=here, env=subprocess_env(CDMPI_TEST_SIGTERM_AT=steps // 3))
    assert r.returncode == EXIT_STOPPED, r.stderr
    r = run_python([here / "mine.py"], cwd=here)
    assert r.returncode == 0, r.stderr
    assert_same_run(here / "runs" / "mine.h5", reference)


# ---- what cannot work fails loudly: one line, every worker stops, nothing is lost --------------------------

def tiny_loop(body, steps=4, **options):
    """A loop over run.steps() (or, body(run, opt, model) itself) on a 4-parameter model."""
    def loop(run):
        model = torch.nn.Linear(3, 1)
        opt = run.optimizer(model, **{"lr": 0.01, **options})
        body(run, opt, model, steps)
    return loop


def step_once(model, opt):
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    opt.zero_grad()


def launch_error(capsys, fn, **kwargs) -> tuple[int, str]:
    with pytest.raises(SystemExit) as end:
        cdmpi.launch(fn, workers=2, **{"quiet": True, **kwargs})
    return end.value.code, capsys.readouterr().err


def test_a_step_without_backward_stops_the_run(capsys):
    def body(run, opt, model, steps):
        for _ in run.steps(steps):
            opt.step()  # no backward(): it would step on zero gradients
    code, err = launch_error(capsys, tiny_loop(body))
    assert code == 1 and "optimizer.step() at step 0 without a gradient on worker 0" in err


@pytest.mark.parametrize("calls", [0, 2])
def test_a_run_steps_body_takes_one_optimizer_step(capsys, calls):
    def body(run, opt, model, steps):
        for _ in run.steps(steps):
            for _ in range(calls):
                step_once(model, opt)
    code, err = launch_error(capsys, tiny_loop(body))
    assert code == 1 and f"the body of run.steps() took {calls} optimizer steps at step 0" in err
    assert len(err.strip().splitlines()) == 1


def test_add_param_group_is_refused_and_groups_must_share_betas(capsys):
    def body(run, opt, model, steps):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    code, err = launch_error(capsys, tiny_loop(body))
    assert code == 1 and "add_param_group(): cdmpi's optimizer keeps every parameter in one flat vector" in err

    def groups(run):
        model = torch.nn.Linear(3, 1)
        run.optimizer([{"params": [model.weight]}, {"params": [model.bias], "betas": (0.5, 0.9)}])
    code, err = launch_error(capsys, groups)
    assert code == 2 and "param group 1 has betas = (0.5, 0.9)" in err and len(err.strip().splitlines()) == 1


def test_comm_timeout_applies_to_a_loop_and_generators_are_checkpointed(tmp_path):
    seen = {}

    def loop(run):
        model = torch.nn.Linear(3, 1)
        opt = run.optimizer(model, lr=0.01)
        g = run.state(g=torch.Generator().manual_seed(5))["g"]
        for _ in run.steps(3):
            (model(torch.randn(2, 3, generator=g)).sum()).backward()
            opt.step()
            opt.zero_grad()
        seen[run.worker] = g.get_state()

    cdmpi.launch(loop, workers=2, out=tmp_path / "a.h5", quiet=True, settings={"comm.timeout": 1800})
    ckpt = sorted((tmp_path / "a.ckpt").iterdir())[-1] / "worker-0000.pt"
    saved = torch.load(ckpt, weights_only=True)["state"]["user"]["g"]  # loads without weights_only=False
    assert torch.equal(saved, seen[0])


def test_a_finished_run_is_not_resumed_by_auto_and_nothing_is_touched(tmp_path, capsys):
    out = tmp_path / "run.h5"

    def body(run, opt, model, steps):
        for _ in run.steps(steps):
            step_once(model, opt)
            run.log(x=1.0)
    cdmpi.launch(tiny_loop(body), workers=2, out=out, quiet=True)
    before = out.read_bytes()
    code, err = launch_error(capsys, tiny_loop(body), out=out, resume="auto")
    assert code == 2 and "holds a finished run (4 steps" in err and "resume='" in err
    assert out.read_bytes() == before
    cdmpi.launch(tiny_loop(body, steps=6), workers=2, out=out, quiet=True,  # on from its end, explicitly
                 resume=str(tmp_path / "run.ckpt" / "step-000000004"))
    assert metrics.read(out)["train"]["step"].tolist() == list(range(6))


def test_a_checkpoint_resumes_only_with_the_kind_of_loop_that_wrote_it(tmp_path, capsys):
    out = tmp_path / "run.h5"

    def with_steps(run, opt, model, steps):
        for _ in run.steps(steps):
            step_once(model, opt)

    def without(run, opt, model, steps):
        for _ in range(steps):
            step_once(model, opt)

    cdmpi.launch(tiny_loop(with_steps), workers=2, out=out, quiet=True, settings={"checkpoint.every": 2})
    code, err = launch_error(capsys, tiny_loop(without, steps=6), out=out,
                             resume=str(tmp_path / "run.ckpt" / "step-000000002"))
    assert code == 1 and "written by a loop over run.steps(); resume it with that loop" in err


def test_param_groups_step_as_a_float64_transcription_of_amsgrad_with_decoupled_decay():
    """Uncompressed AMSGrad (float32 frames), one worker, two groups with their own lr and decoupled decay
    on one: cdmpi's range-by-range update against numpy in float64."""
    rng = np.random.default_rng(0)
    a, b, x0 = rng.normal(size=(6, 5)), rng.normal(size=6), rng.normal(size=5)
    lrs, decays, beta1, beta2, nu, steps = (0.05, 0.2), (0.1, 0.0), 0.9, 0.99, 1e-8, 6

    def two(run):
        head, tail = (torch.nn.Parameter(torch.tensor(x0[:3])), torch.nn.Parameter(torch.tensor(x0[3:])))
        opt = run.optimizer([{"params": [head], "lr": lrs[0], "weight_decay": decays[0]},
                             {"params": [tail], "lr": lrs[1], "weight_decay": decays[1]}],
                            algorithm="amsgrad", compressor="identity", betas=(beta1, beta2), eps=nu,
                            decoupled_weight_decay=True)
        for _ in run.steps(steps):
            x = torch.cat([head, tail])
            (0.5 * ((torch.tensor(a) @ x - torch.tensor(b)) ** 2).sum()).backward()
            opt.step()
            opt.zero_grad()
        return torch.cat([head, tail]).detach().numpy()

    got = cdmpi.launch(two, workers=1, quiet=True)[0]
    x, m, v, v_hat = x0.copy(), np.zeros(5), np.zeros(5), np.zeros(5)
    lr = np.array([lrs[0]] * 3 + [lrs[1]] * 2)
    wd = np.array([decays[0]] * 3 + [decays[1]] * 2)
    for _ in range(steps):
        g = (a.T @ (a @ x - b)).astype(np.float32).astype(np.float64)  # identity frames are float32
        x = x * (1 - lr * wd)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        v_hat = np.maximum(v_hat, v)
        x = x - lr * m / np.sqrt(v_hat + nu)
    np.testing.assert_allclose(got, x, rtol=1e-12, atol=1e-14)
    assert np.abs(x - x0).max() > 0.1  # it moved


@pytest.mark.mpi
def test_the_mingpt_port_under_mpiexec_stopped_and_resumed_is_the_in_process_run(tmp_path):
    """examples/mingpt/adder.py: minGPT's own Trainer, unchanged, logging in its on_batch_end callback."""
    adder = [REPO / "examples" / "mingpt" / "adder.py", "--max-iters", 30]
    r = run_python([*adder, "--workers", 2, "--out", tmp_path / "ref.h5"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    reference = metrics.read(tmp_path / "ref.h5")
    assert reference["train"]["step"].tolist() == list(range(30))
    assert reference["eval"]["step"].tolist() == [0, 29]  # worker 0 evaluates at step 0 and at the end
    stopped_and_resumed([*adder], tmp_path / "run.h5", ranks=3, cwd=tmp_path)
    assert_same_run(tmp_path / "run.h5", reference)


def test_report_and_plot_use_your_own_eval_columns(tmp_path):
    """--target with a floor on an /eval column, --best-by it, the lr column, and plot --y of it."""
    def loop_at(lr):
        def loop(run):
            model = torch.nn.Linear(3, 1)
            opt = run.optimizer(model, lr=lr)
            for step in run.steps(6):
                step_once(model, opt)
                run.log(loss=1.0 / (step + 1))
                run.log_eval(accuracy=min(1.0, lr * 10 * (step + 1)))
        return loop

    for lr in (0.01, 0.05):
        cdmpi.launch(loop_at(lr), workers=2, out=tmp_path / f"lr{lr}.h5", quiet=True)
    r = run_main(["report", tmp_path, "--target", "accuracy>=0.5"])
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split()[:6] == ["file", "algorithm", "compressor", "topology", "workers", "lr"]
    steps = {row.split()[0].rsplit("/", 1)[-1]: row.split()[-2] for row in rows}
    assert steps == {"lr0.01.h5": "4", "lr0.05.h5": "0"}  # accuracy 0.5 first at step 4; at 0.05 at once
    r = run_main(["report", tmp_path, "--best-by", "accuracy:max", "--json"])
    assert r.returncode == 0 and json.loads(r.stdout)[0]["lr"] == 0.05
    png = tmp_path / "acc.png"
    r = run_main(["plot", tmp_path, "--y", "accuracy", "--out", png])
    assert r.returncode == 0, r.stderr
    r = run_main(["report", tmp_path, "--target", "accuracy>=x"])
    assert r.returncode == 2 and "--target expects COLUMN<=VALUE or COLUMN>=VALUE" in r.stderr


def test_a_step_size_the_parameters_dtype_cannot_hold_is_one_line(capsys):
    def loop(run):
        run.optimizer(torch.nn.Linear(3, 1), lr=1e308)  # float32 parameters: at most 3.4e38
    code, err = launch_error(capsys, loop)
    assert code == 2 and err.strip() == ("cdmpi: error: run.optimizer(): lr = 1e+308 does not fit the "
                                         "parameters' float32 (at most 3.403e+38)")


# ---- SIGTERM, however and whenever it comes, ends in 75 and a checkpoint that resumes bit-exactly ----------

LONG = 300  # steps of the unpaced runs below


@pytest.fixture(scope="module")
def long_references(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long")
    runs = {}
    for name in ("cosine", "trainer"):
        r = run_python([IDIOMS, name, "--steps", LONG, "--out", folder / f"{name}.h5"])
        assert r.returncode == 0, r.stderr
        runs[name] = metrics.read(folder / f"{name}.h5")
    return runs


def signal_and_resume(tmp_path, name, reference, send) -> bool:
    """Start an unpaced run of idiom `name` under mpiexec -n 3, send(job) once it has written rows, then
    resume it: True when the signal stopped it (exit 75) and the resumed run is the uninterrupted one;
    False when the run had finished first."""
    out = tmp_path / f"{name}.h5"
    args = [IDIOMS, name, "--steps", LONG, "--out", out]
    job = start_mpi(args, 3)
    wait_for(lambda: out.exists() and metrics.read(out)["train"]["step"].size >= 10, job)
    send(job)
    rc, err = finish(job, timeout=120)
    if rc == 0 and f"stopped by SIGTERM" not in err:
        return False
    assert rc == EXIT_STOPPED and "stopped by SIGTERM at step" in err, (rc, err)
    r = run_python([*args, "--resume", "auto"], ranks=3)
    assert r.returncode == 0, r.stderr
    assert_same_run(out, reference)
    return True


SENDERS = {
    "mpiexec": lambda job: os.kill(job.pid, signal.SIGTERM),
    "every rank": lambda job: [os.kill(rank_pid(job, rank), signal.SIGTERM) for rank in range(3)],
    "one worker": lambda job: os.kill(rank_pid(job, 2), signal.SIGTERM),
    "the server": lambda job: os.kill(rank_pid(job, 0), signal.SIGTERM),
}


@pytest.mark.mpi
@pytest.mark.parametrize("to", SENDERS)
def test_sigterm_unpaced_to_any_rank_ends_in_75_and_resumes_bit_exactly(tmp_path, long_references, to):
    """A loop over run.steps() and a Trainer's loop (which replays), each signalled unpaced."""
    stopped = [signal_and_resume(tmp_path / f"trial{trial}", name, long_references[name], SENDERS[to])
               for trial, name in enumerate(["cosine", "trainer"])]
    assert any(stopped), "the runs finished before the signal arrived: make LONG larger"


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["cosine", "trainer"])
@pytest.mark.parametrize("when", ["checkpoint write", "last step"])
def test_sigterm_while_a_checkpoint_is_written_or_at_the_last_step(tmp_path, references, name, when):
    """Every process gets SIGTERM while it writes the periodic checkpoint of step 8, or as the last step
    begins: the stop's checkpoint follows (exit 75), and the resumed run is the uninterrupted one."""
    out = tmp_path / "run.h5"
    env = ({"CDMPI_TEST_SIGTERM_IN_CHECKPOINT": 8} if when == "checkpoint write" else
           {"CDMPI_TEST_SIGTERM_AT": STEPS - 1})
    r = run_python([IDIOMS, name, "--every", 4, "--out", out], ranks=3, env=subprocess_env(**env))
    assert r.returncode == EXIT_STOPPED, r.stderr
    step = int(re.search(r"stopped by SIGTERM at step (\d+)", r.stderr).group(1))
    assert step == (9 if when == "checkpoint write" else STEPS), r.stderr
    r = run_python([IDIOMS, name, "--out", out, "--resume", "auto"], ranks=3)
    assert r.returncode == 0, r.stderr
    assert_same_run(out, references[name])


def test_the_optimizer_state_goes_through_torchs_state_dict_hooks():
    seen = []

    def loop(run):
        model = torch.nn.Linear(3, 1)
        opt = run.optimizer(model, lr=0.01)
        opt.register_state_dict_post_hook(lambda optimizer, state: seen.append(sorted(state["state"][0])))
        for _ in run.steps(2):
            step_once(model, opt)
        assert opt.defaults["betas"] == (0.9, 0.99) and opt.param_groups[0]["decoupled_weight_decay"] is False
        return opt.state_dict()["state"][0]["step"]

    assert cdmpi.launch(loop, workers=2, quiet=True) == [2, 2]
    assert seen == [["algorithm", "d", "step"]] * 2


def test_an_evaluation_before_the_first_step_does_not_shift_a_log_after_step_loop(tmp_path):
    """A loop without run.steps() that evaluates at the start of each epoch and logs the loss after
    opt.step(): the rows are 0..T-1, each with its own step's loss, and the evaluations at their steps."""
    def loop(run):
        model = torch.nn.Linear(3, 1)
        opt = run.optimizer(model, lr=0.01)
        for epoch in range(2):
            run.log_eval(epoch=epoch)
            for batch in range(3):
                model(torch.ones(2, 3)).sum().backward()
                opt.step()
                opt.zero_grad()
                run.log(loss=float(3 * epoch + batch))

    cdmpi.launch(loop, workers=2, out=tmp_path / "run.h5", quiet=True)
    run = metrics.read(tmp_path / "run.h5")
    assert run["train"]["step"].tolist() == list(range(6)) and run["train"]["loss"].tolist() == list(range(6))
    assert np.isfinite(run["train"]["grad_norm_sq"]).all()
    assert run["eval"]["step"].tolist() == [0, 2]  # the second: logged after step 2's optimizer.step()
