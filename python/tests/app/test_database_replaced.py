"""A backup restored over the SQLite file of a running `serve` (faults issue, defect 1).

Before the fix, the pooled connections kept reading the deleted (or cached) file: a key
revoked after the restore kept validating, a key created after it was refused, /health
said the database was fine, and nothing was logged.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, get_args

import grpc
import pytest

from tests.serve_process import ServeProcess

from .database_replacement import (
    AuthCalls,
    Cli,
    Style,
    backend_env,
    replace_database,
)

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.timeout(180)

MAX_AGE = 0.5


def _all_output(folder: Path) -> str:
    """What the server and every CLI call wrote (CLI stdout aside: `create` shows its key)."""
    return "".join(path.read_text() for path in sorted(folder.glob("*.log")))


@pytest.mark.parametrize("style", get_args(Style))
async def test_a_restored_backup_is_read_revocations_hold_and_new_keys_validate(
    style: Style, tmp_path: Path
) -> None:
    database = tmp_path / "data" / "junjo.db"
    env = backend_env(database, POLLER_ENABLED="false", API_KEY_CACHE_MAX_AGE_SECONDS=str(MAX_AGE))
    names = itertools.count()
    cli = Cli(env, tmp_path, lambda name: tmp_path / f"{next(names):02d}-{name}.log")
    serve = ServeProcess(env, cwd=tmp_path, output=tmp_path / "serve.log")
    keys: list[str] = []
    try:
        await serve.start().wait_ready()
        async with grpc.aio.insecure_channel(serve.auth_address) as channel:
            outcome = await replace_database(
                style=style,
                database=database,
                serve=serve,
                cli=cli,
                auth=AuthCalls(channel),
                register=keys.append,
                max_age=MAX_AGE,
            )
    finally:
        await serve.stop_async()
    output = serve.text()
    everything = _all_output(tmp_path)

    assert outcome.true_after_break_detected == 0
    assert outcome.health_while_broken == 503
    assert outcome.database_error_while_broken is not None
    assert outcome.created_a_file_while_missing is False
    assert "true" not in outcome.revoked_answers_after_refusal
    assert set(outcome.revoked_answers_after_refusal) == {"false"}
    assert "the SQLite database file was replaced" in output
    if style == "delete and copy":
        assert "the SQLite database file is missing" in output
    else:
        assert "no longer holds a database" in output
    assert len(keys) == 2
    for key in keys:
        assert key[:12] not in everything
        assert key[-12:] not in everything
