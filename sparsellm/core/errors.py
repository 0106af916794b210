"""The one exception type the CLI turns into a one-line message (exit status 2), and the checks that raise it."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def reading(what: str):
    """Any error of the readers below (transformers, safetensors, gguf, json, pickle) as one line naming `what`.

    Only around reading a user's files: what fails there is the file, not sparsellm.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read {what}: {first[:300]}") from e
