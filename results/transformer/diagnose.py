"""Why CD-Adam stalls on the transformer workload: measurements taken inside the engine, step by step.

Runs CD-Adam variants of configs/transformer/addition.toml, and AMSGrad with naive compression, in
process (the engine reads every worker's vectors there) and, after every step's update, measures
  - the upload compression error ||C(x) - x||^2 / ||x||^2 with x = g_i - g_hat_i (CD-Adam) or x = g_i
    (naive compression), the mean over the workers,
  - the download compression error, x = g_hat - g_tilde on the server (CD-Adam) or x = the mean of the
    workers' frames (naive),
  - the gap ||d - g||^2 / ||g||^2 between the direction d the workers' AMSGrad takes (g_tilde for
    CD-Adam) and the true mean gradient g of the step, and their cosine,
  - the cosine of the workers' momentum m with the momentum of the true gradients (their EMA with beta1),
    and the share of the true momentum's |mass| on coordinates where m has its sign,
  - per parameter tensor: the RMS of g, of d - g and of sqrt(v_hat), AMSGrad's denominator (at a few steps).
Writes diagnosis.json and diagnosis.png into the output folder.

    python results/transformer/diagnose.py --steps 1500 --out results/transformer
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cdmpi import config, metrics, train  # noqa: E402
from cdmpi.transport import LocalTransport  # noqa: E402

CONFIG = ROOT / "configs" / "transformer" / "addition.toml"
# label -> (the method of reproduce.py it is, for its colour; --set overrides on top of CD-Adam at the config's
# step size)
VARIANTS = {
    "scaled sign (Algorithm 1)": ("cdadam", []),
    "scaled sign per block of 64": ("cdadam-block64", ["compress.block=64"]),
    "two-level sign": ("cdadam-two-level", ['compress.name="two_level_sign"']),
    "two-level sign per block of 64": ("cdadam-two-level-block64", ['compress.name="two_level_sign"', "compress.block=64"]),
    "fp32 warm-up of 100 steps": ("cdadam-warmup", ["compress.warmup_steps=100"]),
    "AMSGrad, naive compression (scaled sign)": ("amsgrad-naive", ['optim.algorithm="amsgrad-naive"',
                                                                   'compress.name="scaled_sign"', "optim.lr=0.003"]),
}
LAYER_STEPS = (10, 100, 500, 1000, 1500)  # steps at which the per-tensor scales are kept


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    den = float(den @ den)
    return float(num @ num) / den if den > 0 else float("nan")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / max(float(a.norm() * b.norm()), 1e-300)


def _sign_agreement(m: torch.Tensor, true: torch.Tensor) -> float:
    """The share of |true|'s mass on coordinates where m has true's sign: the update -lr m / sqrt(v_hat)
    has m's signs, so this is how much of a sign-descent step goes downhill (0.5: a coin)."""
    weight = true.abs()
    return float((weight * (torch.sign(m) == torch.sign(true))).sum() / weight.sum().clamp(min=1e-300))


class Probe:
    """The observer: snapshots before each step, the measurements after it. CD-Adam's errors come from its
    Markov states; naive compression's from its compressors applied to the step's vectors; the direction d
    the workers' AMSGrad takes is g_tilde (CD-Adam) or read back from the momentum, d = (m_t - beta1
    m_{t-1}) / (1 - beta1)."""

    def __init__(self, training, names_sizes):
        self.engine = training.engine
        self.setting = training.engine.exchange.setting
        self.server = training.engine.exchange.server
        self.markov = hasattr(self.server, "g_tilde")
        self.names_sizes = names_sizes
        self.rows: list[dict] = []
        self.layers: dict[int, list[dict]] = {}
        self.true_momentum = None  # the EMA of the true mean gradients, as uncompressed AMSGrad's m would be here
        self._snapshot()

    def _snapshot(self):
        workers = self.engine.workers
        self.momentum = workers[0].algorithm.amsgrad.exp_avg.double().clone()
        if self.markov:
            self.g_hat_i = [w.algorithm.g_hat.value.double().clone() for w in workers]
            self.g_tilde_server = self.server.g_tilde.value.double().clone()

    def _errors(self, grads):
        """(upload error averaged over the workers, download error)."""
        if self.markov:
            up = np.mean([_ratio(gi - w.algorithm.g_hat.value.double(), gi - before)
                          for gi, w, before in zip(grads, self.engine.workers, self.g_hat_i)])
            g_hat, g_tilde = self.server.g_hat.value.double(), self.server.g_tilde.value.double()
            return up, _ratio(g_hat - g_tilde, g_hat - self.g_tilde_server)
        sent = [self.setting.up(gi) for gi in grads]
        mean = torch.stack(sent).mean(0)
        return (np.mean([_ratio(c - gi, gi) for c, gi in zip(sent, grads)]),
                _ratio(self.setting.down(mean) - mean, mean))

    def __call__(self, t, inputs):
        grads = [s.grad.double() for s in inputs]
        g = torch.stack(grads).mean(0)
        up, down = self._errors(grads)
        worker = self.engine.workers[0].algorithm
        if self.markov:
            direction = worker.g_tilde.value.double()
        else:
            beta1 = self.setting.optim.beta1
            direction = (worker.amsgrad.exp_avg.double() - beta1 * self.momentum) / (1 - beta1)
        beta1 = self.setting.optim.beta1
        self.true_momentum = (g * (1 - beta1) if self.true_momentum is None
                              else self.true_momentum * beta1 + g * (1 - beta1))
        self.rows.append({"step": t, "up_error": up, "down_error": down, "gap": _ratio(direction - g, g),
                          "cosine": _cosine(direction, g), "grad_norm_sq": float(g @ g),
                          "momentum_cosine": _cosine(worker.amsgrad.exp_avg.double(), self.true_momentum),
                          "sign_agreement": _sign_agreement(worker.amsgrad.exp_avg.double(), self.true_momentum)})
        if t + 1 in LAYER_STEPS:
            out, lo = [], 0
            v_hat = worker.amsgrad.max_exp_avg_sq.double()
            for name, size in self.names_sizes:
                part, err = g[lo:lo + size], (direction - g)[lo:lo + size]
                out.append({"tensor": name, "size": size, "grad_rms": float(part.norm()) / size ** 0.5,
                            "direction_error_rms": float(err.norm()) / size ** 0.5,
                            "v_hat_rms": float(v_hat[lo:lo + size].mean()) ** 0.5})  # the RMS of sqrt(v_hat)
                lo += size
            self.layers[t + 1] = out
        self._snapshot()


