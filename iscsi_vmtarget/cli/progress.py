"""A progress bar for long copies (full clone, unlink, move, fill) on stderr, drawn by
tqdm.

Drawn only where someone watches - stderr is a terminal - or when ``--progress``
asks for it (a log file, a CI run); otherwise silent, so scripts reading stderr see
only errors. tqdm redraws the line in place at most every :data:`REDRAW` seconds (and
once more at the end), so a copy of millions of pieces writes a few hundred updates;
the copies report ``(done, total)`` bytes (:data:`~iscsi_vmtarget.server.admin.PROGRESS_ARG`),
which :class:`ProgressBar` turns into tqdm updates.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from tqdm import tqdm

#: ``moving   [##########--------------------]  33%  1.00MiB / 3.00MiB  52.1MiB/s 00:00``
FORMAT = (
    "{desc:<9}[{bar:30}] {percentage:3.0f}%  {n_fmt}{unit} / {total_fmt}{unit}"
    "  {rate_fmt} {remaining}"
)
REDRAW = 0.1


class ProgressBar:
    """The ``(done, total)`` callback of a copy; its bar appears with the first call."""

    def __init__(self, label: str, *, enabled: bool, stream: TextIO | None = None) -> None:
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self._bar: tqdm | None = None  # type: ignore[type-arg]

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        total = max(total, 1)
        done = min(max(done, 0), total)
        if self._bar is None:
            self._bar = tqdm(
                desc=self.label,
                total=total,
                file=self.stream,
                unit="iB",  # with divisor 1024: KiB, MiB, GiB
                unit_scale=True,
                unit_divisor=1024,
                ascii="-#",
                bar_format=FORMAT,
                mininterval=REDRAW,
                dynamic_ncols=False,
            )
        elif self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        """Draw the bar as it was left and end its line (if one was drawn)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(label: str, forced: bool = False, stream: TextIO | None = None) -> ProgressBar:
    """A bar drawn when ``stream`` (stderr) is a terminal or ``forced`` (--progress)."""
    out = stream if stream is not None else sys.stderr
    tty = getattr(out, "isatty", None)
    return ProgressBar(label, enabled=forced or bool(tty and tty()), stream=out)


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    """``--progress``: the bar of :func:`progress_bar` even off a terminal."""
    p.add_argument(
        "--progress",
        action="store_true",
        help="draw the progress bar even when stderr is not a terminal",
    )
