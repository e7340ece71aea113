"""Your own model with cdmpi, in a few lines: a small regression network, 200 CD-Adam steps.

    python examples/custom_model.py [--workers 2] [--sharded]      # the workers in this process
    mpiexec -n 3 python examples/custom_model.py [--sharded]       # rank 0 serves, ranks 1 and 2 train

--sharded: the workers aggregate slices of the vector among themselves (comm.topology = "sharded").
"""

import argparse

import torch

import cdmpi

STEPS = 200


def train(run):
    torch.manual_seed(0)  # every worker starts from the same model
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = run.optimizer(model, lr=0.01)
    w = torch.randn(10, 1, generator=torch.Generator().manual_seed(1))  # the target map
    data = torch.Generator().manual_seed(run.worker)  # each worker its own samples
    for step in range(STEPS):
        x = torch.randn(64, 10, generator=data)
        loss = torch.nn.functional.mse_loss(model(x), x @ w)
        opt.zero_grad()
        loss.backward()
        run.log(loss=loss.item())
        opt.step()
        if step in (0, STEPS - 1):
            params = torch.nn.utils.parameters_to_vector(model.parameters()).double().sum().item()
            print(f"worker {run.worker} step {step} loss {loss.item():.4f} params {params:.10e}", flush=True)


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--workers", type=int, default=2, help="workers in this process (ignored under mpiexec)")
parser.add_argument("--sharded", action="store_true", help="the workers aggregate the slices themselves")
args = parser.parse_args()
cdmpi.launch(train, workers=None if cdmpi.launched_by_mpi() else args.workers,
             settings={"comm.topology": "sharded" if args.sharded else "star"})
