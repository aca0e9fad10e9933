"""Every ```python block of every page under docs/ runs, so the documentation cannot drift from the code.

The blocks of one page run in order, in one namespace, in a fresh temporary directory as the
working directory (pages make their own SQLite files there). A block whose first line is
``# file: NAME.py`` is the text of a module the reader saves: it is written to that file, not run,
and later blocks import it. Each page runs in a Python process of its own. A page whose blocks import a package that is not installed (a recipe
for Flask or FastAPI) is skipped, naming the package.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
FILE = re.compile(r"# file: ([\w/]+\.py)\n")


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, source) of each ```python block of the page, in order."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start()) + 2, match.group(1)) for match in BLOCK.finditer(text)]


def pages() -> list[Path]:
    return sorted(page for page in DOCS.rglob("*.md") if python_blocks(page))


def saved_file(source: str) -> str | None:
    """The file a ``# file: NAME.py`` block is saved as."""
    match = FILE.match(source)
    return match.group(1) if match else None


def missing_modules(blocks: list[tuple[int, str]]) -> list[str]:
    """Top-level modules the blocks import that are not installed, not part of Python, and not saved by the page."""
    saved = {Path(name).parts[0].removesuffix(".py") for _, source in blocks if (name := saved_file(source))}
    names: set[str] = set()
    for _, source in blocks:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return sorted(
        name
        for name in names - saved
        if name not in sys.stdlib_module_names and importlib.util.find_spec(name) is None
    )


def test_docs_have_python_examples() -> None:
    assert len(pages()) >= 10, "docs/ lost its runnable pages"


# Runs in a fresh interpreter, as a reader's script would: nothing imported by the test session
# (other tests' apps, their metadata, batchjobs' submodules) leaks into a page.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for path, line, source in json.load(sys.stdin):
    # Padded so that a traceback points at the page's own line.
    exec(compile("\\n" * (line - 1) + source, path, "exec"), namespace)
"""


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(DOCS)))
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    blocks = python_blocks(page)
    missing = missing_modules(blocks)
    if missing:
        pytest.skip(f"{page.name} needs {', '.join(missing)}, not installed")
    runnable = []
    for line, source in blocks:
        name = saved_file(source)
        if name:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(source, encoding="utf-8")
        else:
            runnable.append((str(page), line, source))
    env = {**os.environ, "BATCHJOBS_STATE_DIR": str(tmp_path / "state"), "PYTHONPATH": str(tmp_path)}
    for name in ("BATCHJOBS_DATABASE_URL", "DATABASE_URL", "BATCHJOBS_APP", "SMTP_URL"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(runnable),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{page.name} failed:\n{result.stdout}{result.stderr}"


def test_api_reference_covers_every_public_name() -> None:
    import batchjobs

    reference = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: batchjobs\.(\w+)$", reference, re.MULTILINE))
    assert set(batchjobs.__all__) - documented == set()


def test_nav_lists_every_page() -> None:
    nav = (DOCS.parent / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r":\s*([\w/-]+\.md)\s*$", nav, re.MULTILINE))
    assert {str(page.relative_to(DOCS)) for page in DOCS.rglob("*.md")} == listed


def test_console_commands_use_real_options() -> None:
    """Every `$ batchjobs ...` line of the docs names a real command with real options."""
    from click.testing import CliRunner

    from batchjobs.cli import main

    console = re.compile(r"^```console\n(.*?)^```", re.MULTILINE | re.DOTALL)
    checked, wrong = 0, []
    for page in sorted(DOCS.rglob("*.md")):
        for block in console.findall(page.read_text(encoding="utf-8")):
            for line in block.splitlines():
                if not line.startswith("$ batchjobs "):
                    continue
                words = shlex.split(line[2:].split("  #")[0])
                # --help is eager: the command line is parsed (unknown commands and options fail),
                # then help is printed instead of running anything.
                result = CliRunner().invoke(main, [*words[1:], "--help"])
                checked += 1
                if result.exit_code != 0:
                    wrong.append(f"{page.name}: {line}: {result.output.strip().splitlines()[-1]}")
    assert checked >= 30
    assert not wrong, "\n".join(wrong)


def test_shown_migrate_output_names_the_newest_revision() -> None:
    """The pages show `batchjobs migrate` reaching batchjobs' newest revision, as it does."""
    versions = DOCS.parent / "migrations" / "versions"
    newest = max(path.name.split("_")[0] for path in versions.glob("[0-9]*.py"))
    shown = re.compile(r"^\s*batchjobs tables (?:upgraded from revision \S+ to|are up to date \(revision|at revision) (\d+)", re.MULTILINE)
    found = {
        (page.name, revision) for page in sorted(DOCS.rglob("*.md")) for revision in shown.findall(page.read_text(encoding="utf-8"))
    }
    assert len(found) >= 4, found
    assert {revision for _, revision in found} == {newest}, found
