"""Benchmark 5: projected step times on 1, 10 and 100 Gbit/s links (5 us latency) from the runs of
bench/end_to_end.py, with `cdmpi project`'s model (README, "cdmpi project").

    python bench/project_table.py [runs/bench/e2e-*.h5 ...] [--bandwidth 1,10,100] [--latency 5e-6]
"""

from __future__ import annotations

import argparse
import glob

from common import publish

from cdmpi import project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*")
    parser.add_argument("--bandwidth", default="1,10,100")
    parser.add_argument("--latency", type=float, default=5e-6)
    args = parser.parse_args()
    files = args.files or sorted(glob.glob("runs/bench/e2e-*.h5"))
    bandwidths = project.parse_list(args.bandwidth, "--bandwidth")
    text = "```\n" + project.format_table(project.rows(files, bandwidths, args.latency), bandwidths) + "\n```"
    publish("5_project", "5. Projected step time on 1, 10 and 100 Gbit/s links", text,
            f"The same as `cdmpi project {' '.join(files)} --bandwidth {args.bandwidth} --latency {args.latency:g}`. "
            "compute and optimizer times come from the runs of benchmark 4, where 5 ranks time-share the "
            "machine's cores, so they are inflated (most for cdadam, whose server step waits for CPU); the "
            "link terms are exact byte counts.")


if __name__ == "__main__":
    main()
