"""FileEventBroker: the same lines as Rasa's own FileEventBroker, plus receipts, stats and close."""

import json

import pytest

import rasa_event_brokers
from rasa_event_brokers import BufferFullError, ConfigurationError, FileEventBroker
from conftest import create, python, run, sample_events, stream, trackers

RASA_FILE = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from conftest import create, stream, trackers
async def main():
    broker = await create(type="file", path=sys.argv[1])
    await stream(broker, trackers())
    await broker.close()
asyncio.run(main())
"""


def test_same_lines_as_rasas_file_broker(tmp_path):
    theirs, ours = tmp_path / "rasa.log", tmp_path / "ours.log"
    done = python(RASA_FILE, str(theirs), str(__import__("pathlib").Path(__file__).parent))
    assert done.returncode == 0, done.stderr

    async def main():
        broker = await create(type="rasa_event_brokers.FileEventBroker", path=str(ours))
        assert isinstance(broker, FileEventBroker)
        from rasa.core.brokers.broker import EventBroker

        assert isinstance(broker, EventBroker)
        await stream(broker, trackers())
        assert await broker.close() == []
        return broker.stats()

    stats = run(main())
    expected = theirs.read_bytes()
    assert len(expected.splitlines()) >= 90
    assert ours.read_bytes() == expected
    n = len(expected.splitlines())
    assert stats == {"accepted": n, "refused": 0, "delivered": n, "rejected": 0, "failed": 0, "pending": 0, "undelivered": 0}


def edge_events():
    import collections
    import enum

    class Level(enum.IntEnum):
        HIGH = 3

    class Channel(str, enum.Enum):
        REST = "rest"

    deep = "bottom"
    for _ in range(70):
        deep = [deep]
    values = [
        "\x7f", "\x00\x1f\b\f\n\r\t", "😀 客户 ü", "\u2028\u2029", "\ud800 lone", '"\\/',
        2**64, -(2**63) - 1, 2**63 - 1, 0, -1,
        float("nan"), float("inf"), float("-inf"), -0.0, 1e16, 1e-5, 1e-4, 0.1, 1.5e300, 5e-324, 123456789.123456789,
        True, False, None, (1, "two", None), [], {}, {"nested": {"a": [1.0, {"b": ()}]}},
        Level.HIGH, Channel.REST, {1: "int key", 2.5: "float key", True: "bool key", None: "none key"}, deep,
        {"k\u00e9y \"q\"\n\x7f": "escaped key", "😀": ["non-BMP key"]}, {"\udc80": "lone surrogate key"},
        collections.OrderedDict(a=1), "x" * 10000,
    ]
    return [{"sender_id": f"s{i}", "event": "slot", "timestamp": 1.0 + i, "name": "x", "value": v} for i, v in enumerate(values)]


def test_edge_values_are_written_as_json_dumps_writes_them(tmp_path):
    """The dict is encoded in Rust (or, for what is not a built-in type, through json.dumps): every
    line must be json.dumps of the published dict."""
    out = tmp_path / "edge.log"
    events = edge_events()

    async def main():
        broker = await FileEventBroker.connect(path=str(out))
        for e in events:
            broker.publish(e)
        assert await broker.close() == []

    run(main())
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert [l.decode() for l in lines[:-1]] == [json.dumps(e) for e in events]


def test_receipts_settle_with_their_position(tmp_path):
    async def main():
        broker = await FileEventBroker.connect(path=str(tmp_path / "events.log"))
        receipts = [broker.publish(e) for e in sample_events()[:5]]
        first = await receipts[0]
        assert first["id"] == receipts[0].id and first["position"] == {"offset": 0}
        await broker.flush()
        assert all(r.done() for r in receipts)
        offsets = [r.result()["position"]["offset"] for r in receipts]
        assert offsets == sorted(offsets) and len(set(offsets)) == 5
        assert "delivered" in repr(receipts[0])
        await broker.close()

    run(main())


def test_invalid_events_are_refused_at_publish(tmp_path):
    async def main():
        broker = await FileEventBroker.connect(path=str(tmp_path / "events.log"))
        with pytest.raises(rasa_event_brokers.InvalidEventError, match="event"):
            broker.publish({"sender_id": "a", "text": "no event type"})
        with pytest.raises(TypeError):
            broker.publish({"event": "bot", "when": object()})  # json.dumps refuses it, as in Rasa
        assert await broker.close() == []
        with pytest.raises(rasa_event_brokers.BrokerClosedError):
            broker.publish({"event": "bot"})
        assert broker.stats()["refused"] == 1

    run(main())


def test_full_buffer_raises_with_when_full_error_and_close_hands_back_the_rest():
    """/dev/full refuses every write (ENOSPC, a temporary error the writer retries), so the
    buffer fills: `when_full: error` makes publish raise at once, and close lists every accepted
    event, as the dict that was published."""

    async def main():
        broker = await FileEventBroker.connect(path="/dev/full", buffer_size=4, when_full="error", close_timeout=1)
        accepted, refused = [], 0
        for i in range(64):
            event = {"sender_id": "s", "event": "bot", "timestamp": 1.5 + i, "text": f"n{i}"}
            try:
                broker.publish(event)
                accepted.append(event)
            except BufferFullError as e:
                assert e.temporary is True
                refused += 1
        assert refused > 0 and accepted
        undelivered = await broker.close()
        assert undelivered == accepted
        stats = broker.stats()
        assert stats["refused"] == refused and stats["undelivered"] == len(accepted)
        assert stats["delivered"] == 0 and stats["pending"] == 0

    run(main())


def test_full_buffer_blocks_publish_with_when_full_block_until_close():
    """`when_full: block` (the default): a publish into a full buffer waits (back-pressure, the
    GIL released so other threads run) and is let go by close, which hands the accepted events
    back; the waiting publish then raises BrokerClosedError."""
    import threading

    async def main():
        broker = await FileEventBroker.connect(path="/dev/full", buffer_size=2, close_timeout=1)
        outcome = {}

        def publisher():
            try:
                for i in range(5000):
                    broker.publish({"event": "bot", "sender_id": "s", "text": f"n{i}"})
                    outcome["accepted"] = i + 1
            except Exception as e:  # noqa: BLE001 - the test inspects it
                outcome["error"] = e

        thread = threading.Thread(target=publisher)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive(), outcome  # blocked in publish, not failed
        accepted = outcome["accepted"]
        assert 2 <= accepted < 5000
        undelivered = await broker.close()
        thread.join(10)
        assert not thread.is_alive()
        assert isinstance(outcome.get("error"), rasa_event_brokers.BrokerClosedError), outcome
        assert [e["text"] for e in undelivered] == [f"n{i}" for i in range(outcome["accepted"])]

    run(main())


def test_a_signal_ends_a_publish_blocked_on_a_full_buffer():
    """A publish waiting for room lets Python's signal handlers run. Under `asyncio.run` the first
    Ctrl-C only asks the main task to stop (which it cannot while publish holds the loop); the
    second raises KeyboardInterrupt, and that must end the wait."""
    code = """
