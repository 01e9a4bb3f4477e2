"""The documentation is part of the product, and these tests keep it honest.

- Every ``--long`` option of every command of the Typer app is named somewhere in ``docs/``:
  a new flag without documentation fails here, naming the command and the flag.
- Every fenced ``bash``/``sh``/``console`` block of ``docs/*.md`` and ``README.md`` that runs
  ``klseg`` on ``sample_data/`` is executed, command by command, and must exit as documented.
- The README's first two commands are the ones ``.ci/run`` runs, every page is in
  ``mkdocs.yml``'s nav, and every link and image between the pages resolves.

The conventions for documented commands (``# exit N``, ``# needs: MODULE``, ``# skip:``, the
scratch folder) are explained in docs/development.md, "How the docs are tested".
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
SAMPLE = REPO / "sample_data"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

SHELL_LANGS = {"bash", "sh", "shell", "console"}
COMMAND_TIMEOUT_S = 120


# --- (a) every flag of every command is documented ------------------------------------


def cli_commands():
    """(``"klseg evaluate"``, click command) for the app and every (sub)command."""
    import typer

    from klseg_cli.cli import app

    found = []

    def walk(command, name):
        found.append((name, command))
        for sub_name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, f"{name} {sub_name}")

    walk(typer.main.get_command(app), "klseg")
    return found


def long_flags(command) -> list[str]:
    """Every ``--long`` spelling of the command's options (``--soft-gt``, ``--no-x``)."""
    flags = []
    for param in command.params:
        for opt in [*param.opts, *getattr(param, "secondary_opts", [])]:
            if opt.startswith("--") and opt not in flags:
                flags.append(opt)
    return flags


def docs_text() -> str:
    return "\n".join(page.read_text(encoding="utf-8") for page in sorted(DOCS.glob("*.md")))


def undocumented(flags: list[str], text: str) -> list[str]:
    """The flags that ``text`` never names (``--log`` is not found inside ``--log-base``)."""
    return [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]


def test_the_walk_finds_every_command_and_its_flags():
    names = {name for name, _ in cli_commands()}
    assert {"klseg evaluate", "klseg gate", "klseg compare", "klseg calibrate"} <= names
    assert {"klseg heatmap", "klseg info"} <= names
    evaluate = dict(cli_commands())["klseg evaluate"]
    assert {"--classes", "--require", "--boundary", "--scheduler"} <= set(long_flags(evaluate))


def test_undocumented_finds_a_missing_flag_and_respects_word_ends():
    text = "use `--log-base 2` or --eps; `--allow-missing`."
    assert undocumented(["--log-base", "--eps", "--allow-missing"], text) == []
    assert undocumented(["--log", "--allow", "--e"], text) == ["--log", "--allow", "--e"]


@pytest.mark.parametrize("name", [name for name, _ in cli_commands()])
def test_every_flag_of_every_command_is_in_docs(name):
    command = dict(cli_commands())[name]
    text = docs_text()
    missing = undocumented(long_flags(command), text)
    assert not missing, (
        f"{name}: flags missing from docs/: {', '.join(missing)} "
        "(document them on the command's page; see docs/development.md)"
    )
    if name != "klseg":
        assert name in text, f"{name} is never named in docs/"


# --- (b) documented commands on sample_data run and exit as documented ------------------


@dataclass
class Command:
    line: int  # 1-based line of the page where the command starts
    text: str  # the command, continuation lines joined
    exit_code: int = 0
    skip: str = ""


@dataclass
class Block:
    page: Path
    line: int
    commands: list[Command] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


EXIT = re.compile(r"#\s*exit\s+(\d+)\b")
NEEDS = re.compile(r"#\s*needs:\s*([\w., ]+)")
SKIP = re.compile(r"#\s*skip:\s*(.+)$")


def shell_blocks(page: Path) -> list[tuple[int, list[str]]]:
    """(line of the opening fence, lines) of every ``bash``/``sh``/``console`` block."""
    blocks, current, start, fence = [], None, 0, ""
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if current is None:
            m = re.match(r"(`{3,}|~{3,})\s*([\w-]*)", stripped)
            if m:
                fence, lang = m.group(1), m.group(2).lower()
                current, start = ([] if lang in SHELL_LANGS else False), number
        elif stripped.startswith(fence) and stripped.strip(fence[0]) == "":
            if current is not False:
                blocks.append((start, current))
            current = None
        elif current is not False:
            current.append(line)
    return blocks


def parse_block(page: Path, start: int, lines: list[str]) -> Block:
    block = Block(page, start)
    logical: list[tuple[int, str]] = []
    pending, first = "", 0
    for offset, raw in enumerate(lines, 1):
        text = raw.rstrip()
        if not pending:
            first = start + offset
            text = re.sub(r"^\s*\$\s+", "", text)  # console prompts
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        logical.append((first, pending + text))
        pending = ""
    if pending:
        logical.append((first, pending))
    for number, text in logical:
        needs = NEEDS.search(text)
        if needs:
            block.needs += [m.strip() for m in needs.group(1).split(",") if m.strip()]
        if not re.match(r"\s*klseg\s", text):
            continue
        exit_code = EXIT.search(text)
        skip = SKIP.search(text)
        block.commands.append(
            Command(
                number,
                " ".join(text.split()),
                int(exit_code.group(1)) if exit_code else 0,
                skip.group(1).strip() if skip else "",
            )
        )
    return block


def runnable_blocks(page: Path) -> list[Block]:
    """The blocks with at least one ``klseg`` command on ``sample_data/``: all their
    ``klseg`` commands run, in order, in the page's scratch folder."""
    blocks = [parse_block(page, start, lines) for start, lines in shell_blocks(page)]
    return [b for b in blocks if any("sample_data/" in c.text for c in b.commands)]


