"""Tables, figures and README.md of results/transformer from the metrics files of reproduce.py.

    python results/transformer/make_readme.py runs/transformer results/transformer
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from cdmpi import metrics  # noqa: E402
from cdmpi.plot import method_colour  # noqa: E402

TARGETS = (0.5, 0.9)  # exact-match accuracies of the "to X" columns
BITS_FACTOR, STEPS_FACTOR = 8, 2  # the target: >= 8x fewer bits than AMSGrad to 90%, <= 2x its steps


def colour_of(method) -> str:
    """The paper's methods keep cdmpi's colours (cdmpi.plot.method_colour); each option has its own."""
    algorithm = method.algorithm.split(":")[0]
    return method.colour or method_colour(algorithm, "sharded" if any("sharded" in s for s in method.sets) else "star")


def summarize_run(path: Path) -> dict:
    """What the tables need of one run: its step size and seed, and the step, bits and wall time at which
    its exact-match first reaches each target (None: never), its final exact-match, its curves."""
    run = metrics.read(path)
    ev, train, cfg = run["eval"], run["train"], run["attrs"]["config"]
    bits = ev["bits_up"] + ev["bits_down"]
    wall = dict(zip(train["step"].tolist(), train["wall_time"].tolist()))
    out = {"path": str(path), "lr": cfg["optim"]["lr"], "seed": cfg["run"]["seed"], "final": float(ev["accuracy"][-1]),
           "steps": int(run["attrs"]["steps"]), "eval_step": ev["step"].tolist(), "accuracy": ev["accuracy"].tolist(),
           "bits": bits.tolist(), "algorithm": run["attrs"]["algorithm"], "topology": run["attrs"]["topology"],
           "bits_per_step": float(bits[-1] / ev["step"][-1]) if ev["step"][-1] else math.nan}
    for target in TARGETS:
        hit = np.flatnonzero(ev["accuracy"] >= target)
        step = int(ev["step"][hit[0]]) if hit.size else None
        out[target] = None if step is None else {"step": step, "bits": float(bits[hit[0]]), "wall": wall.get(step)}
    return out


def best_of(summaries: list[dict]) -> dict:
    """The run that reaches 90% in the fewest steps; if none does, the one that ends highest."""
    return min(summaries, key=lambda s: (s[0.9]["step"] if s[0.9] else math.inf, -s["final"]))


def collect(runs: Path):
    from reproduce import METHODS

    out = []
    for method in METHODS:
        grid = [summarize_run(p) for p in sorted((runs / method.key / "grid").glob("*.h5"))]
        if not grid:
            continue
        best = best_of(grid)
        seeds = [best] + [summarize_run(p) for p in sorted((runs / method.key / "seeds").glob("*.h5"))]
        out.append({"method": method, "grid": sorted(grid, key=lambda s: s["lr"]), "best": best, "seeds": seeds})
    return out


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else math.nan


def _num(value: float, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2e}" if kind == "bits" else f"{value:.0f}"


def reach(seeds: list[dict], target: float, what: str):
    """(seeds that reached, the mean of `what` over those seeds)."""
    hits = [s[target][what] for s in seeds if s[target] is not None]
    return len(hits), _mean(hits)


def main_table(results) -> str:
    lines = ["| method | lr | bits / step | to 50%: seeds, steps, bits, s | to 90%: seeds | steps | bits | wall s "
             "| final exact-match (min–max) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        seeds = r["seeds"]
        n50, steps50 = reach(seeds, 0.5, "step")
        _, bits50 = reach(seeds, 0.5, "bits")
        _, wall50 = reach(seeds, 0.5, "wall")
        n90, steps90 = reach(seeds, 0.9, "step")
        _, bits90 = reach(seeds, 0.9, "bits")
        _, wall90 = reach(seeds, 0.9, "wall")
        finals = [s["final"] for s in seeds]
        lines.append(f"| {r['method'].label} | {r['best']['lr']:g} | {_mean([s['bits_per_step'] for s in seeds]):.3g} "
                     f"| {n50}/{len(seeds)}, {_num(steps50, 'steps')}, {_num(bits50, 'bits')}, {_num(wall50, 'wall')} "
                     f"| {n90}/{len(seeds)} | {_num(steps90, 'steps')} | {_num(bits90, 'bits')} | {_num(wall90, 'wall')} "
                     f"| {np.mean(finals):.3f} ({min(finals):.3f}–{max(finals):.3f}) |")
    return "\n".join(lines)


def grid_table(results) -> str:
    lrs = sorted({s["lr"] for r in results for s in r["grid"]})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for r in results:
        cells = {s["lr"]: f"{s['final']:.3f}" + (f" ({s[0.9]['step']})" if s[0.9] else "") for s in r["grid"]}
        lines.append(f"| {r['method'].label} | " + " | ".join(cells.get(lr, "") for lr in lrs) + " |")
    return "\n".join(lines)


def target_check(results) -> tuple[str, list[str]]:
    """Per compressed method: on how many seeds it reaches 90% within STEPS_FACTOR x AMSGrad's mean steps to
    90% and with BITS_FACTOR x fewer bits than AMSGrad's mean bits to 90%."""
    amsgrad = next(r for r in results if r["method"].key == "amsgrad")
    n, steps_ref = reach(amsgrad["seeds"], 0.9, "step")
    _, bits_ref = reach(amsgrad["seeds"], 0.9, "bits")
    lines = [f"AMSGrad (fp32) reaches 90% on {n}/{len(amsgrad['seeds'])} seeds, after {steps_ref:.0f} steps and "
             f"{bits_ref:.3g} bits on average. The target: 90% within {STEPS_FACTOR * steps_ref:.0f} steps and "
             f"{bits_ref / BITS_FACTOR:.3g} bits, on every seed.", "",
             "| method | seeds that meet the target | steps to 90% (each seed) | bits to 90% (each seed) |",
             "|---|---|---|---|"]
    winners = []
    for r in results:
        if r["method"].key == "amsgrad":
            continue
        met = [s for s in r["seeds"] if s[0.9] and s[0.9]["step"] <= STEPS_FACTOR * steps_ref
               and s[0.9]["bits"] <= bits_ref / BITS_FACTOR]
        if len(met) == len(r["seeds"]) == 3:
            winners.append(r["method"].label)
        steps = ", ".join(str(s[0.9]["step"]) if s[0.9] else "–" for s in r["seeds"])
        bits = ", ".join(f"{s[0.9]['bits']:.2e}" if s[0.9] else "–" for s in r["seeds"])
        lines.append(f"| {r['method'].label} | {len(met)}/{len(r['seeds'])} | {steps} | {bits} |")
    return "\n".join(lines), winners


