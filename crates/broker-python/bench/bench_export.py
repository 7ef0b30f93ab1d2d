"""`broker export` against Rasa 3.6.21's `rasa export` on the same tracker store.

The store: the sample conversations saved through Rasa's own `SQLTrackerStore` (SQLite), repeated
under new sender ids up to `--events` events (default 100,000), made once per run. Both exports
read it from the same endpoints file and write to a file broker (Rasa: its `FileEventBroker`;
ours: `type: file`, fdatasync per batch as by default), and the outputs are checked to hold the
same lines. Timed, each in a process of its own:
- Rasa: `Exporter.publish_events()` only (imports, store and broker creation left out, so the
  ratio is conservative);
- ours: the whole `broker export` process (`--cli`, default target/release/broker).
The ratio is Rasa's time over ours, median of `--runs` rounds (default 3), with the range.

    python bench_export.py [--events N] [--runs R] [--cli PATH] [--store sqlite|postgres|redis]
"""

import argparse
import asyncio
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

RASA = r"""
import asyncio, sys, time
import rasa.core.utils
from rasa.core.brokers.broker import EventBroker
from rasa.core.exporter import Exporter
from rasa.core.tracker_store import RedisTrackerStore, TrackerStore

async def keys(self):  # Rasa 3.6.21 returns Redis keys with their prefix (see test_export.py)
    return [k[len(self.key_prefix):] for k in self.red.keys(self.key_prefix + "*")]
RedisTrackerStore.keys = keys

async def main():
    endpoints = rasa.core.utils.read_endpoints_from_path(sys.argv[1])
    store = TrackerStore.create(endpoints.tracker_store)
    broker = await EventBroker.create(endpoints.event_broker)
    started = time.perf_counter()
    n = await Exporter(store, broker, sys.argv[1]).publish_events()
    print(n, time.perf_counter() - started)

asyncio.run(main())
"""


def store_keys(kind, workdir):
    if kind == "sqlite":
        return {"type": "sql", "dialect": "sqlite", "db": str(workdir / "rasa.db")}
    if kind == "postgres":
        url = urllib.parse.urlparse(os.environ["BROKER_TEST_POSTGRES_URL"])
        return {"type": "sql", "dialect": "postgresql", "url": url.hostname, "port": url.port or 5432,
                "username": url.username or "postgres", "db": f"bench_{uuid.uuid4().hex[:8]}",
                "login_db": url.path.lstrip("/") or "postgres"}
    if kind == "redis":
        host, port = os.environ.get("BROKER_TEST_REDIS_ADDR", "127.0.0.1:6379").rsplit(":", 1)
        return {"type": "redis", "url": host, "port": int(port), "db": 0, "key_prefix": f"bench{uuid.uuid4().hex[:8]}"}
    raise SystemExit(f"unknown store {kind}")


def build_store(keys, events):
    """Saves repeated sample conversations with Rasa's own class; returns the event count."""
    from conftest import sample_events, trackers
    from rasa.core.tracker_store import TrackerStore
    from rasa.utils.endpoints import EndpointConfig

    repeat = max(1, -(-events // len(sample_events())))
    ts = trackers(repeat=repeat)

    async def main():
        store = TrackerStore.create(EndpointConfig(**keys))
        n = 0
        for t in ts:
            await store.save(t)
            n += len(t.events)
        return n

    return asyncio.run(main())


def write_endpoints(path, store, out):
    def value(v):
        return json.dumps(v) if isinstance(v, str) else str(v)

    text = "tracker_store:\n" + "".join(f"  {k}: {value(v)}\n" for k, v in store.items())
    text += f"event_broker:\n  type: file\n  path: {json.dumps(str(out))}\n"
    path.write_text(text)


def lines(path):
    with open(path, "rb") as f:
        return sorted(f.read().splitlines())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--store", default="sqlite", choices=["sqlite", "postgres", "redis"])
    ap.add_argument("--cli", default=str(HERE.parents[2] / "target" / "release" / "broker"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        keys = store_keys(args.store, workdir)
        started = time.perf_counter()
        n = build_store(keys, args.events)
        print(f"store: {n} events in {args.store} (written by Rasa's tracker store in {time.perf_counter() - started:.0f} s)")
        rasa_times, our_times = [], []
        for r in range(args.runs):
            rasa_out, our_out = workdir / f"rasa{r}.log", workdir / f"ours{r}.log"
            write_endpoints(workdir / "rasa.yml", keys, rasa_out)
            write_endpoints(workdir / "ours.yml", keys, our_out)
            done = subprocess.run([sys.executable, "-W", "ignore", "-c", RASA, str(workdir / "rasa.yml")],
                                  capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            count, secs = done.stdout.split()[-2:]
            rasa_times.append(float(secs))
            t0 = time.perf_counter()
            ours = subprocess.run([args.cli, "--endpoints", str(workdir / "ours.yml"), "export"],
                                  capture_output=True, text=True, timeout=3600, cwd=workdir)
            our_times.append(time.perf_counter() - t0)
            if ours.returncode != 0:
                raise SystemExit(ours.stderr)
            if int(count) != n or lines(rasa_out) != lines(our_out):
                raise SystemExit(f"the exports differ: Rasa {count} events, ours {len(lines(our_out))}")
            print(f"round {r + 1}: Rasa {float(secs):.2f} s, ours {our_times[-1]:.3f} s, same {n} lines")
        ratios = [a / b for a, b in zip(rasa_times, our_times)]
        print(f"rasa export      {statistics.median(rasa_times):8.2f} s  {n / statistics.median(rasa_times):10.0f} events/s")
        print(f"broker export    {statistics.median(our_times):8.3f} s  {n / statistics.median(our_times):10.0f} events/s (whole process)")
        print(f"ratio Rasa/ours  {statistics.median(ratios):8.1f}x (range {min(ratios):.1f}-{max(ratios):.1f}; goal >= 20)")
        if args.store == "postgres":
            import psycopg2

            url = urllib.parse.urlparse(os.environ["BROKER_TEST_POSTGRES_URL"])
            admin = psycopg2.connect(dbname=keys["login_db"], host=url.hostname, port=url.port or 5432, user=url.username or "postgres")
            admin.autocommit = True
            admin.cursor().execute(f'drop database if exists "{keys["db"]}" with (force)')
        if args.store == "redis":
            import redis

            client = redis.Redis(host=keys["url"], port=keys["port"], db=0)
            for key in client.scan_iter(f"{keys['key_prefix']}:*"):
                client.delete(key)


if __name__ == "__main__":
    main()
