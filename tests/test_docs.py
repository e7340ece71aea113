"""The documentation: the generated configuration reference is current, links resolve, the README is short,
and user documentation tells no development history."""

from __future__ import annotations

import re

from cdmpi import config, reference

from conftest import REPO

USER_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_configuration_reference_is_current():
    assert (REPO / "docs" / "configuration.md").read_text() == reference.markdown(), \
        "docs/configuration.md is stale: run `make docs`"


def test_every_config_key_has_a_meaning():
    rows = [line.split(" | ") for line in reference.markdown().splitlines() if line.startswith("| `")]
    keys = {row[0].strip("| `") for row in rows}
    assert keys == {f"{section}.{key}" for section, table in config.Config().to_dict().items() for key in table}
    missing = [row[0] for row in rows if not row[-1].strip(" |")]
    assert missing == [], f"config keys without a comment in cdmpi/config.py: {missing}"


def test_the_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


def test_links_between_pages_resolve():
    for page in USER_DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_user_documentation_tells_no_development_history():
    for page in USER_DOCS:
        text = page.read_text()
        for pattern in (r"\(Step \d+\)", r"\bStep \d+\b", r"\bas before\b", r"\bNew config keys\b", r"\bno longer\b"):
            assert not re.search(pattern, text), f"{page.name}: {pattern}"
