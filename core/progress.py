"""Progress bars that appear on a terminal and nowhere else.

tqdm redraws its bar with carriage returns; in a redirected log (``> run.log 2>&1``, CI, a job scheduler)
every redraw becomes text, thousands of lines of it. Every long loop of the project makes its bar here,
so a bar is drawn only when stderr is a terminal (and the caller did not turn it off), and messages
printed while a bar runs (:func:`write_line`) never tear it.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm import tqdm


def on_terminal() -> bool:
    """Whether stderr (where bars go) is an interactive terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "img", enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, drawn only when ``enabled`` and stderr is a terminal (else a silent one that
    still counts, so callers need no second code path)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not (enabled and on_terminal()),
                dynamic_ncols=True, **kwargs)


def write_line(message: str, file: Any = None) -> None:
    """Print ``message`` on stderr (or ``file``) without breaking a bar that is being drawn."""
    tqdm.write(message, file=file if file is not None else sys.stderr)
