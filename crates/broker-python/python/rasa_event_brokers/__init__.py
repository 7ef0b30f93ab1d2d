"""Rasa event brokers in Rust: Kafka, RabbitMQ, SQL and file.

Drop-in classes for Rasa's ``endpoints.yml``::

    event_broker:
      type: rasa_event_brokers.KafkaEventBroker   # was: kafka
      url: localhost:9092
      topic: rasa_events

Each class takes the keys of Rasa's broker of the same type (and this project's own:
``buffer_size``, ``when_full``, ``close_timeout``, ...), writes the same bytes Rasa's class
writes, and adds what Rasa's classes do not have: an outcome per event (``publish`` returns a
:class:`Receipt`), ``await flush()``, ``close()`` returning what it could not deliver, and
``stats()``. Log records go to the logger ``rasa_event_brokers``.
"""

from ._native import (
    BrokerClosedError,
    BrokerError,
    BufferFullError,
    ConfigurationError,
    DeliveryError,
    InvalidEventError,
    Receipt,
)
from ._brokers import (
    FileEventBroker,
    KafkaEventBroker,
    PikaEventBroker,
    SQLEventBroker,
    options_from_endpoint_config,
)

__all__ = [
    "BrokerClosedError",
    "BrokerError",
    "BufferFullError",
    "ConfigurationError",
    "DeliveryError",
    "FileEventBroker",
    "InvalidEventError",
    "KafkaEventBroker",
    "PikaEventBroker",
    "Receipt",
    "SQLEventBroker",
    "options_from_endpoint_config",
]
