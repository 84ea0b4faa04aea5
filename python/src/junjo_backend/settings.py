"""The one settings object: environment variables and `.env`, with embedded defaults."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Backend settings. Each field reads the environment variable of its upper-cased name."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # Database. Any SQLAlchemy async URL; PostgreSQL works as postgresql+asyncpg://...
    database_url: str = "sqlite+aiosqlite:///data/junjo.db"

    # Auth server (served to the Go ingestion-service).
    # All interfaces: the ingestion-service reaches us from another container.
    auth_grpc_listen_address: str = "0.0.0.0:50053"
    grpc_shutdown_grace_seconds: float = Field(default=5.0, ge=0)
    grpc_reflection_enabled: bool = False
    # How stale the in-memory view of the api_keys table may get; revocations and new keys
    # take effect within this window. The contract allows at most 1 s.
    api_key_cache_max_age_seconds: float = Field(default=0.5, gt=0, le=1.0)

    # Ingestion client (reads the Go ingestion-service's WAL).
    ingestion_grpc_address: str = "junjo-server-ingestion:50052"
    ingestion_call_timeout_seconds: float = Field(default=30.0, gt=0)
    ingestion_retry_deadline_seconds: float = Field(default=60.0, gt=0)
    ingestion_keepalive_time_seconds: float = Field(default=30.0, gt=0)
    ingestion_max_message_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    ingestion_wait_for_ready: bool = False

    # Span poller.
    poller_enabled: bool = True
    poller_batch_size: int = Field(default=1000, gt=0, le=1_000_000)
    poller_idle_wait_seconds: float = Field(default=1.0, gt=0)
    poller_max_backoff_seconds: float = Field(default=30.0, gt=0)
    # The settle window W: the poller moves past a WAL entry only once its key is this old
    # (the key's ULID time against this host's clock), because the ingestion-service
    # commits entries out of key order. Every entry committed within this horizon of its
    # key's time is delivered; see poller.py. 0 turns the window off (entries can be lost).
    poller_settle_seconds: float = Field(default=1.0, ge=0, le=60)

    # HTTP API and process.
    http_host: str = "0.0.0.0"  # noqa: S104
    http_port: int = Field(default=1323, ge=0, le=65535)
    # How long /health waits for each live probe (database, ingestion-service) before it
    # reports that part as down.
    health_probe_timeout_seconds: float = Field(default=1.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
