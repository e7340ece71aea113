"""docs/configuration.md, made from the config dataclasses and the comments beside their fields, so the
reference cannot drift from the code: `python -m cdmpi.reference > docs/configuration.md` (`make docs`);
tests/test_docs.py fails when the committed page is not what this writes."""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import tokenize
import typing

from . import config

SECTIONS = {
    "run": "The run: its length, seed, precision, threads and how often it logs.",
    "data": "The data set and how workers sample it.",
    "problem": "The objective: nonconvex logistic regression (Section 7.1), a network on images (Section 7.2) "
               "or a cheap quadratic for benchmarks.",
    "optim": "The algorithm and its hyper-parameters.",
    "compress": "The compressor of the frames (both ways).",
    "checkpoint": "Checkpoints and the checks of the workers' copies of x.",
    "comm": "Devices, the topology, and how ranks wait.",
}


def field_comments(cls) -> dict[str, str]:
    """Each field's comment in the class's source: the comments on the lines just above it, then the one
    after it on its own line."""
    source = inspect.getsource(cls)
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in source.splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# ").rstrip())
            continue
        tokens = list(tokenize.generate_tokens(io.StringIO(text + "\n").readline))
        if len(tokens) > 2 and tokens[0].type == tokenize.NAME and tokens[1].string == ":":
            after = [t.string.lstrip("# ").rstrip() for t in tokens if t.type == tokenize.COMMENT]
            comments[tokens[0].string] = " ".join(above + after)
        above = []
    return comments


def _type(hint) -> str:
    if typing.get_origin(hint) is tuple:
        return f"array of {typing.get_args(hint)[0].__name__}"
    return {str: "string", int: "int", float: "float", bool: "bool"}.get(hint, str(hint))


def _value(value) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def markdown() -> str:
    out = ["# Configuration", "",
           "A run's config is a TOML file of these sections (`configs/` has the paper's); every key has a default,",
           "so a file names only what it changes. `--set SECTION.KEY=VALUE` overrides a key from the command line",
           "(the value is TOML; a bare word is a string). Unknown keys, values of the wrong type, and values out of",
           "range (nan and inf included) are errors that name the key. A run of your own loop takes the `run`,",
           "`checkpoint` and `comm` keys that apply to it in `cdmpi.launch(settings=...)`",
           "([own-model.md](own-model.md)), and the optimizer's in `run.optimizer(...)`.", "",
           "This page is generated from `cdmpi/config.py` (`make docs`); `tests/test_docs.py` keeps it current.", ""]
    hints = typing.get_type_hints(config.Config)
    for section, description in SECTIONS.items():
        cls = hints[section]
        comments = field_comments(cls)
        field_hints = typing.get_type_hints(cls)
        out += [f"## `[{section}]`", "", description, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"| `{section}.{f.name}` | {_type(field_hints[f.name])} | `{_value(default)}` | "
                       f"{comments.get(f.name, '').replace('|', chr(92) + '|')} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
