"""The loops people write, each a complete cdmpi.launch script: tests/test_idioms.py runs every one in
process and under mpiexec, stops it with SIGTERM mid-run, resumes it, and compares it with the run that
was not interrupted, bit for bit.

    python tests/idioms.py IDIOM --out run.h5 [--workers 2] [--resume auto]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import cdmpi

STEPS = 12  # --steps changes it
IDIOMS = {}


def idiom(fn):
    IDIOMS[fn.__name__] = fn
    return fn


def net() -> nn.Module:
    """Built from the global generator, which launch seeds per worker: worker 0's values are broadcast."""
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def dataset(n: int = 96) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 8, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


@idiom
def dataloader(run):
    """torch's DataLoader, shuffle=True, no generator of its own: an epoch loop that knows nothing of
    resuming (cdmpi replays it)."""
    model = net()
    opt = run.optimizer(model, lr=0.01)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=16, shuffle=True)
    for epoch in range(2):
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            run.log(loss=loss.item())
            opt.step()


@idiom
def cosine(run):
    """opt.step(); sched.step(), the usual order, with a cosine schedule, in run.steps()."""
    model = net()
    opt = run.optimizer(model, lr=0.01)
    sched = run.state(sched=torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS))["sched"]
    for step in run.steps(STEPS):
        x = torch.randn(16, 8)
        loss = F.cross_entropy(model(x), (x[:, 0] > 0).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run.log(loss=loss.item(), lr=sched.get_last_lr()[0])


@idiom
def onecycle(run):
    """OneCycleLR with cycle_momentum (it moves betas[0]) after opt.step(), in a loop over range(STEPS)
    that logs after the step and never reads run.step."""
    model = net()
    opt = run.optimizer(model, lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=STEPS, cycle_momentum=True)
    for step in range(STEPS):
        x = torch.randn(16, 8)
        loss = F.cross_entropy(model(x), (x[:, 0] > 0).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run.log(loss=loss.item(), lr=sched.get_last_lr()[0], beta1=opt.param_groups[0]["betas"][0])


class Trainer:
    """A trainer of its own: it calls optimizer.step() and fires callbacks, as many projects' do."""

    def __init__(self, model, optimizer, loader, max_iters):
        self.model, self.optimizer, self.loader, self.max_iters = model, optimizer, loader, max_iters
        self.callbacks = {"on_batch_end": []}
        self.iter_num = 0

    def add_callback(self, event, fn):
        self.callbacks[event].append(fn)

    def run(self):
        data = iter(self.loader)
        while self.iter_num < self.max_iters:
            try:
                x, y = next(data)
            except StopIteration:
                data = iter(self.loader)
                x, y = next(data)
            self.loss = F.cross_entropy(self.model(x), y)
            self.model.zero_grad(set_to_none=True)
            self.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            for fn in self.callbacks["on_batch_end"]:
                fn(self)
            self.iter_num += 1


@idiom
def trainer(run):
    model = net()
    opt = run.optimizer(model, lr=0.01)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=16,
                                         sampler=torch.utils.data.RandomSampler(dataset(), replacement=True,
                                                                                num_samples=10**6))
    trainer = Trainer(model, opt, loader, STEPS)
    trainer.add_callback("on_batch_end", lambda t: run.log(loss=t.loss.item()))
    trainer.run()


class FrozenBN(nn.Module):
    """A frozen embedding (requires_grad=False, drawn per worker) and BatchNorm statistics."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.embed.requires_grad_(False)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.body(self.embed(x))


@idiom
def frozen_bn(run):
    model = FrozenBN()
    opt = run.optimizer(model, lr=0.01)
    for step in run.steps(STEPS):
        x = torch.randn(16, 8)
        loss = F.cross_entropy(model(x), (x[:, 0] > 0).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.log(loss=loss.item(), running_mean=model.body[1].running_mean.sum().item())


@idiom
def param_groups(run):
    """AdamW-style groups: decoupled decay on matrices, none on biases, the biases at a larger lr."""
    model = net()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = run.optimizer([{"params": weights, "weight_decay": 0.1},
                         {"params": biases, "weight_decay": 0.0, "lr": 0.02}],
                        model=model, lr=0.01, decoupled_weight_decay=True)
    sched = run.state(sched=torch.optim.lr_scheduler.StepLR(opt, 4, 0.5))["sched"]
    for step in run.steps(STEPS):
        x = torch.randn(16, 8)
        loss = F.cross_entropy(model(x), (x[:, 0] > 0).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run.log(loss=loss.item())


@idiom
def generator(run):
    """A torch.Generator of the loop's own in run.state(): saved and loaded with the checkpoints."""
    model = net()
    opt = run.optimizer(model, lr=0.01)
    data = run.state(data=torch.Generator().manual_seed(run.worker))["data"]
    for step in run.steps(STEPS):
        x = torch.randn(16, 8, generator=data)
        loss = F.cross_entropy(model(x), (x[:, 0] > 0).long())
        opt.zero_grad()
        loss.backward()
        run.log(loss=loss.item())
        opt.step()


@idiom
def loader(run):
    """run.loader(): each worker's shard, in an order that continues on resume, without replay."""
    model = net()
    opt = run.optimizer(model, lr=0.01)
    for step, (x, y) in zip(run.steps(STEPS), run.loader(dataset(), 16)):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.log(loss=loss.item())


@idiom
def amp(run):
    """fp16 autocast with GradScaler; worker 1's loss overflows at steps 3 and 8 (an injected inf): every
    worker skips those steps and every scaler backs off."""
    model = net()
    opt = run.optimizer(model, lr=0.01)
    scaler = run.state(scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))["scaler"]
    for step in run.steps(STEPS):
        x = torch.randn(16, 8)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), (x[:, 0] > 0).long())
        if run.worker == 1 and step in (3, 8):
            loss = loss * math.inf
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        run.log(scale=scaler.get_scale(), x_sum=sum(p.double().sum() for p in model.parameters()).item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("idiom", choices=sorted(IDIOMS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--every", type=int, default=0, help="checkpoint.every")
    parser.add_argument("--steps", type=int, default=STEPS, help="the run.steps() loops' length")
    args = parser.parse_args()
    globals()["STEPS"] = args.steps
    cdmpi.launch(IDIOMS[args.idiom], out=args.out, resume=args.resume, quiet=True,
                 workers=None if cdmpi.launched_by_mpi() else args.workers,
                 settings={"checkpoint.every": args.every})


if __name__ == "__main__":
    main()
