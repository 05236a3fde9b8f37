"""The PostgreSQL store (procrastinate as the engine), against a real server."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from pgserver import PgServer, find_bin_dir

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        find_bin_dir() is None,
        reason="no PostgreSQL binaries (initdb, pg_ctl) here: apt-get install postgresql",
    ),
]

psycopg = pytest.importorskip("psycopg", reason="the postgres extra: pip install bgtasks[postgres]")

_db_names = itertools.count(1)


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    with PgServer() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A fresh, empty database for one test."""
    return pg_server.create_database(f"bgtasks_test_{next(_db_names)}")


def test_server_fixture_gives_a_fresh_database(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT current_setting('fsync'), current_database()").fetchone()
    assert row is not None
    assert row[0] == "off"
    assert row[1].startswith("bgtasks_test_")