ALL_BLOCKS = [block for page in PAGES for block in runnable_blocks(page)]


def test_the_docs_have_commands_to_run():
    """The walk over the fences finds the tour's commands (a parser that finds nothing would
    let every documented command rot)."""
    readme = [c.text for b in runnable_blocks(README) for c in b.commands]
    assert any(t.startswith("klseg evaluate sample_data/predictions") for t in readme)
    assert any(t.startswith("klseg calibrate") for t in readme)
    assert any(c.exit_code == 1 for b in ALL_BLOCKS for c in b.commands)
    assert len(ALL_BLOCKS) >= 8


def test_parse_block_joins_lines_and_reads_markers(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "text\n```bash\n"
        "klseg gate r/summary.json --require 'x' \\\n  --junit g.xml   # exit 1: fails\n"
        "$ klseg info sample_data/a.npy  # needs: scipy, nibabel\n"
        "pip install . && klseg evaluate sample_data/p sample_data/g\n"
        "klseg heatmap a b   # skip: writes a large file\n"
        "```\n```python\nklseg evaluate sample_data/x\n```\n",
        encoding="utf-8",
    )
    (block,) = runnable_blocks(page)
    assert block.line == 2
    assert [(c.line, c.exit_code, c.skip) for c in block.commands] == [
        (3, 1, ""),
        (5, 0, ""),
        (7, 0, "writes a large file"),
    ]
    assert block.commands[0].text.startswith("klseg gate r/summary.json --require 'x' --junit")
    assert block.needs == ["scipy", "nibabel"]


class PageRun:
    """One scratch folder per page, holding a copy of sample_data/ and an empty docs/; its
    blocks run in page order (running block k first runs the blocks before it)."""

    def __init__(self, page: Path, root: Path):
        self.blocks = runnable_blocks(page)
        self.root = root
        self.done: dict[int, str] = {}  # block line -> "" (ran) or why it did not
        shutil.copytree(SAMPLE, root / "sample_data")
        (root / "docs").mkdir()
        bin_dir = root / ".bin"
        bin_dir.mkdir()
        shim = bin_dir / "klseg"  # the klseg of this interpreter, whatever PATH holds
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m klseg_cli "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GITHUB_")}
        self.env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"

    def run_through(self, target: Block) -> str:
        for block in self.blocks:
            if block.line not in self.done:
                self.done[block.line] = "running"
                self.done[block.line] = self.run_block(block)
            if block.line == target.line:
                return self.done[block.line]
        raise AssertionError(f"{target.id} is not a block of this page")

    def run_block(self, block: Block) -> str:
        missing = [m for m in block.needs if importlib.util.find_spec(m) is None]
        if missing:
            return f"needs {', '.join(missing)} (not installed)"
        for command in block.commands:
            if command.skip:
                continue
            where = f"{block.page.relative_to(REPO)}:{command.line}"
            try:
                done = subprocess.run(
                    ["bash", "-c", command.text],
                    cwd=self.root,
                    env=self.env,
                    capture_output=True,
                    text=True,
                    timeout=COMMAND_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired as err:
                message = f"{where}: `{command.text}` ran over {COMMAND_TIMEOUT_S} s"
                raise AssertionError(message) from err
            assert done.returncode == command.exit_code, (
                f"{where}: `{command.text}` exited {done.returncode}, documented "
                f"{command.exit_code}\nstderr: {done.stderr[-2000:]}"
            )
            assert "Traceback" not in done.stderr, f"{where}: {done.stderr[-2000:]}"
        return ""


@pytest.fixture(scope="module")
def page_runs(tmp_path_factory):
    runs: dict[Path, PageRun] = {}

    def get(page: Path) -> PageRun:
        if page not in runs:
            runs[page] = PageRun(page, tmp_path_factory.mktemp(page.stem))
        return runs[page]

    return get


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.id for b in ALL_BLOCKS])
def test_documented_command_runs_as_documented(block, page_runs):
    why_not = page_runs(block.page).run_through(block)
    if why_not == "running":
        pytest.fail(f"{block.id}: an earlier block of the page failed")
    if why_not:
        pytest.skip(f"{block.id}: {why_not}")


# --- (c) the pages hold together ------------------------------------------------------


def test_readme_first_commands_are_what_ci_runs():
    """.ci/run installs and runs exactly what the README's first block says."""
    block = shell_blocks(README)[0][1]
    assert block == [
        "python3 -m venv .venv && . .venv/bin/activate && pip install . && klseg evaluate "
        "sample_data/predictions sample_data/ground_truth --classes sample_data/classes.txt",
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test,fast]' && pytest",
    ]
    assert shell_blocks(DOCS / "index.md")[0][1] == block, "docs/index.md repeats them"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install --quiet -e '.[test,fast]'" in ci
    assert "pip install --quiet .\n" in ci
    assert (
        "klseg evaluate sample_data/predictions sample_data/ground_truth "
        "--classes sample_data/classes.txt\n" in ci
    )


def test_readme_stays_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 400


def test_every_page_is_in_the_mkdocs_nav():
    config = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    nav = set(re.findall(r"^\s*-\s[^:\n]+:\s*(\S+\.md)\s*$", config, flags=re.M))
    assert nav == {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_and_images_resolve(page):
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^(`{3,}|~{3,}).*?^\1", "", text, flags=re.M | re.S)  # not in code
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        path = target.split("#", 1)[0]
        if not path or re.match(r"[a-z]+:", path):
            continue
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: links to missing files: {broken}"


def test_mkdocs_build_strict(tmp_path):
    """Broken links, anchors and pages missing from the nav fail ``mkdocs build --strict``
    (skipped without the ``docs`` extra)."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists()
