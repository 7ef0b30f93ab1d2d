"""Shared helpers of the pytest suite: services from the environment (as the Rust tests take
them), Rasa's own classes, and trackers made from the sample events Rasa wrote."""

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import uuid
import warnings

import pytest

warnings.filterwarnings("ignore")  # SQLAlchemy 1.4's 2.0 notice, Rasa's deprecations

ROOT = pathlib.Path(__file__).resolve().parents[3]
# Events Rasa 3.6 wrote (every event type, odd sender ids, unicode, floats).
SAMPLE = ROOT / "crates" / "broker-testkit" / "data" / "rasa-events-sample.jsonl"


def service(var: str) -> str:
    """The service address in `var`; without it a failure under CI=true, else a skip."""
    value = os.environ.get(var)
    if value:
        return value
    if os.environ.get("CI") == "true":
        pytest.fail(f"{var} is not set (CI=true: a missing service is a failure)")
    pytest.skip(f"{var} is not set")


def run(coro):
    return asyncio.run(coro)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def sample_events():
    """The sample events Rasa wrote, as dicts (with sender_id)."""
    with open(SAMPLE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def trackers(events=None, repeat=1):
    """Rasa trackers built from the sample events (`repeat` copies, each under its own sender
    ids), in the order Rasa would save them, and the number of events they will stream."""
    from rasa.shared.core.events import Event
    from rasa.shared.core.trackers import DialogueStateTracker

    events = sample_events() if events is None else events
    out = []
    for r in range(repeat):
        by_sender = {}
        for e in events:
            by_sender.setdefault(e.get("sender_id", ""), []).append(e)
        for sender, es in by_sender.items():
            evs = [Event.from_parameters({k: v for k, v in e.items() if k != "sender_id"}) for e in es]
            # Copies get their own senders, no longer than the original (Rasa's column is 255).
            sender = sender if r == 0 else f"{r}#{sender}"[: max(len(sender), 8)]
            out.append(DialogueStateTracker.from_events(sender, [x for x in evs if x]))
    return out


async def stream(broker, tracker_list):
    """Saves the trackers through Rasa's InMemoryTrackerStore, which publishes every new event
    to `broker` exactly as `rasa run` does."""
    from rasa.core.tracker_store import InMemoryTrackerStore
    from rasa.shared.core.domain import Domain

    store = InMemoryTrackerStore(Domain.empty(), event_broker=broker)
    for t in tracker_list:
        await store.save(t)
    return store


async def create(**endpoint):
    """`EventBroker.create(EndpointConfig(...))`, as Rasa does for endpoints.yml."""
    from rasa.core.brokers.broker import EventBroker
    from rasa.utils.endpoints import EndpointConfig

    return await EventBroker.create(EndpointConfig(**endpoint))


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    """Runs `code` in a new interpreter of this venv (one Rasa FileEventBroker per process)."""
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code, *args], capture_output=True, text=True, timeout=300)


def kafka_topics(bootstrap: str, *names: str) -> None:
    """Creates one-partition topics (tansu, like many production clusters, does not create topics
    on first use; Rasa's class would only log every failed delivery)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(n, num_partitions=1, replication_factor=1) for n in names]).values():
        future.result(timeout=30)
