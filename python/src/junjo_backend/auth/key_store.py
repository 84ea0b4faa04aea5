"""API keys: generation and the key store in the `api_keys` table (its CLI: cli/key_commands.py).

Keys are made like the Go backend made them (64 characters of `[0-9A-Za-z]` from a
CSPRNG, URL-safe random ids) and stored in the same table layout, so keys issued by
either backend validate in both. A key is shown once, when it is created; everything
else (listings, logs, errors) names a key by its id or by `key_fingerprint`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import string
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import String, delete, insert, select, type_coerce
from sqlalchemy.exc import SQLAlchemyError

from junjo_backend.database import api_keys
from junjo_backend.failures import describe_error

if TYPE_CHECKING:
    from typing import Any

    from sqlalchemy import Row, Select
    from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

KEY_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
KEY_LENGTH = 64
# The gRPC metadata header the ingestion-service reads the key from.
API_KEY_HEADER = "x-junjo-api-key"
_ID_BYTES = 16  # 22 URL-safe characters, 128 random bits
_FINGERPRINT_HEX_CHARS = 12
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """A stored key as listings show it: never the key itself, only a non-secret hint."""

    id: str
    name: str
    created_at: datetime
    key_hint: str


@dataclass(frozen=True, slots=True)
class NewApiKey:
    """A key just created: the only time the key itself is handed out."""

    id: str
    name: str
    key: str
    created_at: datetime


class ApiKeyStoreError(Exception):
    """The key store could not complete an operation; the message names no key."""


_KEY_RUN = re.compile(f"[{KEY_ALPHABET}]{{{KEY_LENGTH},}}")


def looks_like_api_key(text: str) -> bool:
    """Whether `text` holds something shaped like a key (64 or more of `[0-9A-Za-z]` in a row).

    What a command refuses as a name or an id, and never repeats: a key pasted in the wrong
    place must not be stored where `list` shows it, nor echoed in an error.
    """
    return _KEY_RUN.search(text) is not None


def key_name_problem(name: str) -> str | None:
    """Why `name` cannot name a key, or None; the reason never repeats the name."""
    if not name.strip():
        return "an API key needs a name"
    if looks_like_api_key(name):
        return (
            "the name looks like an API key (64 letters and digits), so it is not stored "
            "(names are shown by `list`); name the key after the app that uses it"
        )
    if any(unicodedata.category(char) in {"Cc", "Cf"} for char in name):
        return "the name holds control characters (they would break `list`)"
    return None


def generate_api_key() -> str:
    """A new key: 64 characters of `[0-9A-Za-z]` from the `secrets` CSPRNG (381 bits)."""
    return "".join(secrets.choice(KEY_ALPHABET) for _ in range(KEY_LENGTH))


def new_key_id() -> str:
    """A random URL-safe id (128 bits) that does not start with "-".

    An id starting with "-" would read as an option on the command line
    (`api-keys revoke -abc`), so such draws are discarded.
    """
    while True:
        key_id = secrets.token_urlsafe(_ID_BYTES)
        if not key_id.startswith("-"):
            return key_id


def key_fingerprint(key: str) -> str:
    """A short, non-reversible name for `key` that is safe to show and to log.

    It is a truncated SHA-256, so it tells issued keys apart without revealing them (an
    issued key has far too much entropy to be found from 48 bits of its hash). A guessable
    string gets a guessable fingerprint, which is why the server never logs the
    fingerprint of a key it does not know.
    """
    digest = hashlib.sha256(b"junjo-api-key:" + key.encode("utf-8", "surrogatepass"))
    return "fp:" + digest.hexdigest()[:_FINGERPRINT_HEX_CHARS]


def _as_utc(value: object) -> datetime:
    """`created_at` as an aware UTC datetime, whichever way a backend stored it.

    Rows written by SQLite's CURRENT_TIMESTAMP, by this module, or by Go's SQLite driver
    (which writes ISO text with nanoseconds and an offset) are all read as text and parsed
    here; PostgreSQL hands back a datetime. Naive values are UTC, as CURRENT_TIMESTAMP is.
    """
    parsed: datetime | None = None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, int | float):
        parsed = datetime.fromtimestamp(value, UTC)
    elif isinstance(value, str):
        text = value.strip()
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            # Go's time.Time.String(): "2006-01-02 15:04:05.999999999 -0700 MST".
            date_time_offset = text.split()[:3]
            try:
                parsed = datetime.fromisoformat(
                    " ".join(date_time_offset[:2]) + "".join(date_time_offset[2:])
                )
            except ValueError:
                log.warning("an API key row has an unreadable created_at")
    if parsed is None:
        return _EPOCH
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


async def create_api_key(engine: AsyncEngine, name: str) -> NewApiKey:
    """Store a new key named `name` and return it (the only time the key is returned)."""
    problem = key_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    name = name.strip()
    created_at = datetime.now(UTC)
    new = NewApiKey(
        id=new_key_id(),
        name=name,
        key=generate_api_key(),
        created_at=created_at,
    )
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(api_keys).values(
                    id=new.id,
                    key=new.key,
                    name=new.name,
                    # Naive UTC, the shape CURRENT_TIMESTAMP writes; a TIMESTAMP WITHOUT
                    # TIME ZONE column in PostgreSQL refuses an aware datetime.
                    created_at=created_at.replace(tzinfo=None),
                )
            )
    except SQLAlchemyError as exc:
        # str(exc) would show the INSERT's parameters, the new key among them.
        raise ApiKeyStoreError(f"could not store the new API key: {describe_error(exc)}") from None
    log.info(
        "API key created", extra={"key_id": new.id, "key_fingerprint": key_fingerprint(new.key)}
    )
    return new


def _listing_query() -> Select[Any]:
    return select(
        api_keys.c.id,
        api_keys.c.name,
        # Read as stored: Go-era rows may hold timestamps SQLAlchemy's SQLite DateTime
        # parser refuses (nanoseconds, offsets).
        type_coerce(api_keys.c.created_at, String).label("created_at"),
        api_keys.c.key,
    )


def _listed(row: Row[Any]) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=row.id,
        name=row.name,
        created_at=_as_utc(row.created_at),
        key_hint=key_fingerprint(row.key),
    )


async def list_api_keys(engine: AsyncEngine) -> list[ApiKeyInfo]:
    """Every stored key, oldest first, each with a hint instead of the key."""
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(_listing_query())).all()
    except SQLAlchemyError as exc:
        raise ApiKeyStoreError(f"could not list API keys: {describe_error(exc)}") from None
    keys = [_listed(row) for row in rows]
    keys.sort(key=lambda info: (info.created_at, info.id))
    return keys


async def revoke_api_key(engine: AsyncEngine, key_id: str) -> bool:
    """Delete the key with id `key_id`; False when there is no such key.

    The Go table has no revoked flag, so revoking is deleting. The auth server stops
    accepting the key within `api_key_cache_max_age_seconds`.
    """
    try:
        async with engine.begin() as conn:
            result = await conn.execute(delete(api_keys).where(api_keys.c.id == key_id))
    except SQLAlchemyError as exc:
        raise ApiKeyStoreError(f"could not revoke the API key: {describe_error(exc)}") from None
    revoked = result.rowcount > 0
    if revoked:
        log.info("API key revoked", extra={"key_id": key_id})
    return revoked


async def find_api_key(engine: AsyncEngine, key: str) -> ApiKeyInfo | None:
    """The stored key equal to `key`, as listings show it; None when there is none."""
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(_listing_query().where(api_keys.c.key == key))).first()
    except SQLAlchemyError as exc:
        reason = describe_error(exc)
        raise ApiKeyStoreError(f"could not look the key up: {reason}") from None
    return None if row is None else _listed(row)
