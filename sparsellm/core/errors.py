"""The one exception type the CLI turns into a one-line message (exit status 2), and a check that raises it."""

from __future__ import annotations

import shutil
from pathlib import Path


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and what to do."""


def require_free_space(folder: Path, needed: int, what: str, advice: str) -> None:
    """Refuse in one line, before any work, when `folder`'s disk has fewer than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(
            f"{what} needs about {needed / 2**20:.0f} MB on its disk, which has {free / 2**20:.0f} MB free; {advice}"
        )