def measure(label: str, overrides: list[str], steps: int, out_dir: Path) -> dict:
    cfg = config.load(CONFIG, [f"run.steps={steps}", 'optim.algorithm="cdadam"', *overrides])  # later sets win
    path = out_dir / f"{'_'.join(overrides) or 'algorithm_1'}.h5".replace('"', "")
    training = train.build(cfg, LocalTransport(cfg.run.workers), out=path, overwrite=True)
    module = training.drivers[0].shard.module
    probe = Probe(training, [(n, p.numel()) for n, p in module.named_parameters()])
    training.engine.observers.append(probe)
    training.run()
    accuracy = float(metrics.read(path)["eval"]["accuracy"][-1])
    print(f"{label}: test exact-match {accuracy:.3f} after {steps} steps", file=sys.stderr)
    return {"label": label, "overrides": overrides, "accuracy": accuracy, "rows": probe.rows,
            "layers": {str(k): v for k, v in probe.layers.items()}}


def figure(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("up_error", "upload: $\\|C(x)-x\\|^2/\\|x\\|^2$, $x = g_i - \\hat g_i$"),
            ("down_error", "download: $\\|C(x)-x\\|^2/\\|x\\|^2$, $x = \\hat g - \\tilde g$"),
            ("gap", "$\\|d - g\\|^2 / \\|g\\|^2$ ($d$: the direction used, $g$: the true mean gradient)"),
            ("cosine", "cosine of $d$ and $g$"),
            ("momentum_cosine", "cosine of $m$ and the EMA of the true $g$"),
            ("sign_agreement", "|mass| of the true EMA where $m$ has its sign")]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_readme import colour_of
    from reproduce import METHODS

    colours = {m.key: colour_of(m) for m in METHODS}
    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
    axes = list(axes.flat)
    for ax, (key, title) in zip(axes, keys):
        for r in results:
            steps = np.array([row["step"] for row in r["rows"]])
            values = np.array([row[key] for row in r["rows"]])
            window = 25  # a running mean: single steps are noisy
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, label=r["label"], lw=1.2, color=colours[r["method"]])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if "error" in key or key == "gap":
            ax.set_yscale("log")
            ax.set_ylim(0.05, 2)  # the warm-up's fp32 steps (errors about 1e-15) lie below the axis
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8, loc="upper right")
    fig.suptitle("CD-Adam and naive compression on 2-digit addition (gpt_nano, 2 workers): what the compression does to the direction "
                 "(running mean over 25 steps)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="steps of each variant (default 1500)")
    parser.add_argument("--out", default="results/transformer", help="folder of diagnosis.json and .png")
    parser.add_argument("--runs", default="runs/transformer-diagnose", help="folder of the runs' metrics files")
    args = parser.parse_args()
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    results = [{**measure(label, overrides, args.steps, runs), "method": key}
               for label, (key, overrides) in VARIANTS.items()]
    (out / "diagnosis.json").write_text(json.dumps(results))
    figure(results, out / "diagnosis.png")


if __name__ == "__main__":
    main()
