"""results/network/README.md and step_time.png from results.json (written by bench/network.py).

    python results/network/make_readme.py [results/network/results.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from cdmpi import project  # noqa: E402
from cdmpi.plot import method_colour  # noqa: E402

ALLREDUCE = "AMSGrad, fp32 ring Allreduce"
RATES = {"100mbit": 0.1, "1gbit": 1.0, "10gbit": 10.0, "none": None}
COLOURS = {"CD-Adam, star": method_colour("cdadam"), "CD-Adam, sharded": method_colour("cdadam", "sharded"),
           "AMSGrad, fp32 frames (star)": method_colour("amsgrad"), ALLREDUCE: method_colour("amsgrad", "allreduce"),
           "1-bit Adam (after 1 warm-up step)": method_colour("onebit-adam"), "EF21 (top-k 1.6%)": method_colour("ef21")}


def ms(s: float) -> str:
    return f"{1e3 * s:,.0f}"


def predicted(entry: dict, name: str, gbit: float | None) -> float | None:
    if gbit is None:
        return None
    r = entry[name]
    if name == ALLREDUCE:
        m = {"compute": r["median"]["compute"], "update": r["median"]["update"], "n_workers": r["n_workers"],
             "dim": r["dim"]}
        return project.ring_allreduce_step(m, gbit, 0.0)
    return project.star_step(r["model"], gbit, 0.0)


def rate_table(rate: str, entry: dict) -> str:
    gbit = RATES.get(rate)
    head = ("| method | median step ms | compute | encode | gather | aggregate | broadcast | update | "
            "bytes per step on the busiest link | metric bytes per logged step at rank 0 | "
            "`cdmpi project` ms | project / measured |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in entry.items():
        if name == "check":
            continue
        md = r["median"]
        p = predicted(entry, name, gbit)
        ratio = f"{p / md['step']:.2f}" if p else "–"
        if name == ALLREDUCE:
            lines.append(f"| {name} | {ms(md['step'])} | {ms(md['compute'])} | – | {ms(md['allreduce'])} (Allreduce) "
                         f"| – | – | {ms(md['update'])} | {2 * r['link_nbytes_per_step']:,.0f} | – | "
                         f"{ms(p) if p else '–'} | {ratio} |")
        else:
            lines.append(f"| {name} | {ms(md['step'])} | {ms(md['compute'])} | {ms(md['encode'])} | {ms(md['gather'])} "
                         f"| {ms(md['aggregate'])} | {ms(md['broadcast'])} | {ms(md['update'])} | "
                         f"{r['model']['link_bytes']:,.0f} | {r['metrics_nbytes_per_logged_step']:,.0f} | "
                         f"{ms(p) if p else '–'} | {ratio} |")
    return "\n".join(lines)


def figure(results: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    shaped = [r for r in ("100mbit", "1gbit", "10gbit") if r in results["rates"]]
    names = [n for n in COLOURS if all(n in results["rates"][r] for r in shaped)]
    for name in names:
        xs = [RATES[r] for r in shaped]
        ys = [results["rates"][r][name]["median"]["step"] for r in shaped]
        ax.plot(xs, ys, "o-", color=COLOURS[name], label=name)
        if "none" in results["rates"] and name in results["rates"]["none"]:
            ax.axhline(results["rates"]["none"][name]["median"]["step"], color=COLOURS[name], ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link rate of every node (Gbit/s, tc tbf)")
    ax.set_ylabel("median step (s)")
    ax.set_title(f"Step time against link rate: quadratic, d = {results['dim']:,}, {results['workers']} workers\n"
                 "(dotted: the same run on unshaped links)", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def targets(results: dict) -> str:
    entry = results["rates"].get("1gbit", {})
    if ALLREDUCE not in entry:
        return ""
    ring = entry[ALLREDUCE]["median"]["step"]
    lines = ["| method | median step at 1 Gbit/s | / fp32 ring Allreduce | target | met |", "|---|---|---|---|---|"]
    for name, goal in (("CD-Adam, sharded", 0.1), ("CD-Adam, star", 0.2)):
        if name in entry:
            ratio = entry[name]["median"]["step"] / ring
            lines.append(f"| {name} | {ms(entry[name]['median']['step'])} ms | {ratio:.2f} | <= {goal:g} | "
                         f"{'yes' if ratio <= goal else 'no'} |")
    return "\n".join(lines)


def digits_table(results: dict) -> str:
    lines = ["| link | method | steps to 90% | wall s to 90% | bits to 90% | final accuracy | wall s of the run |",
             "|---|---|---|---|---|---|---|"]
    for rate, methods in results.get("digits", {}).items():
        for name, r in methods.items():
            lines.append(f"| {rate} | {name} | {r.get('step_to_90', 'never')} | "
                         f"{r['wall_to_90']:.1f} | {r['bits_to_90']:.3e} | {r['final_accuracy']:.4f} | "
                         f"{r['wall_seconds']:.0f} |" if "step_to_90" in r else
                         f"| {rate} | {name} | never | - | - | {r['final_accuracy']:.4f} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def metrics_table(results: dict) -> str:
    lines = ["| link | rows | wall s per step | metric bytes per logged step at rank 0 | frame bytes per step at rank 0 "
             "| cost of the rows |", "|---|---|---|---|---|---|"]
    for rate, cases in results.get("metrics_cost", {}).items():
        base = cases.get("first and last step only", {}).get("wall_per_step")
        for label, r in cases.items():
            cost = f"{(r['wall_per_step'] - base) / r['wall_per_step']:.0%} of the step" \
                if base and label != "first and last step only" else "-"
            lines.append(f"| {rate} | {label} ({r['rows']} rows) | {r['wall_per_step']:.4f} | "
                         f"{r['metrics_nbytes_per_logged_step']:,.0f} | {r['frame_nbytes_per_step']:,.0f} | {cost} |")
    return "\n".join(lines)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results.json"
    results = json.loads(path.read_text())
    figure(results, HERE / "step_time.png")
    parts = []
    for rate, entry in results["rates"].items():
        if len(entry) <= 1:
            continue
        check = " ".join(entry.get("check", []))
        parts.append(f"### {rate if rate != 'none' else 'unshaped links'}\n\nThroughput check: `{check}`\n\n"
                     f"{rate_table(rate, entry)}\n")
    parts.append(f"### Targets (4 workers, d = {results['dim']:,}, 1 Gbit/s)\n\n{targets(results)}\n")
    parts.append(f"### Digits to 90% test accuracy\n\n{digits_table(results)}\n")
    parts.append(f"### The cost of metric rows\n\n{metrics_table(results)}\n")
    tables = "\n".join(parts)
    Path(HERE / "tables.md").write_text(tables)
    commands = "\n".join(f"    {c}" for c in results.get("commands", []))
    readme = f"""# Step time on links slower than memory: an emulated cluster

