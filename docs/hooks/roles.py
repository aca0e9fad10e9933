"""MkDocs hook: Sphinx roles in docstrings (:func:`name`) shown as plain code in the API reference.

The docstrings use reST roles, which Markdown renders as the role's name followed by the code;
only the code is kept.
"""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc):(<code\b)")


def on_page_content(html: str, **_: Any) -> str:
    return ROLE.sub(r"\1", html)
