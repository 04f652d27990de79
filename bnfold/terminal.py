"""Fitting text to a terminal: lines wrapped at spaces (continuations indented under the line's own
text), words longer than a line (long value names) elided in the middle. Nothing is fitted for a
pipe or a file, where the width is not the reader's, unless COLUMNS says otherwise."""

from __future__ import annotations

import os
import re
import shutil
import sys
from typing import TextIO

MIN_WIDTH = 40
ELLIPSIS = "…"


def width(stream: TextIO | None = None) -> int | None:
    """The width to fit to: COLUMNS when set, the terminal's when ``stream`` is one, else None."""
    if os.environ.get("COLUMNS", "").isdigit():
        return max(MIN_WIDTH, int(os.environ["COLUMNS"]))
    stream = stream or sys.stdout
    if not stream.isatty():
        return None
    return max(MIN_WIDTH, shutil.get_terminal_size().columns)


def elide(word: str, room: int) -> str:
    """``word`` shortened to ``room`` characters by cutting its middle (both ends tell most)."""
    if len(word) <= room:
        return word
    if room < 3:
        return word[:room]
    head = (room - 1) // 2
    return word[:head] + ELLIPSIS + word[len(word) - (room - 1 - head) :]


def fit(line: str, columns: int) -> list[str]:
    """``line`` as lines of at most ``columns`` characters: broken at spaces (the spaces between
    words kept where the line goes on, so that columns stay aligned as far as they fit)."""
    if len(line) <= columns:
        return [line]
    indent = len(line) - len(line.lstrip(" "))
    more = " " * min(indent + 4, columns // 2)
    out: list[str] = []
    current = line[:indent]
    for gap, word in re.findall(r"( *)(\S+)", line[indent:]):
        joined = current + (gap if current.strip() else "") + word
        if len(joined) <= columns:
            current = joined
            continue
        if current.strip():
            out.append(current)
            current = more
        current += elide(word, max(columns - len(current), 1))
    out.append(current)
    return out
