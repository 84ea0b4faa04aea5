r"""JSON text as the Go backend's `encoding/json` writes it, and JSON validation as DuckDB's.

Go's rules (checked on junjo-server's span processor, see `docs/design/span-store.md`):
object keys sorted bytewise, compact output, `<`, `>`, `&`, U+2028 and U+2029 escaped as
`\u003c`..., other non-ASCII kept as raw UTF-8, floats in fixed notation for
1e-6 <= |x| < 1e21 and exponent form otherwise (shortest digits), NaN and infinities an
error. Python's C encoder already sorts, escapes control characters the way Go does and
keeps non-ASCII raw, so text without floats takes that fast path and only the HTML
characters are replaced afterwards.
"""

from __future__ import annotations

import _json
import json
import math
import re
from decimal import Decimal
from functools import cache
from typing import TYPE_CHECKING, Final, TypeAlias

if TYPE_CHECKING:
    import duckdb

# Values a converted attribute map holds (Go's map[string]interface{}).
JsonValue: TypeAlias = str | int | float | bool | list["JsonValue"] | dict[str, "JsonValue"] | None

encode_string: Final = json.encoder.encode_basestring  # quoted, escaped, non-ASCII kept


def _unencodable(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not JSON-encodable")


# The C encoder itself (JSONEncoder.encode builds a new one on every call): sorted keys,
# compact, no circular-reference markers (the values are trees we build), and floats never
# reach it. Protobuf strings are valid UTF-8 (upb rejects anything else), so sorting by
# code point is Go's sorting by byte.
_c_encoder: Final = _json.make_encoder(
    None,  # markers
    _unencodable,  # default
    encode_string,
    None,  # indent
    ":",
    ",",
    True,  # noqa: FBT003 (sort_keys)
    False,  # noqa: FBT003 (skipkeys)
    False,  # noqa: FBT003 (allow_nan)
)


def _fast_encode(value: JsonValue) -> str:
    return "".join(_c_encoder(value, 0))


_EXACT_INTEGERS: Final = 2.0**53
_LITERALS: Final = {True: "true", False: "false", None: "null"}


class GoJsonError(ValueError):
    """Go's encoder refuses the value (NaN or an infinity)."""


def html_escape(text: str) -> str:
    """Go's HTML-safe escapes, applied to encoded JSON (the characters occur only in strings)."""
    if "<" in text:
        text = text.replace("<", "\\u003c")
    if ">" in text:
        text = text.replace(">", "\\u003e")
    if "&" in text:
        text = text.replace("&", "\\u0026")
    if "\u2028" in text:
        text = text.replace("\u2028", "\\u2028")
    if "\u2029" in text:
        text = text.replace("\u2029", "\\u2029")
    return text


def go_float(x: float) -> str:
    """A float64 as Go's encoding/json prints it; raises `GoJsonError` for NaN and infinities."""
    if not math.isfinite(x):
        raise GoJsonError(f"unsupported value: {x!r}")
    magnitude = abs(x)
    if magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21):  # noqa: PLR2004 (Go's bounds)
        # Python's repr uses exponent form over this whole range, with Go's shortest digits
        # and at least two exponent digits; Go then trims "e-07" to "e-7".
        text = repr(x)
        if text[-4:-1] == "e-0":
            text = text[:-2] + text[-1]
        return text
    if magnitude < _EXACT_INTEGERS and x.is_integer():  # the exact integer is the shortest
        return "-0" if x == 0 and math.copysign(1, x) < 0 else str(int(x))
    text = repr(x)
    if "e" in text:  # repr's exponent form below 1e-4 and from 1e16: write the digits out
        return format(Decimal(text).normalize(), "f")
    return text.removesuffix(".0")


def _go_encode(value: JsonValue) -> str:
    if isinstance(value, str):
        return encode_string(value)
    if isinstance(value, bool) or value is None:
        return _LITERALS[value]
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, list):
        return "[" + ",".join(_go_encode(item) for item in value) + "]"
    return "{" + ",".join(f"{encode_string(k)}:{_go_encode(value[k])}" for k in sorted(value)) + "}"


def go_json(value: JsonValue, *, has_floats: bool) -> str:
    """`value` encoded as Go's json.Marshal does; raises `GoJsonError` (NaN, infinities).

    `has_floats` says whether any float may be inside: without one, the C encoder does it.
    """
    if value == {}:
        return "{}"
    text = _go_encode(value) if has_floats else _fast_encode(value)
    return html_escape(text)


# A \u escape of a UTF-16 surrogate: Python decodes a lone one, DuckDB rejects it.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89abAB]")


@cache
def _duckdb() -> duckdb.DuckDBPyConnection:
    # Imported here: a conversion worker process needs DuckDB only for rare texts.
    import duckdb  # noqa: PLC0415

    return duckdb.connect(":memory:")


def _duckdb_accepts(text: str) -> bool:
    row = _duckdb().execute("SELECT json_valid(?)", [text]).fetchone()
    return bool(row and row[0])


def duckdb_json_valid(text: str) -> bool:
    """Whether DuckDB's JSON type accepts `text` (what the Go backend could store).

    Python's parser decides the common case; text it rejects (DuckDB also allows trailing
    commas, for one), text with a surrogate escape, and very deep nesting go to DuckDB.
    """
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return _duckdb_accepts(text)
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        return _duckdb_accepts(text)
    return True
