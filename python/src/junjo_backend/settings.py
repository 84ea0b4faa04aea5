"""The one settings object: environment variables and `.env`, with embedded defaults.

The defaults are for a local run: everything listens on and dials 127.0.0.1 (as the
OpenTelemetry Collector moved its defaults from 0.0.0.0 to localhost). Containers set
`AUTH_GRPC_LISTEN_ADDRESS=0.0.0.0:50053`, `HTTP_HOST=0.0.0.0` and
`INGESTION_GRPC_ADDRESS=junjo-server-ingestion:50052` themselves.

Every field carries a description: `junjo-backend serve --help` prints them, so the help and
the settings cannot drift apart.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from junjo_backend.addresses import MAX_PORT, parse_address
from junjo_backend.database import sqlite_database

# URL schemes that hosting platforms hand out, and the async driver each one needs.
_ASYNC_DRIVERS = {
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}
_SUPPORTED_DRIVERS = frozenset({"postgresql+asyncpg", "sqlite+aiosqlite"})


def _check_address(value: str) -> str:
    parse_address(value)
    return value.strip()


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def _log_level(value: object) -> object:
    """Any case; `WARN` (Go's slog, the OpenTelemetry Collector) is read as WARNING."""
    level = _upper(value)
    return "WARNING" if level == "WARN" else level


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _blank_is_unset(value: object) -> object:
    # `SPAN_API_TOKEN=` in a .env is no token, not an empty one anybody could send.
    return None if isinstance(value, str) and not value.strip() else value


Address = Annotated[str, AfterValidator(_check_address)]

# Secrets, marked on their Field (`json_schema_extra={"secret": SECRET}`): `junjo-backend
# config` and any other report of the settings mask them. SECRET hides the whole value,
# SECRET_URL only the URL's password. (A `SecretStr` field is masked whole as well.)
SECRET = "whole"  # noqa: S105 (a marker's name, not a password)
SECRET_URL = "url-password"  # noqa: S105 (a marker's name)

# DuckDB's memory_limit syntax: a number and a unit (it reads 1000- and 1024-based units:
# B, KB ... TB, KIB ... TIB).
_MEMORY_LIMIT = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([KMGT])(I?))?B", re.IGNORECASE)


def memory_limit_bytes(value: str) -> float | None:
    """The bytes a DuckDB memory_limit such as 256MB or 1.5GiB names; None if it is no size."""
    found = _MEMORY_LIMIT.fullmatch(value.strip())
    if found is None:
        return None
    number, prefix, binary = found.groups()
    base = 1024 if binary else 1000
    power = "BKMGT".index(prefix.upper()) if prefix else 0
    return float(number) * float(base**power)


def _check_memory_limit(value: str) -> str:
    if memory_limit_bytes(value) is None:
        raise ValueError("expected a size such as 256MB or 1GB")
    return value.strip()


def _refuse_ambiguous_credentials(value: str) -> None:
    """Refuse a URL whose password a parser could split in the wrong place.

    With `p@ss/word` as the password, SQLAlchemy reads `user:p@ss/word@host/db` as password
    `p` and host `ss`, and a masked URL would then show the rest of the password. More than
    one `@` after `scheme://` (where a host follows, so not a `sqlite:///file`) is taken as
    such a URL; the message echoes none of it.
    """
    _scheme, sep, rest = value.partition("://")
    if sep and not rest.startswith("/") and rest.count("@") > 1:
        raise ValueError(
            "cannot be parsed: it holds more than one '@' (a user name or password with "
            "@, /, :, ? or # must be percent-encoded: @ as %40, / as %2F, : as %3A)"
        )


def async_database_url(value: str) -> str:
    """`value` with an async driver.

    `postgres://` and `postgresql://` (what hosting platforms hand out) become
    `postgresql+asyncpg://`, `sqlite://` becomes `sqlite+aiosqlite://`; a driver we cannot
    run is a ValueError naming it, and so is a SQLite spelling `sqlite_database` refuses.
    """
    _refuse_ambiguous_credentials(value.strip())
    try:
        url = make_url(value.strip())
    except ArgumentError:
        raise ValueError(
            "not a database URL (expected e.g. sqlite+aiosqlite:///data/junjo.db or "
            "postgresql+asyncpg://user:password@host/db)"
        ) from None
    driver = url.drivername
    if driver in _ASYNC_DRIVERS:
        url = url.set(drivername=_ASYNC_DRIVERS[driver])
    elif driver not in _SUPPORTED_DRIVERS:
        raise ValueError(
            f"driver {driver!r} is not supported (use sqlite+aiosqlite:// or postgresql+asyncpg://)"
        )
    rendered = url.render_as_string(hide_password=False)
    sqlite_database(rendered)  # a SQLite spelling that names no one file is refused here
    return rendered


SpanStoreChoice = Literal["auto", "duckdb", "database", "none"]

