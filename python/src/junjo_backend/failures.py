"""How the backend tells a failure in a log field or an `error:` line: never with SQL parameters.

str() of a SQLAlchemy statement error includes the statement's parameters, which for an
INSERT into api_keys is the new key; the driver's own message (`orig`) does not. Every
description of a caught exception goes through here, whatever raised it.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, SQLAlchemyError


def describe_error(exc: BaseException) -> str:
    """`Type: message` (the driver's for a database error), never a statement's parameters."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f"{type(exc.orig).__name__}: {exc.orig}"
    if isinstance(exc, SQLAlchemyError):
        return type(exc).__name__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def error_line(exc: BaseException) -> str:
    """`describe_error`'s first line: what a one-line field or message holds."""
    lines = describe_error(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
