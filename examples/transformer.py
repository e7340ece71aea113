"""A small GPT learning 2-digit addition with cdmpi: your own transformer loop on the own-model API.

    python examples/transformer.py --out runs/gpt.h5 [--steps 3000] [--algorithm cdadam] [--resume auto]
    mpiexec -n 3 python examples/transformer.py --out runs/gpt.h5

The model (cdmpi.nets.gpt, minGPT's gpt-nano shape) reads "a b" as four digit tokens and writes the three
digits of the sum, least significant first. Each worker draws 32 problems a step from its share of the
9,000 training problems (run.loader), clips its gradient norm at 1, and every --eval-every steps worker 0
generates the answers of the 1,000 held-out problems greedily: their exact-match accuracy goes to /eval.
`cdmpi train configs/transformer/addition.toml` runs the same task as a built-in problem.
"""

import argparse

import torch
import torch.nn.functional as F

import cdmpi
from cdmpi import sequences
from cdmpi.nets.gpt import gpt

BATCH = 32  # per worker


def answer_loss(model, tokens, start):
    """Cross-entropy of the answer's tokens (positions from `start` on), teacher-forced."""
    logits = model(tokens[:, :-1])[:, start - 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, start:].reshape(-1))


@torch.no_grad()
def exact_match(model, tokens, start):
    model.eval()
    answer = model.greedy(tokens[:, :start], tokens.shape[1] - start)
    model.train()
    return (answer == tokens[:, start:]).all(dim=1).float().mean().item()


def train(run, args):
    task = sequences.addition(digits=2, test_samples=1000)
    model = gpt("gpt_nano", task.vocab_size, task.block_size).to(run.device)
    opt = run.optimizer(model, algorithm=args.algorithm, lr=args.lr, betas=(0.9, 0.95))
    batches = run.loader(task.train, BATCH)  # this worker's share, a seeded order per epoch

    for step, tokens in zip(run.steps(args.steps), batches):
        if step % args.eval_every == 0 and run.worker == 0:
            run.log_eval(accuracy=exact_match(model, task.test.to(run.device), task.answer_start))
        loss = answer_loss(model, tokens.to(run.device), task.answer_start)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        run.log(loss=loss.item())
        opt.step()

    accuracy = exact_match(model, task.test.to(run.device), task.answer_start)
    if run.worker == 0:
        run.log_eval(accuracy=accuracy)
        print(f"worker 0: exact-match {accuracy:.3f} on the held-out problems after {run.step} steps", flush=True)
    return accuracy


def main():
    parser = argparse.ArgumentParser(description="A small GPT learning 2-digit addition, trained with cdmpi.")
    parser.add_argument("--out", required=True, help="HDF5 metrics file; checkpoints go to its .ckpt/ folder")
    parser.add_argument("--steps", type=int, default=3000, help="steps of every worker (default 3000)")
    parser.add_argument("--algorithm", default="cdadam", help="cdadam (default), amsgrad, onebit-adam, ...")
    parser.add_argument("--lr", type=float, default=1e-3, help="step size (default 1e-3)")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between evaluations (default 250)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the newest checkpoint (auto) or a given one")
    parser.add_argument("--workers", type=int, default=None,
                        help="workers in this process (default 2); under mpiexec the world size decides")
    args = parser.parse_args()
    if args.steps < 1 or args.eval_every < 1:
        parser.error("--steps and --eval-every must be at least 1")
    workers = args.workers if args.workers is not None or cdmpi.launched_by_mpi() else 2
    cdmpi.launch(lambda run: train(run, args), out=args.out, workers=workers, resume=args.resume,
                 overwrite=args.resume is None)


if __name__ == "__main__":
    main()
