"""pytest plugin: the ``batchjobs_eager`` fixture (registered through the ``pytest11`` entry point)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest
from sqlalchemy.orm import Session

from batchjobs.registry import Registry
from batchjobs.testing import eager


@pytest.fixture
def batchjobs_eager() -> Iterator[Callable[[Registry, Session], None]]:
    """Call it with your registry and session: until the test ends, commits run their jobs at once."""
    with ExitStack() as stack:
        yield lambda registry, session: stack.enter_context(eager(registry, session))
