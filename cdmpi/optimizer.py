"""The optimizer of a user's loop: a ``torch.optim.Optimizer`` over one flat parameter vector.

``run.optimizer(params, ...)`` takes what ``torch.optim`` optimizers take: a module, an iterable of
tensors, or param groups (dicts with "params" and their own "lr", "weight_decay",
"decoupled_weight_decay"). The parameters become views into one flat vector x and their gradients views
into one flat gradient; each group is a range of x (cdmpi.stepsize). ``step()`` hands the gradient to the
run's engine (encode, exchange, update); the hyper-parameters are read from ``param_groups`` at every
step, so LR schedulers, OneCycleLR and CyclicLR (with cycle_momentum: betas) act on it as on any
optimizer. Under ``torch.amp.GradScaler`` the overflow skip is collective: when any worker's scaled
gradient overflowed, every worker skips the step and every scaler backs off.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import config
from .config import Config
from .errors import CdmpiError
from .stepsize import StepSize

if TYPE_CHECKING:
    from .api import Run

# The optimizer's options, as config keys (validated as the config validates them), and betas =
# (optim.beta1, optim.beta2) and decoupled_weight_decay.
OPTIONS = {"algorithm": "optim.algorithm", "lr": "optim.lr", "eps": "optim.nu", "weight_decay": "optim.weight_decay",
           "warmup_steps": "optim.warmup_steps", "compressor": "compress.name", "ratio": "compress.ratio",
           "k": "compress.k", "block": "compress.block", "compress_warmup_steps": "compress.warmup_steps"}
GROUP_KEYS = ("lr", "weight_decay", "decoupled_weight_decay")  # may differ between param groups

# GradScaler hands an optimizer that handles scaling itself to step(grad_scaler=...): the collective skip
# needs the scaler (its found_inf must be the same on every worker); torch announces another contract.
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)


class DistributedOptimizer(torch.optim.Optimizer):
    """The worker's optimizer: step() encodes the gradient, exchanges frames with the server (or the slice
    servers) and applies the algorithm's update to the model. Make it with run.optimizer()."""

    _step_supports_amp_scaling = True  # GradScaler: step() unscales and skips, collectively

    def __init__(self, run: "Run", params, options: dict):
        if isinstance(params, nn.Module):
            params = [p for p in params.parameters() if p.requires_grad]
        elif isinstance(params, torch.Tensor):
            raise CdmpiError("run.optimizer(params): params must be a module, an iterable of tensors or param "
                             "groups, got one tensor")
        decoupled = bool(options.pop("decoupled_weight_decay", False))
        self.options = optimizer_config(options)  # validated here, on every worker
        optim = self.options.optim
        defaults = {"lr": optim.lr, "betas": (optim.beta1, optim.beta2), "eps": optim.nu,
                    "weight_decay": optim.weight_decay, "decoupled_weight_decay": decoupled}
        self._building = True
        try:
            super().__init__(params, defaults)
        except (TypeError, ValueError, KeyError) as err:
            raise CdmpiError(f"run.optimizer(params): {err}") from None
        self._building = False
        self.run = run
        self._params = [p for group in self.param_groups for p in group["params"]]
        self.flat_params = tuple(self._params)  # in the order of the flat vector
        if not self._params:
            raise CdmpiError("run.optimizer(): no parameters to optimize")
        kinds = {(p.device, p.dtype) for p in self._params}
        if len(kinds) > 1:
            raise CdmpiError(f"run.optimizer(): the parameters live on several devices or dtypes "
                             f"{sorted(map(str, kinds))}; move the model to one device first")
        device, dtype = kinds.pop()
        if dtype not in (torch.float32, torch.float64):
            raise CdmpiError(f"run.optimizer(): parameters must be float32 or float64, got {dtype}")
        self._largest = torch.finfo(dtype).max
        self._check_groups()
        self.ranges = []
        lo = 0
        for group in self.param_groups:
            hi = lo + sum(p.numel() for p in group["params"])
            self.ranges.append((lo, hi))
            lo = hi
        self.flat = torch.cat([p.detach().reshape(-1) for p in self._params]).clone()
        self.flat_grad = torch.zeros_like(self.flat)
        flatten_(self._params, self.flat, self.flat_grad)
        self._grad_views = [p.grad for p in self._params]
        self._backwards = 0  # gradients accumulated since the last step
        for p in self._params:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._count_backward)

    def _count_backward(self, _param) -> None:
        self._backwards += 1

    def add_param_group(self, param_group: dict) -> None:
        if not getattr(self, "_building", False):
            raise CdmpiError("add_param_group(): cdmpi's optimizer keeps every parameter in one flat vector made "
                             "with the optimizer; give every param group to run.optimizer()")
        super().add_param_group(param_group)

    def _check_groups(self) -> None:
        """Keys other than GROUP_KEYS are one value for the whole run: they must agree between groups."""
        first = self.param_groups[0]
        for i, group in enumerate(self.param_groups):
            for key in ("betas", "eps"):
                if tuple(_pair(group[key])) != tuple(_pair(first[key])):
                    raise CdmpiError(f"run.optimizer(): param group {i} has {key} = {group[key]!r}, group 0 "
                                     f"{first[key]!r}; one algorithm steps the whole vector: only "
                                     f"{', '.join(GROUP_KEYS)} may differ between groups")
            for key in ("lr", "weight_decay", "eps"):
                value = group[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                        or value == float("inf"):
                    raise CdmpiError(f"run.optimizer(): param group {i} has {key} = {value!r}; it must be a "
                                     f"finite number >= 0")
                if value > self._largest:  # the update multiplies in the parameters' dtype
                    raise CdmpiError(f"run.optimizer(): {key} = {value!r} does not fit the parameters' "
                                     f"{str(self._params[0].dtype).removeprefix('torch.')} (at most "
                                     f"{self._largest:.4g})")

    # ---- what one step hands to the engine -----------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradients in place (they are views into one flat buffer, so they are never None)."""
        self.flat_grad.zero_()
        for p, view in zip(self._params, self._grad_views):
            p.grad = view

    def gather_grads(self) -> None:
        """Gradients that backward() put elsewhere (after a zero_grad that set them to None) go into the flat
        buffer."""
        for p, view in zip(self._params, self._grad_views):
            if p.grad is None:
                view.zero_()
            elif p.grad is not view:
                view.copy_(p.grad)
            p.grad = view

    def took_no_gradient(self) -> bool:
        """No backward() since the last step, and no gradient written by hand either."""
        return self._backwards == 0 and not bool(self.flat_grad.any())

    def step_size(self) -> float | StepSize:
        """This step's step size from param_groups: one float when every group has the same lr and no
        decoupled decay (the path of a single group), else a StepSize per range."""
        self._check_groups()
        groups = self.param_groups
        optim = self.options.optim
        betas = tuple(_pair(groups[0]["betas"]))
        moved = betas != (optim.beta1, optim.beta2)
        if moved and optim.algorithm == "onebit-adam":
            raise CdmpiError("onebit-adam keeps its betas for the whole run; a scheduler that cycles momentum "
                             "(OneCycleLR, CyclicLR) needs cycle_momentum=False with it")
        if float(groups[0]["eps"]) != optim.nu:
            raise CdmpiError(f"eps changed to {groups[0]['eps']!r} during the run; it is fixed at {optim.nu!r}")
        decay = [float(g["weight_decay"]) if g["decoupled_weight_decay"] else 0.0 for g in groups]
        lrs = [float(g["lr"]) for g in groups]
        if not moved and not any(decay) and all(lr == lrs[0] for lr in lrs):
            return lrs[0]
        return StepSize(tuple((lo, hi, lr, wd) for (lo, hi), lr, wd in zip(self.ranges, lrs, decay)),
                        betas if moved else None)

    def add_coupled_decay(self) -> None:
        """L2 weight decay of the groups without decoupled decay: g += wd x, before compression."""
        for (lo, hi), group in zip(self.ranges, self.param_groups):
            wd = group["weight_decay"]
            if wd and not group["decoupled_weight_decay"]:
                self.flat_grad[lo:hi].add_(self.flat[lo:hi], alpha=wd)

    @torch.no_grad()
    def step(self, closure=None, grad_scaler=None):
        """One step of the run: every worker calls it once per step (GradScaler's step() calls it too)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.run._optimizer_step(self, grad_scaler)
        self._backwards = 0
        return loss

    # ---- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This worker's optimizer state in torch's format (state hooks apply): the algorithm's (moments and
        compression sequences), the step and the hyper-parameters."""
        worker = self.run._job.local_worker(self.run.worker)
        self.state[self._params[0]] = {"algorithm": worker.algorithm.state_dict(), "step": self.run.step,
                                       "d": self.flat.numel()}
        try:
            return super().state_dict()
        finally:
            self.state.clear()

    def load_state_dict(self, state_dict: dict) -> None:
        """A warm start: the hyper-parameters and the algorithm's moments (AMSGrad's m, v, v_hat; 1-bit Adam's
        m and v) from a state_dict. The compression sequences (Markov and error feedback) stay as they are:
        they pair with the server's, which only a checkpoint of the same run restores (launch(resume=...))."""
        worker = self.run._job.local_worker(self.run.worker)
        try:
            saved = next(iter(state_dict["state"].values()))
            if saved["d"] != self.flat.numel():
                raise CdmpiError(f"load_state_dict: the state is of {saved['d']} parameters, this model has "
                                 f"{self.flat.numel()}")
            moments = {k: saved["algorithm"][k] for k in worker.algorithm.moments}
            worker.algorithm.load_state_dict({**worker.algorithm.state_dict(), **moments})
            for group, values in zip(self.param_groups, state_dict["param_groups"]):
                group.update({k: v for k, v in values.items() if k != "params"})
        except (KeyError, TypeError, RuntimeError, StopIteration, AttributeError) as err:
            raise CdmpiError(f"load_state_dict: not a state of this optimizer ({type(err).__name__}: {err})") from None

    def hyper_parameters(self) -> list[dict]:
        return [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]

    def load_hyper_parameters(self, saved: list[dict]) -> None:
        for group, values in zip(self.param_groups, saved):
            group.update(values)


def flatten_(params, flat: torch.Tensor, flat_grad: torch.Tensor) -> None:
    """Make the parameters views into flat, and their .grad views into flat_grad (the layout of
    torch.nn.utils.parameters_to_vector)."""
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat[offset:offset + n].view_as(p)
        p.grad = flat_grad[offset:offset + n].view_as(p)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, the parameters {offset}")


def _pair(value):
    return value if isinstance(value, (tuple, list)) else (value,)


def optimizer_config(options: dict) -> Config:
    """The optim and compress sections from the optimizer's options, validated like a config file."""
    values: dict = {}
    for name, value in options.items():
        if name == "betas":
            try:
                beta1, beta2 = value
            except (TypeError, ValueError):
                raise CdmpiError(f"betas must be a pair (beta1, beta2), got {value!r}") from None
            values.setdefault("optim", {}).update(beta1=beta1, beta2=beta2)
        elif name in OPTIONS:
            section, key = OPTIONS[name].split(".")
            values.setdefault(section, {})[key] = value
        else:
            raise CdmpiError(f"unknown optimizer option {name!r}; the options are betas, decoupled_weight_decay, "
                             f"{', '.join(OPTIONS)}")
    values.setdefault("optim", {}).setdefault("lr", 1e-3)
    try:
        return config.from_dict(values)
    except CdmpiError as err:
        message = str(err)
        for name, key in [*OPTIONS.items(), ("betas[0]", "optim.beta1"), ("betas[1]", "optim.beta2")]:
            message = message.replace(f"config: {key} ", f"{name} ").replace(f"config: {key}", name)
        raise CdmpiError(f"optimizer: {message}") from None
