"""Our side of the auth contract: the real AuthServer over a real SQLite key store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from junjo_backend.auth.key_store import create_api_key
from junjo_backend.auth.server import AuthServer
from junjo_backend.database import close_engine, create_engine, init_schema
from tests.settings_factory import backend_settings

if TYPE_CHECKING:
    from pathlib import Path

    from sqlalchemy.ext.asyncio import AsyncEngine


class AuthBackend:
    """An AuthServer on a fixed loopback port that can go down and come back on that port."""

    def __init__(self, database_path: Path, port: int) -> None:
        self.settings = backend_settings(
            f"sqlite+aiosqlite:///{database_path}",
            auth_grpc_listen_address=f"127.0.0.1:{port}",
            grpc_shutdown_grace_seconds=0.5,
        )
        self._engine: AsyncEngine | None = None
        self._server: AuthServer | None = None

    @property
    def engine(self) -> AsyncEngine:
        """The key store's engine (open between `open` and `close`)."""
        if self._engine is None:
            raise RuntimeError("AuthBackend is not open")
        return self._engine

    @property
    def serving(self) -> bool:
        """Whether the auth server is up."""
        return self._server is not None and self._server.running

    async def open(self) -> None:
        """Create the database file and its tables (no server yet)."""
        self._engine = create_engine(self.settings.database_url)
        await init_schema(self._engine)

    async def create_key(self, name: str) -> str:
        """A new API key in the database; the key itself."""
        return (await create_api_key(self.engine, name)).key

    async def start(self) -> None:
        """Serve ValidateApiKey on the port; a new AuthServer each time (a stopped one stays so)."""
        if self.serving:
            return
        self._server = AuthServer(self.settings, self.engine)
        await self._server.start()

    async def stop(self) -> None:
        """Stop serving; the database stays."""
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None

    async def close(self) -> None:
        """Stop serving and close the database."""
        await self.stop()
        if self._engine is not None:
            await close_engine(self._engine)
            self._engine = None
