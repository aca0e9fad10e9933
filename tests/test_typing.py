"""Type checkers see a decorated handler as the function it is (mypy run on a small app)."""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

import batchjobs

APP = '''
from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from batchjobs import JobContext, Registry, flag_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    welcomed: Mapped[bool] = flag_column()


jobs = Registry()


@jobs.flag_job(User.welcomed)
def welcome(user: User, ctx: JobContext) -> str:
    return "sent"


@jobs.backfill(select(User))
def fill(users: list[User]) -> int:
    return len(users)


reveal_type(welcome)
reveal_type(fill)
welcome(User(), "not a context")
'''


def _mypy_env() -> dict[str, str]:
    """mypy finds an installed batchjobs by itself; an editable install it finds through
    MYPYPATH only (it does not follow the import hook), and site-packages may not be there."""
    root = Path(batchjobs.__file__).resolve().parents[1]
    if root in {Path(path).resolve() for path in site.getsitepackages()}:
        return dict(os.environ)
    return {**os.environ, "MYPYPATH": str(root)}


def test_decorated_handlers_keep_their_signature(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is not installed (pip install '.[test]')")
    (tmp_path / "app.py").write_text(APP)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), "app.py"],
        cwd=tmp_path,
        env=_mypy_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout
    # mypy releases differ in whether they name builtins with their module.
    assert re.search(r'Revealed type is "def \(user: app.User, ctx: batchjobs.registry.JobContext\) -> (builtins\.)?str"', out), out
    assert re.search(r'Revealed type is "def \(users: (builtins\.)?list\[app.User\]\) -> (builtins\.)?int"', out), out
    # The checker now catches a wrong call, which it could not see through the decorator before.
    assert 'Argument 2 to "welcome" has incompatible type "str"; expected "JobContext"' in out, out
    assert "Found 1 error" in out, out
