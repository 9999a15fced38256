"""A progress bar for long copies (full clone, unlink, move) on stderr.

Drawn only where someone watches - stderr is a terminal - or when ``--progress``
asks for it (a log file, a CI run); otherwise silent, so scripts reading stderr see
only errors. The bar is redrawn in place (carriage return) and only when what it
shows changes, so a copy of millions of pieces writes a few hundred updates.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

_WIDTH = 30


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


class ProgressBar:
    """``moving   [##########--------------------]  33%  1.0 GiB / 3.0 GiB``"""

    def __init__(self, label: str, *, enabled: bool, stream: TextIO | None = None) -> None:
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self._shown: tuple[int, int] | None = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        total = max(total, 1)
        done = min(max(done, 0), total)
        percent = done * 100 // total
        filled = done * _WIDTH // total
        if self._shown == (percent, filled):
            return
        self._shown = (percent, filled)
        bar = "#" * filled + "-" * (_WIDTH - filled)
        line = f"\r{self.label:<9}[{bar}] {percent:3d}%  {_human(done)} / {_human(total)}"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line (if one was drawn)."""
        if self._shown is not None:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = None

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
