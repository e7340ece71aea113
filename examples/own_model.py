"""Your own model with cdmpi: a small CNN on scikit-learn's 8x8 digits, trained with CD-Adam.

    python examples/own_model.py --out runs/own.h5 [--epochs 3] [--resume auto] [--workers 4]
    mpiexec -n 5 python examples/own_model.py --out runs/own.h5 [--epochs 3] [--resume auto]

A plain PyTorch loop in train(): each worker takes its share of the 1,437 training images in a seeded
order per epoch, logs its loss, and evaluates on the 360 held-out images at the start of every epoch and at
the end. The learning rate drops 10x after 2/3 of the epochs (MultiStepLR). cdmpi.launch gives it the
rest: without a launcher the workers run in this process; under mpiexec rank 0 becomes the server. The
metrics go to --out (`cdmpi report`, `cdmpi plot`), checkpoints to its .ckpt/ folder; SIGTERM ends the run
with a checkpoint and exit status 75, and --resume auto continues it bit for bit.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import cdmpi

BATCH = 32  # per worker


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)  # running statistics: buffers, kept per worker and checkpointed
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.drop = nn.Dropout(0.1)  # draws from the global generator: restored on resume
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(self.drop(F.relu(self.fc1(x.flatten(1)))))


def digits():
    """(train images, train labels, test images, test labels): 8x8 images in [0, 1], a seeded 80/20 split."""
    from sklearn.datasets import load_digits  # here: only the workers load data, not the server rank

    bunch = load_digits()
    images = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(bunch.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, train = order[:len(labels) // 5], order[len(labels) // 5:]
    return images[train], labels[train], images[test], labels[test]


@torch.no_grad()
def evaluate(model, images, labels):
    model.eval()
    logits = model(images)
    model.train()
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def train(run, epochs, lr):
    train_x, train_y, test_x, test_y = digits()
    share = torch.arange(len(train_y)).tensor_split(run.workers)[run.worker]  # this worker's images
    steps_per_epoch = len(train_y) // run.workers // BATCH  # the same on every worker: shares differ by one

    model = Net().to(run.device)  # worker 0's initial values go to every worker
    opt = run.optimizer(model, lr=lr)  # CD-Adam, scaled sign both ways; restores everything on resume
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, 2 * epochs // 3)], gamma=0.1)
    run.state(scheduler=scheduler)  # checkpointed with the run

    for step in run.steps(epochs * steps_per_epoch):  # from 0, or from a resumed checkpoint's step
        epoch, batch = divmod(step, steps_per_epoch)
        if batch == 0:  # a new epoch: evaluate the model as it is
            loss, accuracy = evaluate(model, test_x, test_y)
            run.log_eval(epoch=epoch, loss=loss, accuracy=accuracy)
        order = share[torch.randperm(len(share), generator=torch.Generator().manual_seed(epoch))]
        rows = order[batch * BATCH:(batch + 1) * BATCH]
        loss = F.cross_entropy(model(train_x[rows].to(run.device)), train_y[rows].to(run.device))
        opt.zero_grad()
        loss.backward()
        run.log(loss=loss.item(), lr=opt.param_groups[0]["lr"])
        opt.step()
        if batch == steps_per_epoch - 1:  # the end of an epoch: the schedule moves on
            scheduler.step()

    loss, accuracy = evaluate(model, test_x, test_y)
    run.log_eval(epoch=epochs, loss=loss, accuracy=accuracy)
    if run.worker == 0:
        print(f"worker 0: test accuracy {accuracy:.3f} after {epochs} epochs ({run.step} steps)", flush=True)
    return accuracy


def main():
    parser = argparse.ArgumentParser(description="A small CNN on scikit-learn's digits, trained with cdmpi.")
    parser.add_argument("--out", required=True, help="HDF5 metrics file; checkpoints go to its .ckpt/ folder")
    parser.add_argument("--epochs", type=int, default=10, help="epochs over each worker's share")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the newest checkpoint (auto) or a given one")
    parser.add_argument("--workers", type=int, default=None,
                        help="workers in this process (default 4); under mpiexec the world size decides")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate before the drop")
    args = parser.parse_args()
    workers = args.workers if args.workers is not None or cdmpi.launched_by_mpi() else 4
    cdmpi.launch(lambda run: train(run, args.epochs, args.lr), out=args.out, workers=workers,
                 resume=args.resume, overwrite=args.resume is None, settings={"checkpoint.every": 20})


if __name__ == "__main__":
    main()
