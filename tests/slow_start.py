"""A user's script whose first start is slow before cdmpi is imported (as `import torch` is on a busy
node): SIGTERM then ends the process before cdmpi can take it. tests/test_slurm.py checks that
slurm/train.sbatch requeues such a job all the same, and that it then trains to the end.

    python tests/slow_start.py --out run.h5 [--resume auto]
"""

import argparse
import os
import time

if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    marker = os.environ.get("CDMPI_TEST_SLOW_START_MARKER")
    if marker:
        with open(f"{marker}.{os.environ.get('SLURM_PROCID', 0)}", "w") as fh:
            fh.write("starting\n")
    time.sleep(120)  # the first start: the time-limit warning comes during this

import torch  # noqa: E402

import cdmpi  # noqa: E402


def train(run):
    model = torch.nn.Linear(4, 2)
    opt = run.optimizer(model, lr=0.01)
    for step in run.steps(20):
        x = torch.randn(8, 4)
        loss = torch.nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.log(loss=loss.item())


parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--resume", default=None)
args = parser.parse_args()
cdmpi.launch(train, out=args.out, resume=args.resume)
