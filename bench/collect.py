"""Writes results/bench/README.md: results/bench/SUMMARY.md (targets and what limits them, by hand)
followed by every benchmark's table file, in order.

    python bench/collect.py
"""

from common import RESULTS


def main() -> None:
    parts = [(RESULTS / "SUMMARY.md").read_text().rstrip()]
    tables = sorted(RESULTS.glob("[0-9]*_*.md"), key=lambda path: int(path.name.split("_")[0]))  # 10 after 9
    parts += [path.read_text().rstrip() for path in tables]
    (RESULTS / "README.md").write_text("\n\n".join(parts) + "\n")
    print(f"wrote {RESULTS / 'README.md'}")


if __name__ == "__main__":
    main()
