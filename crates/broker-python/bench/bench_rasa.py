"""Rasa's TrackerStore streaming N events through Rasa's own broker class vs through ours.

Each measurement runs in a process of its own (Rasa's FileEventBroker shares one logger per
process). Timed: `InMemoryTrackerStore.save` of every tracker, then `close()` (ours delivers
everything before returning; for Rasa's RabbitMQ class, whose close does not wait for its
background publishes, until the queue holds every event). The same loop with a broker that does
nothing gives Rasa's own cost, so the table shows both the end-to-end ratio and the ratio of the
broker's share (end-to-end minus that baseline). A run measures the three one after the other;
the ratios are the median over `--runs` (default 5) runs, with their range.

Then the Python side's own cost: the same N events published with our class directly (no
tracker store) against the Rust CLI (`broker publish`, `--cli`, default target/release/broker)
sending the same events as JSON lines, on the file and SQLite backends.

    python bench_rasa.py [--events N] [--cli PATH] [BACKEND ...]   # backends: file sqlite postgres kafka pika
"""

import argparse
import asyncio
import json
import os
import statistics
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def endpoint(backend, impl, workdir):
    """The EndpointConfig keys of `backend` for `impl` (rasa | ours)."""
    tag = f"bench_{impl}_{uuid.uuid4().hex[:8]}"
    prefix = "" if impl == "rasa" else "rasa_event_brokers."
    names = {"file": "FileEventBroker", "sqlite": "SQLEventBroker", "postgres": "SQLEventBroker", "kafka": "KafkaEventBroker", "pika": "PikaEventBroker"}
    rasa_types = {"file": "file", "sqlite": "sql", "postgres": "sql", "kafka": "kafka", "pika": "pika"}
    kind = rasa_types[backend] if impl == "rasa" else prefix + names[backend]
    if backend == "file":
        return dict(type=kind, path=str(workdir / f"{tag}.log"))
    if backend == "sqlite":
        return dict(type=kind, dialect="sqlite", db=str(workdir / f"{tag}.db"))
    if backend == "postgres":
        url = urllib.parse.urlparse(os.environ["BROKER_TEST_POSTGRES_URL"])
        return dict(type=kind, dialect="postgresql", url=url.hostname, port=url.port or 5432, username=url.username or "postgres", db=url.path.lstrip("/"))
    if backend == "kafka":
        return dict(type=kind, url=os.environ["BROKER_TEST_KAFKA_BOOTSTRAP"], topic=tag, security_protocol="PLAINTEXT")
    if backend == "pika":
        url = urllib.parse.urlparse(os.environ["BROKER_TEST_AMQP_URL"])
        return dict(type=kind, url=url.hostname, port=url.port or 5672, username=url.username or "guest", password=url.password or "guest", queues=[tag], exchange_name=tag)
    raise SystemExit(f"unknown backend {backend}")


async def queue_depth(keys):
    import aio_pika

    url = os.environ["BROKER_TEST_AMQP_URL"]
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(keys["queues"][0], durable=True, passive=True)
        return queue.declaration_result.message_count
    finally:
        await connection.close()


async def drop_queue(keys):
    import aio_pika

    connection = await aio_pika.connect(os.environ["BROKER_TEST_AMQP_URL"])
    try:
        channel = await connection.channel()
        await channel.queue_delete(keys["queues"][0])
        await channel.exchange_delete(keys["exchange_name"])
    finally:
        await connection.close()


