"""Configuration errors say what `broker check` says; warnings and Rust log records reach
Python's logging."""

import logging
import os
import pathlib
import shutil
import subprocess

import pytest

from rasa_event_brokers import ConfigurationError, FileEventBroker, KafkaEventBroker, SQLEventBroker
from conftest import ROOT, create, kafka_topics, run, service, unique

CASES = [
    ("kafka", {"url": "localhost:9092", "topic": "t", "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"}),
    ("kafka", {"url": "localhost:9092", "topicc": "t"}),
    ("sql", {"dialect": "oracle", "db": "x"}),
    ("pika", {"url": "localhost", "username": "u", "password": "p", "queues": "q", "port": "not-a-port"}),
    ("file", {"path": "e.log", "buffer_size": 0}),
    ("file", {"path": "e.log", "when_full": "drop"}),
]


def cli():
    found = os.environ.get("BROKER_CLI") or shutil.which("broker")
    if not found:
        debug = ROOT / "target" / "debug" / "broker"
        found = str(debug) if debug.exists() else None
    if not found:
        if os.environ.get("CI") == "true":
            pytest.fail("the broker CLI is not built (BROKER_CLI)")
        pytest.skip("the broker CLI is not built (set BROKER_CLI)")
    return found


def yaml_scalar(v):
    return str(v).lower() if isinstance(v, bool) else str(v)


@pytest.mark.parametrize("type_name,keys", CASES)
def test_same_error_as_broker_check(tmp_path, type_name, keys):
    endpoints = tmp_path / "endpoints.yml"
    endpoints.write_text("event_broker:\n  type: " + type_name + "\n" + "".join(f"  {k}: {yaml_scalar(v)}\n" for k, v in keys.items()))
    checked = subprocess.run([cli(), "--endpoints", str(endpoints), "check"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert checked.returncode != 0
    classes = {"kafka": KafkaEventBroker, "sql": SQLEventBroker, "file": FileEventBroker}
    cls = classes.get(type_name)

    async def main():
        with pytest.raises(ConfigurationError) as raised:
            await create(type=f"rasa_event_brokers.{(cls or __import__('rasa_event_brokers').PikaEventBroker).__name__}", **keys)
        return raised.value

    err = run(main())
    ours = str(err)
    # `broker check` prints "<file>:<line>:<column>: `key`: reason (hint)"; we have no file.
    assert ours.startswith("<options>: ")
    detail = ours[len("<options>: "):]
    assert detail in checked.stderr, f"{detail!r} not in {checked.stderr!r}"
    assert err.key is None or f"`{err.key}`" in ours
    assert err.reason and err.reason in checked.stderr


def test_check_validates_without_connecting():
    where, warnings = KafkaEventBroker.check(url="127.0.0.1:1", topic="t", security_protocol="PLAINTEXT", sasl_username="u")
    assert "t" in where
    assert any("SASL credentials have no effect" in w for w in warnings)
    with pytest.raises(ConfigurationError):
        SQLEventBroker.check(dialect="sqlite", db="x", bogus=1)


def test_warnings_and_rust_logs_reach_python_logging(caplog):
    bootstrap = service("BROKER_TEST_KAFKA_BOOTSTRAP")
    caplog.set_level(logging.DEBUG, logger="rasa_event_brokers")
    topic = unique("log_test")
    kafka_topics(bootstrap, topic)

    async def main():
        broker = await KafkaEventBroker.connect(url=bootstrap, topic=topic, security_protocol="PLAINTEXT", sasl_username="u")
        await broker.close()

    run(main())
    # The forwarding thread hands records over asynchronously.
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any("SASL credentials" in r.getMessage() for r in caplog.records):
        time.sleep(0.05)
    names = {r.name for r in caplog.records}
    assert any(r.name.startswith("rasa_event_brokers") and r.levelno == logging.WARNING and "SASL credentials" in r.getMessage() for r in caplog.records), names
