"""KafkaEventBroker: the same records (value, key, headers) as Rasa's own KafkaEventBroker."""

import re
import time

from rasa_event_brokers import KafkaEventBroker
from conftest import create, kafka_topics, run, service, stream, trackers, unique


def consume(bootstrap, topic, n, timeout=60.0):
    """`n` records of `topic` from the beginning (value, key, headers), in offset order."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": unique("g"), "auto.offset.reset": "earliest", "enable.auto.commit": False}
    )
    consumer.subscribe([topic])
    out, deadline = [], time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            out.append((msg.partition(), msg.offset(), msg.value(), msg.key(), msg.headers()))
    finally:
        consumer.close()
    out.sort()
    return [m[2:] for m in out]


def test_records_equal_rasas():
    bootstrap = service("BROKER_TEST_KAFKA_BOOTSTRAP")
    theirs, ours = unique("rasa_events"), unique("our_events")
    kafka_topics(bootstrap, theirs, ours)
    ts = trackers()

    async def main():
        rasa = await create(type="kafka", url=bootstrap, topic=theirs, partition_by_sender=True, client_id="rasa", security_protocol="PLAINTEXT")
        store = await stream(rasa, ts)
        await rasa.close()
        broker = await create(
            type="rasa_event_brokers.KafkaEventBroker", url=bootstrap, topic=ours, partition_by_sender=True, client_id="ours", security_protocol="PLAINTEXT"
        )
        assert isinstance(broker, KafkaEventBroker)
        await stream(broker, ts)
        assert await broker.close() == []
        return store, broker.stats()

    _, stats = run(main())
    n = stats["delivered"]
    assert n >= 90 and stats["failed"] == 0
    expected = consume(bootstrap, theirs, n)
    got = consume(bootstrap, ours, n)
    assert len(expected) == n
    # One partition per topic, so offset order is publish order for both. The one documented
    # addition (docs/contract.md): the header `rasa-event-id`, the event's stable id, last.
    stripped = []
    for value, key, headers in got:
        assert headers[-1][0] == "rasa-event-id" and re.fullmatch(rb"[0-9a-f]{32}", headers[-1][1]), headers
        stripped.append((value, key, headers[:-1]))
    assert stripped == expected
    assert len({h[-1][1] for _, _, h in got}) == n
