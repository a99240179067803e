"""JSON Lines input: one JSON value per line, blank lines skipped, and every error names
its file and line."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def read(path: Path, text: str, parse: Callable[[Any], T], error: type[Exception],
         invalid: tuple[type[Exception], ...]) -> Iterator[tuple[Any, T]]:
    """(decoded value, parse(value)) of each non-blank line of `text`; a line that is not
    JSON, or whose parse raises one of `invalid`, raises `error("file:line: why")`."""
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 is JSON
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            yield value, parse(value)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{lineno}: not JSON ({exc.msg})") from None
        except invalid as exc:
            raise error(f"{path}:{lineno}: {exc}") from None
