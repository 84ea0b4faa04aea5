"""A throwaway PostgreSQL cluster for tests: its own folder, a free port, a child process.

Used by the auth tests (a session-wide cluster) and the fault suite (a cluster it stops and
restarts under load). PostgreSQL refuses to run as root, so under root it runs as `nobody`,
through `setpriv`: with Popen's own `user=`, Python must fork() rather than vfork(), and in
a process whose threads are busy in gRPC such a child crashed before exec (SIGSEGV, exit
-11; grpc logs "Other threads are currently calling into gRPC, skipping fork() handlers")
in 2 of 4 runs of the fault suite's restart scenario. setpriv switches the user after exec.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest
from sqlalchemy import text

from harness.waiting import NeverHappenedError, free_port, wait_until_sync
from junjo_backend.database import close_engine, create_engine
from tests.auth.postgres_binaries import find_pg_tool, missing_postgres

if TYPE_CHECKING:
    from collections.abc import Iterator

_PG_READY = "database system is ready to accept connections"


def as_user(user: str | None) -> list[str]:
    """A command prefix that runs the rest as `user` (setpriv execs, so the pid stays)."""
    if user is None:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("util-linux's `setpriv` is needed to run PostgreSQL under root")
    account = pwd.getpwnam(user)
    return [setpriv, f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups"]


class PostgresCluster:
    """A PostgreSQL server on 127.0.0.1, a child of this process, data in a temporary folder.

    `postgres` runs directly (not through pg_ctl, whose daemon would be nobody's child),
    so stopping it also reaps it.
    """

    def __init__(self, postgres: str, folder: Path, port: int, user: str | None) -> None:
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
        self._port = port
        self._hba = folder / "data" / "pg_hba.conf"
        self._command = [*as_user(user), postgres, "-D", str(folder / "data"), "-p", str(port)]
        self._command += ["-h", "127.0.0.1", "-k", str(folder), "-F"]
        self._log = folder / "postgres.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server; returns once it accepts connections."""
        offset = self._log.stat().st_size if self._log.exists() else 0
        with self._log.open("ab") as log_file:
            self._process = subprocess.Popen(self._command, stdout=log_file, stderr=log_file)
        process = self._process

        def ready_or_gone() -> bool:
            return process.poll() is not None or self._ready_since(offset)

        with contextlib.suppress(NeverHappenedError):
            wait_until_sync(ready_or_gone, "PostgreSQL ready", limit=30, every=0.05)
        if self._ready_since(offset):
            return
        self.stop()
        pytest.fail(f"PostgreSQL did not start: {self._log.read_text(errors='replace')}")

    def _ready_since(self, offset: int) -> bool:
        return _PG_READY in self._log.read_bytes()[offset:].decode(errors="replace")

    async def new_database(self) -> str:
        """The URL of a database created just now on this cluster (empty: no tables)."""
        name = f"junjo_{uuid.uuid4().hex[:12]}"
        admin = create_engine(self.url)
        try:
            async with admin.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            await close_engine(admin)
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    async def new_password_database(self, role: str, password: str) -> str:
        """A new database owned by a new `role` that must sign in with `password`.

        The cluster trusts every other connection; this role alone is asked for its password
        (scram-sha-256 over TCP). The URL carries the password percent-encoded.
        """
        name = f"junjo_{uuid.uuid4().hex[:12]}"
        secret = password.replace("'", "''")
        admin = create_engine(self.url)
        try:
            async with admin.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.execute(text(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{secret}'"))
                await conn.execute(text(f'CREATE DATABASE "{name}" OWNER "{role}"'))
                # The first matching line wins: this one goes before the trust lines.
                rule = f"host all {role} 127.0.0.1/32 scram-sha-256\n"
                self._hba.write_text(rule + self._hba.read_text())
                await conn.execute(text("SELECT pg_reload_conf()"))
        finally:
            await close_engine(admin)
        encoded = quote(password, safe="")
        return f"postgresql+asyncpg://{role}:{encoded}@127.0.0.1:{self._port}/{name}"

    def stop(self) -> None:
        """Fast shutdown (open connections are closed), and wait for the server to exit."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


@contextlib.contextmanager
def throwaway_cluster(prefix: str) -> Iterator[PostgresCluster]:
    """Initialise and start a cluster; stop it and delete its folder afterwards.

    Without PostgreSQL's binaries this skips (fails under CI=true: see postgres_binaries).
    """
    initdb, server = find_pg_tool("initdb"), find_pg_tool("postgres")
    if initdb is None or server is None:
        missing_postgres(
            "PostgreSQL binaries (initdb, postgres) are not on PATH nor in pg_config's bindir"
        )
    user = "nobody" if os.geteuid() == 0 else None
    # Under /tmp rather than tmp_path: pytest's base folder is private to this user, and
    # the cluster's user must reach its own files.
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        if user is not None:
            shutil.chown(folder, user=user)
        subprocess.run(
            [
                *as_user(user),
                initdb,
                "-D",
                str(folder / "data"),
                "--no-sync",
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        cluster = PostgresCluster(server, folder, free_port(), user)
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
