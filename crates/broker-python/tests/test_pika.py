"""PikaEventBroker: the same messages (body, headers, properties) as Rasa's own
PikaEventBroker, and no event lost when RabbitMQ restarts in the middle of a stream."""

import asyncio
import collections
import json
import os
import re
import subprocess
import time
import urllib.parse

from rasa_event_brokers import PikaEventBroker
from conftest import create, run, service, stream, trackers, unique

# Properties that belong to one delivery, not to the message.
DELIVERY = {"delivery_tag", "redelivered", "consumer_tag", "message_count", "exchange", "routing_key", "cluster_id"}


def rabbit():
    url = urllib.parse.urlparse(service("BROKER_TEST_AMQP_URL"))
    keys = dict(url=url.hostname, port=url.port or 5672, username=url.username or "guest", password=url.password or "guest")
    return service("BROKER_TEST_AMQP_URL"), keys


async def drain(amqp_url, queue_name, n, timeout=60.0):
    """Up to `n` messages of `queue_name`: (body, properties without delivery fields)."""
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    out = []
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True, passive=True)
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            msg = await queue.get(no_ack=True, fail=False)
            if msg is None:
                await asyncio.sleep(0.05)
                continue
            props = {k: v for k, v in msg.info().items() if k not in DELIVERY}
            out.append((msg.body, props))
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
    return out


def test_messages_equal_rasas():
    amqp_url, keys = rabbit()
    theirs, ours = unique("rasa_q"), unique("our_q")
    ts = trackers()

    async def main():
        rasa = await create(type="pika", queues=[theirs], exchange_name=unique("rasa_x"), **keys)
        await stream(rasa, ts)
        await asyncio.sleep(1)  # Rasa publishes in background tasks
        await rasa.close()
        broker = await create(type="rasa_event_brokers.PikaEventBroker", queues=[ours], exchange_name=unique("our_x"), **keys)
        assert isinstance(broker, PikaEventBroker)
        await stream(broker, ts)
        assert await broker.close() == []
        n = broker.stats()["delivered"]
        return n, await drain(amqp_url, theirs, n), await drain(amqp_url, ours, n)

    n, expected, got = run(main())
    assert n >= 90 and len(expected) == n
    # `message_id`: 32 hex digits on both, one per message (aio-pika makes a random one for
    # Rasa; ours is the event's stable id, docs/contract.md, so a consumer can drop duplicates).
    for messages in (expected, got):
        ids = [props.pop("message_id") for _, props in messages]
        assert all(re.fullmatch(r"[0-9a-f]{32}", i or "") for i in ids) and len(set(ids)) == n, ids[:3]
    assert got == expected


def test_headers_are_sent(tmp_path):
    amqp_url, keys = rabbit()
    queue = unique("headers_q")

    async def main():
        broker = await PikaEventBroker.connect(queues=[queue], exchange_name=unique("x"), **keys)
        await broker.publish({"event": "bot", "sender_id": "s"}, headers={"rasa-export-process-id": "42"})
        await broker.close()
        return await drain(amqp_url, queue, 1)

    [(body, props)] = run(main())
    assert json.loads(body) == {"event": "bot", "sender_id": "s"}
    assert props["headers"] == {"rasa-export-process-id": "42"}


def test_restart_in_the_middle_of_a_stream_loses_nothing():
    amqp_url, keys = rabbit()
    stop, start = service("BROKER_TEST_RABBITMQ_STOP"), service("BROKER_TEST_RABBITMQ_START")
    queue = unique("restart_q")
    ts = trackers(repeat=6)
    half = len(ts) // 2

    async def main():
        broker = await create(type="rasa_event_brokers.PikaEventBroker", queues=[queue], exchange_name=unique("x"), **keys)
        published = []
        original = broker.publish

        def record(event, headers=None):
            published.append(json.dumps(event).encode())
            return original(event, headers)

        broker.publish = record
        await stream(broker, ts[:half])
        await broker.flush()
        subprocess.run(stop, shell=True, check=True, timeout=120)
        try:
            # Rasa's event loop goes on while RabbitMQ is away: publish must not block.
            began = time.monotonic()
            await stream(broker, ts[half:])
            assert time.monotonic() - began < 5
            assert not broker.is_ready()
        finally:
            subprocess.run(start, shell=True, check=True, timeout=180)
        assert await broker.close() == []
        stats = broker.stats()
        return published, stats

    published, stats = run(main())
    assert stats["delivered"] == len(published) and stats["failed"] == 0
    got = run(drain(amqp_url, queue, len(published) + 50, timeout=20))
    bodies = collections.Counter(body for body, _ in got)
    missing = collections.Counter(published) - bodies
    assert not missing, f"{sum(missing.values())} of {len(published)} events lost"
    assert set(bodies) <= set(published)
