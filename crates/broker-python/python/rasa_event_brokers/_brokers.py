"""The broker classes: Rasa's interface over the native brokers."""

import atexit
import logging
from typing import Any, Dict, List, Optional, Tuple

from . import _native

logger = logging.getLogger("rasa_event_brokers")
atexit.register(_native.shutdown)

try:  # With Rasa installed, the classes are Rasa event brokers.
    from rasa.core.brokers.broker import EventBroker as _Base
except ImportError:  # pragma: no cover - exercised by the tests without Rasa
    _Base = object

# The keys of Rasa's EndpointConfig that it takes out of the section before `kwargs`, with
# the values it gives them when they are absent.
_ENDPOINT_FIELDS = (("params", {}), ("headers", {}), ("basic_auth", {}), ("token", None), ("token_name", "token"), ("cafile", None))

def options_from_endpoint_config(broker_config: Any) -> List[Tuple[str, Any]]:
    """The ``event_broker:`` keys of a Rasa ``EndpointConfig`` (or a plain dict), in order.

    ``url`` and the generic endpoint keys come back only when they were set; ``type`` and
    ``store_type`` are not options.
    """
    if isinstance(broker_config, dict):
        return [(k, v) for k, v in broker_config.items() if k not in ("type", "store_type")]
    options: List[Tuple[str, Any]] = []
    url = getattr(broker_config, "url", None)
    if url is not None:
        options.append(("url", url))
    for key, absent in _ENDPOINT_FIELDS:
        value = getattr(broker_config, key, absent)
        if value != absent:
            options.append((key, value))
    options.extend((getattr(broker_config, "kwargs", None) or {}).items())
    return options


class _RustEventBroker(_Base):  # type: ignore[misc,valid-type]
    """A broker whose delivery runs in Rust. Subclasses set ``_type``."""

    _type = ""

    def __init__(self, native: Any) -> None:
        self._native = native
        # Rasa calls `publish` once per event: the native method itself, without a Python frame
        # in between (same signature and behaviour as the method below, which documents it),
        # unless a subclass (or a test's patch) overrides `publish`.
        if type(self).publish is _RustEventBroker.publish:
            self.publish = native.publish  # type: ignore[method-assign]

    @classmethod
    async def from_endpoint_config(cls, broker_config: Any, event_loop: Any = None) -> Optional["_RustEventBroker"]:
        """Connects with the keys of ``broker_config`` (Rasa's ``EndpointConfig``).

        Raises ``ConfigurationError`` (a ``ValueError``) for a bad key or value, before any
        connection is made, and ``DeliveryError`` when the service cannot be reached.
        """
        if broker_config is None:
            return None
        return cls(await _native.connect(cls._type, options_from_endpoint_config(broker_config)))

    @classmethod
    async def connect(cls, **options: Any) -> "_RustEventBroker":
        """Connects with ``options`` as keyword arguments (the ``event_broker:`` keys)."""
        return cls(await _native.connect(cls._type, list(options.items())))

    @classmethod
    def check(cls, **options: Any) -> Tuple[str, List[str]]:
        """Checks ``options`` as ``broker check`` does, without connecting: returns where events
        would go and the warnings; raises ``ConfigurationError``."""
        return _native.validate(cls._type, list(options.items()))

    def publish(self, event: Dict[str, Any], headers: Optional[Dict[str, str]] = None) -> "_native.Receipt":
        """Hands ``event`` to the delivery pipeline and returns its receipt at once.

        The bytes sent are those of ``json.dumps(event)``, as Rasa's own brokers send (the
        dict is encoded in Rust; anything but built-in types goes through ``json.dumps``). With the buffer
        full, ``when_full: block`` (the default) waits for room and ``when_full: error`` raises
        ``BufferFullError``. ``headers``: extra message headers (Kafka, RabbitMQ).
        """
        return self._native.publish(event, headers)

    def is_ready(self) -> bool:
        """Whether the broker can deliver now (connected, not closed)."""
        return self._native.is_ready()

    async def flush(self) -> None:
        """Waits until every event published before the call has its outcome."""
        await self._native.flush()

    async def close(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        """Delivers what is outstanding (within ``close_timeout``) and disconnects; returns the
        events it could not deliver, in publish order (empty when all were delivered)."""
        undelivered = await self._native.close()
        if undelivered:
            logger.warning("%s: %d events were not delivered", self._native.describe, len(undelivered))
        return undelivered

    def stats(self) -> Dict[str, int]:
        """Delivery counters: accepted, refused, delivered, rejected, failed, pending,
        undelivered."""
        return self._native.stats()

    @property
    def destination(self) -> str:
        """Where events go, for people (never a secret)."""
        return self._native.describe

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._native.describe}>"


class KafkaEventBroker(_RustEventBroker):
    """Kafka (``type: kafka`` keys: ``url``, ``topic``, ``partition_by_sender``, SASL/SSL, ...)."""

    _type = "kafka"


class PikaEventBroker(_RustEventBroker):
    """RabbitMQ (``type: pika`` keys: ``url``, ``username``, ``password``, ``queues``,
    ``exchange_name``, ...)."""

    _type = "pika"


class SQLEventBroker(_RustEventBroker):
    """SQLite or PostgreSQL (``type: sql`` keys: ``dialect``, ``host``, ``db``, ...), Rasa's
    ``events`` table."""

    _type = "sql"


class FileEventBroker(_RustEventBroker):
    """An append-only file of JSON lines (``type: file`` keys: ``path``, ...)."""

    _type = "file"
