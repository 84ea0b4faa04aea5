"""argparse, but its errors never repeat what could be an API key.

argparse echoes what it could not use (`error: unrecognized arguments: <the full key>` after
`api-keys check KEY`). `KeySafeParser` writes its errors as our one line, `error: ...`
first on stderr (usage after it), exit 2, with every value from the command line that is
not a word of the grammar replaced by its length, unless it is too short to be a key or a
useful piece of one.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING, ClassVar, NoReturn

from junjo_backend.auth.key_store import looks_like_api_key

if TYPE_CHECKING:
    from collections.abc import Sequence

# Values shorter than this are shown (a mistyped action, `--timeout abc`): the fault suite
# treats 12 characters of a key as a leak, and no key is shorter than 64.
_SHOWN_BELOW = 12
_EXIT_USAGE = 2


def _hidden(value: str) -> str:
    return f"<{len(value)} characters, not shown>"


class KeySafeParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors hide the command line's values (its sub-parsers too)."""

    # The words being parsed; set by `parse_command_line`, shared by every sub-parser.
    argv: ClassVar[tuple[str, ...]] = ()

    def error(self, message: str) -> NoReturn:
        """`error: MESSAGE` (values hidden), then the usage, on stderr; exit 2."""
        shown, key_like = self._without_values(message)
        hint = (
            " (it looks like an API key: keys are never arguments; `api-keys check` reads "
            "one on stdin)"
            if key_like
            else ""
        )
        sys.stderr.write(f"error: {shown}{hint}\n")
        self.print_usage(sys.stderr)
        sys.exit(_EXIT_USAGE)

    def _without_values(self, message: str) -> tuple[str, bool]:
        words = self._grammar_words()
        values = sorted(
            {arg for arg in self.argv if arg not in words and len(arg) >= _SHOWN_BELOW},
            key=len,
            reverse=True,
        )
        key_like = False
        for value in values:
            key_like = key_like or looks_like_api_key(value.partition("=")[2] or value)
            # As written, and as repr() shows it inside quotes (escapes and all).
            for form in (repr(value), repr(value)[1:-1], value):
                message = message.replace(form, _hidden(value))
        # A value argparse reshaped (`--opt=VALUE` split): no run of key characters survives.
        message = re.sub(r"[0-9A-Za-z]{64,}", lambda m: _hidden(m.group()), message)
        return message, key_like

    def _grammar_words(self) -> set[str]:
        """Option strings, command names and choices of this parser and its sub-parsers."""
        words: set[str] = set()
        stack: list[argparse.ArgumentParser] = [self]
        while stack:
            parser = stack.pop()
            for action in parser._actions:  # noqa: SLF001 (argparse has no public walk)
                words.update(action.option_strings)
                if isinstance(action.choices, dict):
                    words.update(action.choices)
                    stack.extend(action.choices.values())
        return words


def parse_command_line(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """`parser.parse_args(argv)`, its errors as `KeySafeParser` writes them."""
    KeySafeParser.argv = tuple(sys.argv[1:] if argv is None else argv)
    return parser.parse_args(argv)
