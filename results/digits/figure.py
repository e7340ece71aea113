"""Figure and table of the digits comparison from its metrics files (run by results/digits/reproduce.sh)."""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cdmpi import metrics  # noqa: E402
from cdmpi.plot import method_colour  # noqa: E402

TARGET = 0.90  # test accuracy for the "to 90%" columns


def main(runs_dir: str, out_dir: str) -> None:
    files = sorted(Path(runs_dir).glob("*.h5"))
    fig, (by_bits, by_steps) = plt.subplots(1, 2, figsize=(11, 4.6))
    styles = {}  # a second run of one method (1-bit Adam's two nu) gets another line style
    rows = []
    for path in files:
        r = metrics.read(path)
        ev, attrs = r["eval"], r["attrs"]
        optim = attrs["config"]["optim"]
        sharded = ", sharded" if attrs.get("topology") == "sharded" else ""
        label = f"{attrs['algorithm']} ({attrs['compressor']}{sharded}, lr {optim['lr']:g}, nu {optim['nu']:g})"
        bits = ev["bits_up"] + ev["bits_down"]
        colour = method_colour(attrs["algorithm"], attrs.get("topology", "star"))
        count = styles.get(colour, 0)
        style, styles[colour] = ["-", "--", ":"][count % 3], count + 1
        last, planned = int(r["train"]["step"][-1]), int(attrs["steps"])
        stopped = last < planned  # cdmpi ends a run at its first non-finite gradient
        shown = label + (" (stopped: non-finite gradient, x)" if stopped else "")
        by_bits.plot(bits[1:], ev["accuracy"][1:], label=shown, color=colour, linestyle=style)
        by_steps.plot(ev["step"], ev["accuracy"], label=shown, color=colour, linestyle=style)
        if stopped:  # where the run ended
            by_bits.plot(bits[-1:], ev["accuracy"][-1:], "x", color=colour, markersize=9, markeredgewidth=2)
            by_steps.plot(ev["step"][-1:], ev["accuracy"][-1:], "x", color=colour, markersize=9, markeredgewidth=2)
        hit = [i for i, a in enumerate(ev["accuracy"]) if a >= TARGET]
        if stopped:
            label += f" (stopped by a non-finite gradient; last row at step {last})"
        rows.append((label, ev["accuracy"][-1], ev["accuracy"].max(), r["train"]["loss"][-1], int(bits[-1]),
                     int(ev["step"][hit[0]]) if hit else None, int(bits[hit[0]]) if hit else None))
    by_bits.set_xscale("log")
    by_bits.set_xlabel("bits sent and received by all workers")
    by_steps.set_xlabel("steps")
    for ax in (by_bits, by_steps):
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    handles, names = by_steps.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=8, frameon=False)  # below: covers no curve
    fig.suptitle("Small CNN on scikit-learn digits, 4 workers, 60 epochs")
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(Path(out_dir) / "accuracy.png", dpi=120)
    lines = ["| method | last test accuracy | best | final train loss | total bits | steps to 90% | bits to 90% |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, final, best, loss, bits, steps90, bits90 in rows:
        lines.append(f"| {label} | {final:.4f} | {best:.4f} | {loss:.4f} | {bits:.3e} | "
                     f"{steps90 if steps90 is not None else 'never'} | "
                     f"{f'{bits90:.3e}' if bits90 is not None else 'never'} |")
    (Path(out_dir) / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:])