Regenerate everything here (about 20 minutes on the 2-core development machine, as root: the full
`bench/network.py` run below took 1,212 s) with

    make reproduce-network     # bench/network.py, then results/network/make_readme.py

These files came from

{commands}

at commit 5836492 (the 1-bit Adam row at 100 Mbit/s was run again alone at 9c8681d: its first run shared the
cores with another job), then `python results/network/make_readme.py`.

Setup: `bench/netcluster.sh` makes {results['workers'] + 1} network namespaces n1..n{results['workers'] + 1}, one per MPI rank (rank 0, the
server, on n1), each on its own veth link shaped in both directions by tc's token bucket to the rate; MPICH
talks TCP over those links only (UCX_TLS=tcp,self). Every node shares this machine's 2 cores, so ranks
wait sleeping (`comm.wait = "sleep"`). Each cdmpi method is `cdmpi train bench/quadratic.toml` with
problem.dim = {results['dim']:,} (ResNet-18's size), float32, {results['workers']} workers, {results['steps']} steps, rows at the first and last
step only; the tables give the median over the steps of each phase and of the whole step
(timing/*_median: a logged step is not a typical one) and the bytes on the busiest link per step: rank 0's
frames and control words in and out (star), a worker's inbound slices (sharded), each checked against the
frame-size formula by the benchmark. The fp32 ring Allreduce is `bench/ring_allreduce.py` on n1..n{results['workers']} (the
same gradient and AMSGrad step, outside the engine, which has no Allreduce). `cdmpi project` is fed each
run's median phases and the nominal rate (no latency term).

![step time against link rate](step_time.png)

{tables}
"""
    discussion = HERE / "discussion.md"
    if discussion.exists():
        readme += "\n" + discussion.read_text()
    (HERE / "README.md").write_text(readme)
    print(readme)


if __name__ == "__main__":
    main()
