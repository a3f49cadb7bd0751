"""The documentation: README on one screen with the two set-up commands, every link
between the docs resolving (files and #anchors, as GitHub makes them), and the reference
complete — every command, every `kscan run` option and every event type documented.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kscan.shipped import contrib_path
from scanner.commands.config import config_keys, subparser
from scanner.commands.parser import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces → '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out: set[str] = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = re.match(r"^(#{1,6}) (.*)$", line)
        if m and not in_code:
            out.add(slug(m.group(2)))
    return out


def test_readme_is_one_screen_with_the_two_set_up_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 60, len(lines)
    first = "\n".join(lines[:35])
    assert "    tools/demo" in first and "    tools/test" in first
    for name in ("install", "quickstart", "libvirt", "fleets", "operating", "design",
                 "threat-model"):
        assert f"(docs/{name}.md)" in "\n".join(lines), name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page: Path) -> None:
    bad = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, bad


def test_every_command_is_in_the_commands_table() -> None:
    text = (ROOT / "docs" / "quickstart.md").read_text()
    table = text[text.index("## Commands"):]
    for name in build_parser().commands:
        assert f"| `kscan {name}" in table, name


def test_every_run_option_is_documented() -> None:
    text = "\n".join(p.read_text() for p in DOCS)
    run = subparser(build_parser(), "run")
    for dest, option in run.options.items():
        if dest == "help":
            continue
        flag = next(f for f in option.action.option_strings
                    if f.startswith("--") and not f.startswith("--no-"))
        assert flag in text, flag
        if option.kind == "boolean":  # the --no- form, said once for all of them
            assert f"`{dest.replace('_', '-')}`" in text or f"`{dest}`" in text, dest
    # Each key of the configuration file is in the shipped example too.
    example = contrib_path("kscan.toml.example").read_text()
    for key in config_keys(run):
        assert f"# {key} = " in example, key


def test_every_event_type_is_documented() -> None:
    schema = json.loads(contrib_path("events.schema.json").read_text())
    text = (ROOT / "docs" / "operating.md").read_text()
    missing = [e for e in schema["properties"]["event"]["enum"] if f"`{e}`" not in text]
    assert not missing, missing