# What SPAN_STORE=auto means with PostgreSQL: the PostgreSQL store (store/postgres_store.py).
AUTO_STORE_WITH_POSTGRESQL: Literal["database", "none"] = "database"


class Settings(BaseSettings):
    """Backend settings. Each field reads the environment variable of its upper-cased name."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", validate_default=True
    )

    # Database.
    database_url: Annotated[str, AfterValidator(async_database_url)] = Field(
        default="sqlite+aiosqlite:///data/junjo.db",
        description="SQLAlchemy URL of the API key and checkpoint database; a relative SQLite "
        "path is relative to the working folder; postgres:// URLs get the asyncpg driver",
        json_schema_extra={"secret": SECRET_URL},
    )
    database_connect_timeout_seconds: float = Field(
        default=10.0, gt=0, description="how long opening a database connection may take"
    )

    # Auth server (served to the Go ingestion-service).
    auth_grpc_listen_address: Address = Field(
        default="127.0.0.1:50053",
        description="where the auth gRPC server listens (port 0: any free port); containers "
        "set 0.0.0.0:50053, the address the ingestion-service dials",
    )
    grpc_shutdown_grace_seconds: float = Field(
        default=5.0, ge=0, description="grace for in-flight calls when the gRPC server stops"
    )
    grpc_reflection_enabled: bool = Field(
        default=False, description="serve gRPC server reflection on the auth server"
    )
    # The contract allows at most 1 s.
    api_key_cache_max_age_seconds: float = Field(
        default=0.5,
        gt=0,
        le=1.0,
        description="how stale the in-memory view of api_keys may get (at most 1); a revoked "
        "key stops validating within it",
    )

    # Ingestion client (reads the Go ingestion-service's WAL).
    ingestion_grpc_address: Address = Field(
        default="127.0.0.1:50052",
        description="the ingestion-service's internal gRPC address (containers: "
        "junjo-server-ingestion:50052)",
    )
    ingestion_call_timeout_seconds: float = Field(
        default=30.0, gt=0, description="deadline of each ReadSpans call"
    )
    ingestion_retry_deadline_seconds: float = Field(
        default=60.0,
        gt=0,
        description="overall deadline for retrying an unreachable ingestion-service (restarts "
        "on progress)",
    )
    ingestion_keepalive_time_seconds: float = Field(
        default=30.0, gt=0, description="HTTP/2 keepalive ping interval to the ingestion-service"
    )
    ingestion_max_message_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0, description="largest ReadSpansResponse accepted"
    )
    ingestion_wait_for_ready: bool = Field(
        default=False, description="let calls wait for the channel instead of failing fast"
    )

    # Span poller.
    poller_enabled: bool = Field(default=True, description="run the span poller")
    # Each commit of the checkpoint is a synchronous SQLite transaction in rollback-journal
    # mode, several fsyncs: at 1,000 spans a commit the poller drained at ~0.5x a Go
    # client, at 10,000 ~0.7-0.8x (benchmarks/drain_bench.py). A read that ends commits
    # what it has, so a large batch adds no latency at low rates; a crash re-delivers at
    # most one batch.
    poller_batch_size: int = Field(
        default=10_000,
        gt=0,
        le=1_000_000,
        description="spans per checkpoint commit (at most; a read that ends commits the rest)",
    )
    poller_idle_wait_seconds: float = Field(
        default=1.0, gt=0, description="pause once the WAL is drained (never while behind)"
    )
    poller_max_backoff_seconds: float = Field(
        default=30.0, gt=0, description="ceiling of the retry backoff after errors"
    )
    # The ingestion-service commits entries out of key order: docs/design/settle-window.md.
    poller_settle_seconds: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="settle window: the poller passes a WAL entry only once its key is this "
        "old; every entry committed within it of its key's time is delivered (0: off, "
        "entries can be lost)",
    )

    poller_leader_retry_seconds: float = Field(
        default=3.0,
        gt=0,
        le=300,
        description="replicas on one database: how often a standby tries to become the one "
        "replica that drains (and how often the leader checks its lock connection)",
    )
    poller_leader_lease_seconds: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="replicas on PostgreSQL: a leader that has not renewed its lease for this long "
        "(a frozen process) has its sessions ended by a standby, which takes over",
    )

    # Span store (where drained spans go; README "Span store").
    span_store: Annotated[SpanStoreChoice, BeforeValidator(_lower)] = Field(
        default="auto",
        description="where drained spans are kept: auto (DuckDB with a SQLite DATABASE_URL; "
        "with PostgreSQL, the PostgreSQL store, in the checkpoint's transaction), duckdb, "
        "database (PostgreSQL only) or none (count only: keeps nothing)",
    )
    span_store_duckdb_path: str = Field(
        default="otel_data.db",
        min_length=1,
        description="the DuckDB file (the Go backend's name); a relative path is relative to "
        "the SQLite database's folder; the image sets /data/otel_data.db",
    )
    span_store_duckdb_memory_limit: Annotated[str, AfterValidator(_check_memory_limit)] = Field(
        default="256MB", description="DuckDB's memory_limit for the span store, e.g. 256MB, 1GB"
    )
    # Test-only: the fault suite's "SIGKILL between commits" row needs the process to die
    # exactly between the store's commit and the checkpoint's, which no outside signal can
    # aim at. Never set it in a deployment.
    test_only_sigkill_after_store_commits: int = Field(
        default=0,
        ge=0,
        description="TEST ONLY (fault suite): SIGKILL this process after this many span store "
        "commits, before their checkpoint commits; 0: off",
    )

    # HTTP API and process.
    http_host: str = Field(
        default="127.0.0.1", description="where the HTTP API listens (containers: 0.0.0.0)"
    )
    http_port: int = Field(
        default=1323, ge=0, le=MAX_PORT, description="HTTP API port (0: any free port)"
    )
    # SecretStr: masked in repr and in every dump of the settings.
    span_api_token: Annotated[SecretStr | None, BeforeValidator(_blank_is_unset)] = Field(
        default=None,
        description="bearer token for the span read routes (/otel/...) when HTTP_HOST is not "
        "loopback; unset, they answer 403 there (on loopback they are open)",
    )
    http_header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="how long a connection may take to deliver a complete request head "
        "(from its opening or the previous response); slower ones are closed (slow-loris)",
    )
    http_max_connections: int = Field(
        default=1000, gt=0, description="open HTTP connections beyond this are closed at once"
    )
    health_probe_timeout_seconds: float = Field(
        default=1.0,
        gt=0,
        description=(
            "how long /health waits for its database probe (start-up: for the ingestion-service)"
        ),
    )
    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_log_level)
    ] = Field(default="INFO", description="DEBUG, INFO, WARN (or WARNING) or ERROR (any case)")
    log_format: Annotated[Literal["text", "json"], BeforeValidator(_lower)] = Field(
        default="text", description="text (logfmt) or json (one object per line)"
    )

    _notes: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _note_rewritten_url(cls, data: object, handler: ValidatorFunctionWrapHandler) -> Settings:
        """Remember a note when DATABASE_URL's driver was rewritten to an async one."""
        settings = handler(data)
        if not isinstance(settings, Settings):  # pragma: no cover - pydantic's contract
            raise TypeError("settings validation returned another type")
        given = data.get("database_url") if isinstance(data, dict) else None
        if isinstance(given, str):
            before = make_url(given.strip()).drivername
            after = make_url(settings.database_url).drivername
            if before != after:
                settings._notes = [f"DATABASE_URL: {before}:// rewritten to {after}://"]  # noqa: SLF001 (its own class)
        return settings

    @model_validator(mode="after")
    def _check_span_store(self) -> Settings:
        """Refuse a span store the database cannot go with (one line naming SPAN_STORE)."""
        postgres = make_url(self.database_url).get_backend_name() == "postgresql"
        if self.span_store == "duckdb" and postgres:
            raise ValueError(
                "SPAN_STORE: duckdb cannot go with a PostgreSQL DATABASE_URL: replicas fail "
                "over between hosts and a DuckDB file cannot follow them (use auto or database)"
            )
        if self.span_store == "database" and not postgres:
            raise ValueError(
                "SPAN_STORE: database needs a PostgreSQL DATABASE_URL (with SQLite use auto "
                "or duckdb)"
            )
        return self

    @property
    def span_store_kind(self) -> Literal["duckdb", "database", "none"]:
        """What SPAN_STORE resolves to for this DATABASE_URL (auto decided)."""
        if self.span_store == "duckdb" or self.span_store == "database":  # noqa: PLR1714 (narrows)
            return self.span_store
        if self.span_store == "none":
            return "none"
        if make_url(self.database_url).get_backend_name() == "postgresql":
            return AUTO_STORE_WITH_POSTGRESQL
        return "duckdb"

    @property
    def notes(self) -> list[str]:
        """Informational lines about how the settings were read (e.g. a rewritten URL)."""
        return list(self._notes)


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message (one line) names it."""


def describe_validation_error(error: ValidationError) -> str:
    """One line naming each bad setting (as its environment variable) and why."""
    parts = []
    for problem in error.errors(include_url=False):
        name = ".".join(str(part) for part in problem["loc"]).upper()
        message = str(problem["msg"]).removeprefix("Value error, ")
        if not name:
            # A check across settings (a model validator): its message names them itself.
            parts.append(message)
            continue
        value = problem.get("input")
        # A database URL can carry a password: never echo it.
        echo = isinstance(value, str | int | float) and name != "DATABASE_URL"
        shown = f" (got {value!r})" if echo and repr(value) not in message else ""
        parts.append(f"{name}: {message}{shown}")
    return "; ".join(parts)


def load_settings() -> Settings:
    """Read the settings; a bad value is a `SettingsError` with one line naming the setting."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
