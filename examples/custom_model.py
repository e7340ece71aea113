"""Your own model with CD-Adam: `mpiexec -n 3 python examples/custom_model.py [sharded]` (1 server + 2 workers;
`sharded`: the workers aggregate slices of the vector among themselves)."""
import sys

import torch
from cdmpi.api import DistributedOptimizer, serve
from cdmpi.transport import MPITransport

transport = MPITransport.from_world()  # rank 0: server; ranks 1..n: workers
torch.manual_seed(0)  # every rank starts from the same model
model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
STEPS, w = 200, torch.randn(10, 1)
topology = sys.argv[1] if len(sys.argv) > 1 else "star"
if transport.is_server:
    print("server:", serve(model, transport, STEPS, lr=0.01, topology=topology))
else:
    opt = DistributedOptimizer(model, transport, lr=0.01, topology=topology)
    data = torch.Generator().manual_seed(transport.rank)
    for step in range(STEPS):
        x = torch.randn(64, 10, generator=data)
        loss = torch.nn.functional.mse_loss(model(x), x @ w)
        opt.zero_grad(); loss.backward(); opt.step()
        if step in (0, STEPS - 1):
            print(f"worker {transport.rank - 1} step {step} loss {loss.item():.4f} "
                  f"params {opt.flat.double().sum().item():.10e}", flush=True)