import asyncio, os, signal, threading
import rasa_event_brokers
async def main():
    b = await rasa_event_brokers.FileEventBroker.connect(path="/dev/full", buffer_size=2, close_timeout=1)
    for at in (1.0, 1.5):
        threading.Timer(at, os.kill, (os.getpid(), signal.SIGINT)).start()
    try:
        for i in range(100000):
            b.publish({"event": "bot", "text": str(i)})
    except KeyboardInterrupt:
        print("interrupted after", i)
    await b.close()
try:
    asyncio.run(main())
except KeyboardInterrupt:
    pass  # asyncio re-raises it once main() is done
"""
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("interrupted after")


def test_without_rasa_the_package_still_imports_and_works(tmp_path):
    out = tmp_path / "events.log"
    code = f"""
import asyncio, sys
sys.modules["rasa"] = None  # as if Rasa were not installed
import rasa_event_brokers
assert rasa_event_brokers.FileEventBroker.__mro__[-1] is object and len(rasa_event_brokers.FileEventBroker.__mro__) == 3
async def main():
    b = await rasa_event_brokers.FileEventBroker.connect(path={str(out)!r})
    await b.publish({{"event": "bot", "sender_id": "x", "text": "hé"}})
    assert await b.close() == []
asyncio.run(main())
"""
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == json.dumps({"event": "bot", "sender_id": "x", "text": "hé"}) + "\n"


def test_a_bad_key_is_a_configuration_error_naming_it(tmp_path):
    async def main():
        with pytest.raises(ConfigurationError) as raised:
            await create(type="rasa_event_brokers.FileEventBroker", path=str(tmp_path / "e.log"), pathh="x")
        return raised.value

    err = run(main())
    assert isinstance(err, ValueError)
    assert err.key == "pathh"
    assert "`pathh`" in str(err) and "path" in (err.hint or "")