async def measure(backend, impl, events):
    """One measurement in this process: seconds for the stream and the close."""
    from rasa.core.brokers.broker import EventBroker
    from rasa.core.tracker_store import InMemoryTrackerStore
    from rasa.shared.core.domain import Domain
    from rasa.utils.endpoints import EndpointConfig

    from conftest import sample_events, trackers

    sample = sample_events()
    repeat = max(1, events // len(sample))
    ts = trackers(sample, repeat=repeat)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-rasa-"))

    class Null(EventBroker):
        def publish(self, event):
            pass

    keys = endpoint(backend, "ours" if impl == "ours" else "rasa", workdir)
    if backend == "kafka" and impl != "null":
        from conftest import kafka_topics

        kafka_topics(keys["url"], keys["topic"])
    broker = Null() if impl == "null" else await EventBroker.create(EndpointConfig(**keys))
    if backend == "postgres" and impl == "rasa":
        with broker.engine.begin() as c:
            c.exec_driver_sql("delete from events")
    store = InMemoryTrackerStore(Domain.empty(), event_broker=broker)
    count = 0
    published = broker.publish

    def counting(event, *a, **k):
        nonlocal count
        count += 1
        return published(event, *a, **k)

    broker.publish = counting
    began = time.perf_counter()
    for t in ts:
        await store.save(t)
    if impl == "rasa" and backend == "pika":
        deadline = time.monotonic() + 600
        while await queue_depth(keys) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    await broker.close()
    elapsed = time.perf_counter() - began
    if impl == "ours":
        stats = broker.stats()
        assert stats["delivered"] == count, stats
    if backend == "pika" and impl != "null":
        await drop_queue(keys)
    return {"events": count, "seconds": elapsed}


async def direct(backend, events):
    """Our class alone: N sample events published, then close."""
    import rasa_event_brokers

    from conftest import sample_events

    sample = sample_events()
    batch = [sample[i % len(sample)] for i in range(events)]
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-direct-"))
    keys = endpoint(backend, "ours", workdir)
    keys.pop("type")
    cls = rasa_event_brokers.FileEventBroker if backend == "file" else rasa_event_brokers.SQLEventBroker
    broker = await cls.connect(**keys)
    began = time.perf_counter()
    for e in batch:
        broker.publish(e)
    assert await broker.close() == []
    return {"events": events, "seconds": time.perf_counter() - began}


def cli_rate(cli, backend, events):
    """`broker publish` of the same events as JSON lines: events per second."""
    from conftest import sample_events

    sample = sample_events()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-cli-"))
    lines = workdir / "events.jsonl"
    lines.write_text("".join(json.dumps(sample[i % len(sample)]) + "\n" for i in range(events)))
    keys = endpoint(backend, "ours", workdir)
    yaml = "event_broker:\n  type: " + ("file" if backend == "file" else "sql") + "\n"
    yaml += "".join(f"  {k}: {v}\n" for k, v in keys.items() if k != "type")
    (workdir / "endpoints.yml").write_text(yaml)
    began = time.perf_counter()
    subprocess.run([cli, "--endpoints", str(workdir / "endpoints.yml"), "-q", "publish", str(lines)], check=True, timeout=600, capture_output=True)
    return events / (time.perf_counter() - began)


def best_cli_rate(runs, cli, backend, events):
    """The fastest of `runs` CLI runs, as for every other cell (a run can hit the disk's
    write-back)."""
    return max(cli_rate(cli, backend, events) for _ in range(runs))


def triple(backend, events):
    """One run: Rasa's TrackerStore alone (a broker that does nothing), with Rasa's class, with
    ours, one right after the other (so the broker's share is taken from measurements made under
    the same conditions: subtracting a baseline from another moment magnifies the machine's noise)."""
    null, rasa, ours = (child("file" if impl == "null" else backend, impl, events) for impl in ("null", "rasa", "ours"))
    assert rasa["events"] == ours["events"], (rasa, ours)
    return null, rasa, ours


def best(runs, backend, impl, events):
    """The fastest of `runs` measurements (each in its own process)."""
    return min((child(backend, impl, events) for _ in range(runs)), key=lambda r: r["seconds"])


def child(backend, impl, events):
    out = subprocess.run(
        [sys.executable, "-W", "ignore", __file__, "--child", backend, impl, "--events", str(events)],
        capture_output=True, text=True, timeout=1800,
    )
    if out.returncode != 0:
        raise SystemExit(f"{backend}/{impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("backends", nargs="*", default=["file", "sqlite", "postgres", "kafka", "pika"])
    ap.add_argument("--events", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=5, help="runs per backend (the median ratio counts) and per CLI cell (the fastest counts)")
    ap.add_argument("--cli", default=str(HERE.parents[2] / "target" / "release" / "broker"))
    ap.add_argument("--child", nargs=2, metavar=("BACKEND", "IMPL"))
    args = ap.parse_args()
    if args.child:
        backend, impl = args.child
        run = direct(backend, args.events) if impl == "direct" else measure(backend, impl, args.events)
        print(json.dumps(asyncio.run(run)))
        return
    print(f"{args.events} events per run, {args.runs} runs per backend; each run measures, one after the other,")
    print("Rasa's TrackerStore with a broker that does nothing (its own cost), with Rasa's class and with ours.")
    print("Ratios are the median over the runs (the range in brackets).")
    print(f"{'backend':10} {'events':>7} {'null s':>8} {'rasa s':>8} {'ours s':>8} {'end-to-end':>11} {'broker share':>22}")
    for backend in args.backends:
        rows = [triple(backend, args.events) for _ in range(args.runs)]
        e2e = [r["seconds"] / o["seconds"] for _, r, o in rows]
        share = [(r["seconds"] - base) / max(1e-9, o["seconds"] - base) for base, r, o in ((n["seconds"] * o["events"] / max(1, n["events"]), r, o) for n, r, o in rows)]
        null, rasa, ours = (statistics.median(x[i]["seconds"] for x in rows) for i in range(3))
        print(
            f"{backend:10} {rows[0][2]['events']:>7} {null:>8.3f} {rasa:>8.3f} {ours:>8.3f} "
            f"{statistics.median(e2e):>10.1f}x {statistics.median(share):>8.1f}x [{min(share):.1f}-{max(share):.1f}]",
            flush=True,
        )
    if not os.path.exists(args.cli):
        print(f"(no {args.cli}: build it with `cargo build --release -p broker-cli` for the CLI comparison)")
        return
    print(f"\nPython side vs the Rust CLI ({args.cli}), {args.events} events published directly:")
    print(f"{'backend':10} {'python ev/s':>12} {'cli ev/s':>12} {'cli/python':>11}")
    for backend in [b for b in args.backends if b in ("file", "sqlite")]:
        ours = best(args.runs, backend, "direct", args.events)
        py_rate = ours["events"] / ours["seconds"]
        rate = best_cli_rate(args.runs, args.cli, backend, args.events)
        print(f"{backend:10} {py_rate:>12.0f} {rate:>12.0f} {rate / py_rate:>10.1f}x", flush=True)


if __name__ == "__main__":
    main()
