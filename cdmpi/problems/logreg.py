"""Section 7.1: logistic regression with the nonconvex regulariser. Worker i holds rows D_i and
f_i(x) = (1/|D_i|) sum_{j in D_i} log(1 + exp(-y_j a_j^T x)) + lam sum_k x_k^2 / (1 + x_k^2); the algorithms
minimise the paper's (3.1), f(x) = (1/n) sum_i f_i(x), which the metrics measure. With shards of unequal
size, (3.1) is not the mean over all N rows (7.1), which the metrics keep beside it (*_all_rows)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CdmpiError
from ..rows import Share
from .sampling import RandomRows

MAX_DENSE_ELEMENTS = 400_000_000  # 3.2 GB in float64 per shard


def regulariser(x: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    sq = x * x
    return lam * (sq / (1 + sq)).sum(), lam * 2 * x / (1 + sq) ** 2


class LogRegShard:
    """Worker i's part: f_i(x) = mean over its rows of the logistic loss + the regulariser.

    ``evaluate`` also returns this worker's *shares* of the objectives, which the server adds up: of (3.1),
    [f_i, grad f_i] / n; and of the mean over all N rows, [its loss sum / N + regulariser / n, gradient
    likewise].
    """

    def __init__(self, features, labels, *, n_total: int, n_workers: int, reg: float, dtype, device):
        rows, cols = features.shape
        if rows * cols > MAX_DENSE_ELEMENTS:
            raise CdmpiError(f"a shard of {rows} x {cols} features is too large to hold dense")
        dense = features.toarray() if hasattr(features, "toarray") else features
        self.features = torch.as_tensor(dense, dtype=dtype, device=device).contiguous()
        self.labels = torch.as_tensor(labels, dtype=dtype, device=device)
        self.n_total = n_total
        self.n_workers = n_workers
        self.reg = reg
        self.d = cols

    @property
    def n_samples(self) -> int:
        return self.features.shape[0]

    def sampler(self, batch_size: int, seed: int, index: int) -> RandomRows:
        return RandomRows(self.n_samples, batch_size, seed, index)

    def test_values(self, x: torch.Tensor) -> None:
        return None  # no test set

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def evaluate(self, x: torch.Tensor, rows: torch.Tensor | None = None, want_share: bool = False):
        """(g_i, shares): the local gradient (over `rows`, or all rows) and, if asked, the metric shares
        {"loss_and_grad": [loss share, gradient share...]}, summed in float64 at the server."""
        a = self.features if rows is None else self.features.index_select(0, rows)
        y = self.labels if rows is None else self.labels.index_select(0, rows)
        margin = y * (a @ x)
        grad_sum = a.T @ (-y * torch.sigmoid(-margin))
        reg_value, reg_grad = regulariser(x, self.reg)
        grad = grad_sum / a.shape[0] + reg_grad
        share = None
        if want_share:
            if rows is not None:  # the share is always over the whole shard
                _, share = self.evaluate(x, None, True)
            else:
                loss_sum = F.softplus(-margin).sum()
                f_i = loss_sum / a.shape[0] + reg_value
                all_rows = torch.cat([(loss_sum / self.n_total + reg_value / self.n_workers).reshape(1),
                                      grad_sum / self.n_total + reg_grad / self.n_workers])
                # in the compute dtype; the server converts to float64 and divides (rows.Share)
                share = {"loss_and_grad": Share(torch.cat([f_i.reshape(1), grad]), self.n_workers),
                         "loss_and_grad_all_rows": Share(all_rows)}
        return grad, share
