"""README.md and docs/ stay true to the code: key layout, environment variables, worker options,
the systemd unit, the extras the install commands name, and every relative link."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

import rtq.backend.keys
from conftest import ROOT
from rtq.cli import _parser

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
SRC = ROOT / "src" / "rtq"
INTERNAL_ENV = {"RTQ_TEST_PAUSE_AFTER_MOVE", "RTQ_TEST_PAUSE_IN_OUTCOME"}  # test hooks, not configuration


def _section(text: str, title: str) -> str:
    """The body of the ``## title`` section of a Markdown text."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no '## {title}' section"
    return m.group(1)


def _code_blocks(text: str, lang: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)]


def test_key_layout_table_matches_keys_module() -> None:
    documented = re.findall(r"^``(<p>\|<s>\|[^`]+)``", rtq.backend.keys.__doc__ or "", re.M)
    assert len(documented) >= 10, documented
    table = _section(README.read_text(), "Key layout")
    in_readme = re.findall(r"^\| `(<p>\|<s>\|[^`]+)` \|", table, re.M)
    assert sorted(in_readme) == sorted(documented)
    # and keys.py builds exactly those names
    keys = rtq.backend.keys.Keys("<p>", "<s>")
    built = {
        keys.queue("<name>"), keys.task("<id>"), keys.frame("<id>", "<frame>"), keys.listen("<name>"),
        keys.done("<id>"), keys.events("<id>"),
        keys.running("<worker>"), keys.landing("<worker>", "<n>"), keys.landings("<worker>"),  # type: ignore[arg-type]
        keys.worker("<worker>"), keys.workers(), keys.dead(), keys.inbox("<client>"),
        keys.session("<sid>"), keys.session_opens("<worker>"), keys.session_queue("<worker>", "<sid>"),
        keys.failures(),
        keys.blob("<digest>", "<i>"),  # type: ignore[arg-type]
    }  # fmt: skip
    assert built == set(documented)


def test_every_environment_variable_is_documented() -> None:
    used = {v for f in SRC.rglob("*.py") for v in re.findall(r"RTQ_[A-Z_]+", f.read_text())}
    used |= set(re.findall(r"RTQ_[A-Z_]+", (ROOT / "binder" / "start").read_text()))
    used |= {"RTQ_TEST_REDIS_URL"}  # read by tests/conftest.py
    used -= INTERNAL_ENV
    readme = _section(README.read_text(), "Configuration")
    config = (ROOT / "docs" / "configuration.md").read_text()
    for var in sorted(used):
        assert f"`{var}`" in readme, f"README Configuration does not list {var}"
        assert f"`{var}`" in config, f"docs/configuration.md does not list {var}"


def test_every_worker_option_is_documented() -> None:
    worker = next(a for a in _parser()._actions if a.dest == "command").choices["worker"]  # type: ignore[union-attr]
    table = _section((ROOT / "docs" / "workers.md").read_text(), "Options")
    for action in worker._actions:
        for flag in action.option_strings:
            if flag != "-h" and flag != "--help":
                assert f"`{flag}" in table, f"docs/workers.md Options lacks {flag}"


@pytest.mark.parametrize("page", [README, ROOT / "docs" / "workers.md"], ids=lambda p: p.name)
def test_systemd_unit_gives_the_worker_more_time_than_its_grace(page: Path) -> None:
    (unit,) = [b for b in _code_blocks(page.read_text(), "ini") if "[Service]" in b]
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["KillSignal"] == "SIGTERM"
    argv = shlex.split(settings["ExecStart"])
    assert Path(argv[0]).name == "rtq"
    args = _parser().parse_args(argv[1:])  # the command line is one rtq accepts
    assert args.command == "worker" and args.gpus == "all"
    assert float(settings["TimeoutStopSec"]) > args.grace, "systemd would SIGKILL before the grace period ends"


def test_install_commands_name_existing_extras() -> None:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is Python 3.11+")
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for page in [README, *DOCS]:
        for spec in re.findall(r'-e "\.\[([a-z,]+)\]"', page.read_text()):
            for extra in spec.split(","):
                assert extra in extras, f"{page.name}: pip install names the unknown extra {extra!r}"
    assert 'python -m pip install -e ".[demo]" && rtq demo' in README.read_text()
    assert 'python -m pip install -e ".[test]" && python -m pytest' in README.read_text()


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", _without_code(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def _without_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def test_relative_links_resolve() -> None:
    for page in [README, *DOCS]:
        text = _without_code(page.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: broken link {target}"
            if anchor and dest.suffix == ".md":
                assert anchor in _anchors(dest.read_text()), f"{page.name}: no heading for #{anchor} in {dest.name}"
