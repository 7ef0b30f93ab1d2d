"""SQLEventBroker: the same rows in Rasa's `events` table as Rasa's own SQLEventBroker writes,
on SQLite and on PostgreSQL."""

import sqlite3
import urllib.parse

import pytest

from rasa_event_brokers import SQLEventBroker
from conftest import create, run, service, stream, trackers, unique


def sqlite_rows(path):
    with sqlite3.connect(path) as db:
        return db.execute("select id, sender_id, data from events order by id").fetchall()


def test_sqlite_rows_equal_rasas(tmp_path):
    theirs, ours = str(tmp_path / "rasa.db"), str(tmp_path / "ours.db")
    ts = trackers()

    async def main():
        rasa = await create(type="sql", dialect="sqlite", db=theirs)
        await stream(rasa, ts)
        await rasa.close()
        broker = await create(type="rasa_event_brokers.SQLEventBroker", dialect="sqlite", db=ours)
        assert isinstance(broker, SQLEventBroker)
        await stream(broker, ts)
        assert await broker.close() == []
        return broker.stats()

    stats = run(main())
    expected = sqlite_rows(theirs)
    assert len(expected) >= 90
    assert sqlite_rows(ours) == expected
    assert stats["delivered"] == len(expected)


@pytest.fixture
def postgres_databases():
    import psycopg2

    url = urllib.parse.urlparse(service("BROKER_TEST_POSTGRES_URL"))
    params = dict(host=url.hostname, port=url.port or 5432, user=url.username or "postgres", password=url.password)
    names = [unique("rasa_broker"), unique("our_broker")]
    admin = psycopg2.connect(dbname=url.path.lstrip("/") or "postgres", **params)
    admin.autocommit = True
    with admin.cursor() as c:
        for n in names:
            c.execute(f'create database "{n}"')
    yield params, names
    with admin.cursor() as c:
        for n in names:
            c.execute(f'drop database if exists "{n}" with (force)')
    admin.close()


def test_postgres_rows_equal_rasas(postgres_databases):
    import psycopg2

    params, (theirs, ours) = postgres_databases
    keys = dict(dialect="postgresql", url=params["host"], port=params["port"], username=params["user"])
    if params["password"]:
        keys["password"] = params["password"]
    ts = trackers()

    async def main():
        rasa = await create(type="sql", db=theirs, **keys)
        await stream(rasa, ts)
        await rasa.close()
        rasa.engine.dispose()
        broker = await create(type="rasa_event_brokers.SQLEventBroker", db=ours, **keys)
        await stream(broker, ts)
        assert await broker.close() == []

    run(main())

    def rows(db):
        with psycopg2.connect(dbname=db, **params) as conn, conn.cursor() as c:
            c.execute("select id, sender_id, data from events order by id")
            return c.fetchall()

    def columns(db):
        with psycopg2.connect(dbname=db, **params) as conn, conn.cursor() as c:
            c.execute(
                "select column_name, data_type, character_maximum_length, is_nullable from information_schema.columns"
                " where table_name = 'events' order by ordinal_position"
            )
            return c.fetchall()

    expected = rows(theirs)
    assert len(expected) >= 90
    assert rows(ours) == expected
    assert columns(ours) == columns(theirs)
