"""A metrics row from the values the workers log at a step, in worker order: ``mean_of_workers`` for a
user's own values (cdmpi.launch), ``sum_of_shares`` for the built-in problems' metric shares (cdmpi train).
The server makes the row; the in-process backend runs the same code, so both give the same bits."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Share:
    """A worker's share of a sum over workers, as it travels to the server: `body` in the worker's compute
    dtype (4 bytes a value for float32 runs, not float64's 8), after optional float64 `head` values. Its
    value is cat(head, float64(body)) / divisor: the float64 operations the worker would have done itself,
    done by the server, so the row has the same bits and the link carries half the bytes."""

    body: object  # torch.Tensor or np.ndarray
    divisor: int | float = 1
    head: object = None  # float64 values, or None

    def value(self) -> torch.Tensor:
        body = torch.as_tensor(self.body).to(torch.float64)
        if self.head is not None:
            body = torch.cat([torch.as_tensor(self.head, dtype=torch.float64).reshape(-1), body])
        return body / self.divisor

    def portable(self) -> "Share":
        """The same share with host NumPy arrays (what is pickled under MPI)."""
        def host(t):
            return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t
        return Share(host(self.body), self.divisor, host(self.head))

    def finite(self) -> bool:
        return all(bool(torch.isfinite(torch.as_tensor(part)).all()) for part in (self.body, self.head)
                   if part is not None)


def _float64(value) -> torch.Tensor:
    return value.value() if isinstance(value, Share) else torch.as_tensor(value, dtype=torch.float64)


def _ordered_sum(values: list):
    total = values[0].clone() if isinstance(values[0], torch.Tensor) else values[0]
    for value in values[1:]:
        total = total + value
    return total


def _as_number(value):
    return float(value) if not isinstance(value, torch.Tensor) or value.numel() == 1 else value


def mean_of_workers(values: list[dict]) -> dict:
    """Each key: the mean over the workers that gave it, summed in worker order (a user's values); a value
    that every worker gave alike (a learning rate, an epoch) is kept as it is."""
    keys = list(dict.fromkeys(k for v in values for k in v))
    row = {}
    for key in keys:
        given = [torch.as_tensor(v[key], dtype=torch.float64) for v in values if key in v]
        same = all(torch.equal(g, given[0]) for g in given[1:])
        row[key] = _as_number(given[0] if same else _ordered_sum(given) / len(given))
    return row


def sum_of_shares(values: list[dict]) -> dict:
    """Each key: the sum over the workers in worker order of their shares (the built-in problems, whose
    shares add up to the value over all data). A share "loss_and_grad<suffix>" is the vector [f, grad f] of a
    worker's part of an objective: its sum gives loss<suffix> and grad_norm_sq<suffix>, the squared norm of
    the gradient."""
    keys = list(dict.fromkeys(k for v in values for k in v))
    row = {}
    for key in keys:
        total = _ordered_sum([_float64(v[key]) for v in values if key in v])
        if key.startswith("loss_and_grad"):
            suffix = key.removeprefix("loss_and_grad")
            row["loss" + suffix] = float(total[0])
            row["grad_norm_sq" + suffix] = float(torch.dot(total[1:], total[1:]))
        else:
            row[key] = _as_number(total)
    return row