def figure(results, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ["-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (8, 2))]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    reference = {"amsgrad", "cdadam"}  # drawn in both rows, for comparison
    for row, options in enumerate((False, True)):
        shown = [r for r in results if r["method"].option == options or (options and r["method"].key in reference)]
        count = {}
        for r in shown:
            m = r["method"]
            colour = colour_of(m)
            k = count.get(colour, 0)
            count[colour] = k + 1
            steps = np.array(r["seeds"][0]["eval_step"])
            curves = [s["accuracy"] for s in r["seeds"] if len(s["accuracy"]) == len(steps)]
            bits = np.mean([s["bits"] for s in r["seeds"] if len(s["bits"]) == len(steps)], axis=0)
            mean, lo, hi = np.mean(curves, 0), np.min(curves, 0), np.max(curves, 0)
            label = f"{m.label}, lr {r['best']['lr']:g}"
            for ax, x in ((axes[row, 0], steps), (axes[row, 1], bits)):
                ax.plot(x, mean, color=colour, linestyle=styles[k % len(styles)], label=label, lw=1.6)
                ax.fill_between(x, lo, hi, color=colour, alpha=0.12, lw=0)
        axes[row, 0].set_xlabel("step")
        axes[row, 1].set_xlabel("bits communicated (up + down, both workers)")
        axes[row, 1].set_xscale("log")
        axes[row, 1].set_xlim(left=5e7)
        for ax in axes[row]:
            ax.set_ylabel("test exact-match (mean of 3 seeds; band: min–max)")
            ax.axhline(0.9, color="k", lw=0.6, alpha=0.4)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[row, 1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
        axes[row, 0].set_title("the paper's methods" if not options else "CD-Adam's options (with AMSGrad and "
                               "Algorithm 1 for reference)", fontsize=10)
    fig.suptitle("gpt_nano on 2-digit addition, 2 workers x 32 problems a step: each method at its best step size",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")


def diagnosis_section(path: Path) -> str:
    if not path.is_file():
        return "(diagnosis.json is missing: run results/transformer/diagnose.py)"
    results = json.loads(path.read_text())
    lines = ["| variant | steps | upload error | download error | ‖d − g‖²/‖g‖² | cos(d, g) | cos(m, m of g) "
             "| sign agreement of m | exact-match at the end |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows = r["rows"]
        for lo, hi in ((0, 100), (100, 500), (500, len(rows))):
            part = rows[lo:hi]
            if not part:
                continue
            mean = {k: np.mean([row[k] for row in part])
                    for k in ("up_error", "down_error", "gap", "cosine", "momentum_cosine", "sign_agreement")}
            end = f"{r['accuracy']:.3f}" if hi >= len(rows) else ""
            lines.append(f"| {r['label']} | {lo}–{min(hi, len(rows))} | {mean['up_error']:.3f} | "
                         f"{mean['down_error']:.3f} | {mean['gap']:.3f} | {mean['cosine']:.3f} | "
                         f"{mean['momentum_cosine']:.3f} | {mean['sign_agreement']:.3f} | {end} |")
    first = results[0]
    best = max(results[1:], key=lambda r: r["accuracy"] - 1e-3 * ("naive" in r["label"]))  # the best CD-Adam variant
    naive = next((r for r in results if "naive" in r["label"]), None)
    step = "100"  # early: the variants' trajectories have not yet parted far
    shown = [first, best] + ([naive] if naive else [])
    lines += ["", f"Per tensor at step {step}, each run against its own mean gradient g: the relative error "
              f"‖d − g‖/‖g‖ of the direction d the workers' AMSGrad takes, and RMS(√v̂)/RMS(g), AMSGrad's "
              f"denominator against the gradient's scale (above 1: the steps there are shrunk):", "",
              "| tensor | size | RMS of g (Algorithm 1) | " + " | ".join(f"‖d − g‖/‖g‖, {r['label']}" for r in shown)
              + " | " + " | ".join(f"√v̂/g, {r['label']}" for r in shown) + " |",
              "|---|---|---|" + "---|" * (2 * len(shown))]
    by_tensor = [{row["tensor"]: row for row in r["layers"][step]} for r in shown]
    for row in first["layers"][step]:
        mine = [t[row["tensor"]] for t in by_tensor]
        cells = [f"{m['direction_error_rms'] / m['grad_rms']:.2f}" for m in mine]
        cells += [f"{m['v_hat_rms'] / m['grad_rms']:.2f}" for m in mine]
        lines.append(f"| {row['tensor']} | {row['size']} | {row['grad_rms']:.1e} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def commit(runs: Path) -> str:
    """The commit the runs were made at, as their metrics files record it (git describe of the checkout,
    "-dirty" when its working tree had changes)."""
    recorded = {metrics.read(p)["attrs"].get("git_commit") or "unknown" for p in sorted(runs.glob("*/*/*.h5"))}
    commits = sorted({c.removesuffix("-dirty")[:7] for c in recorded})
    return ", ".join(commits) + ("-dirty" if any(c.endswith("-dirty") for c in recorded) else "")


def main(runs_dir: str, out_dir: str) -> None:
    runs, out = Path(runs_dir), Path(out_dir)
    results = collect(runs)
    figure(results, out / "accuracy.png")
    check, winners = target_check(results)
    tables = {"main": main_table(results), "grid": grid_table(results), "check": check,
              "diagnosis": diagnosis_section(out / "diagnosis.json")}
    (out / "tables.md").write_text("\n\n".join(tables.values()) + "\n")
    from discussion import readme

    (out / "README.md").write_text(readme(results, tables, winners, commit(runs)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
