"""How a live producer ends badly: its errors and the process exit codes they map to.

Exit codes of ``arbstream produce`` (a supervisor such as compose ``restart: on-failure`` or
systemd ``Restart=on-failure`` restarts the process on any of them):

* 0: stopped by SIGTERM/SIGINT, every record delivered;
* 1: bad configuration or Kafka unreachable at start-up (topics cannot be created);
* 3 (:data:`EXIT_UNDELIVERED`): stopped, but records were not confirmed delivered within
  ``ARB_PRODUCER_CLOSE_TIMEOUT_SECONDS`` (broker down at shutdown);
* 4 (:data:`EXIT_FATAL`): librdkafka reported a fatal error (``KafkaError.fatal()``, e.g. an
  idempotent-producer sequence error): the producer instance cannot continue;
* 5 (:data:`EXIT_PRODUCER_ERROR`): a non-fatal but unrecoverable client error (a produce
  exception that is not about one record, a delivery error such as an authorization failure).
"""

from __future__ import annotations

EXIT_UNDELIVERED = 3
EXIT_FATAL = 4
EXIT_PRODUCER_ERROR = 5


class ProducerError(RuntimeError):
    """The publisher stopped: a client problem it cannot recover from.

    Attributes:
        undelivered: records not confirmed delivered when the publisher stopped (its queue,
            the records in hand and librdkafka's outstanding records); set by ``close``.
        spooled: True when those records are in the on-disk spool and will be re-sent at the
            next start.
        exit_code: the process exit code for this outcome.
    """

    exit_code = EXIT_PRODUCER_ERROR

    def __init__(self, message: str, undelivered: int = 0, spooled: bool = False) -> None:
        super().__init__(message)
        self.undelivered = undelivered
        self.spooled = spooled

    def __str__(self) -> str:
        text = super().__str__()
        if self.undelivered:
            where = ("kept in the spool, re-sent at the next start" if self.spooled
                     else "lost with this process")
            text += f"; {self.undelivered} records not delivered ({where})"
        return text


class ProducerFatalError(ProducerError):
    """librdkafka raised a fatal error (``KafkaError.fatal()``); the process must restart."""

    exit_code = EXIT_FATAL


class UndeliveredError(ProducerError):
    """The shutdown deadline passed with records not confirmed delivered."""

    exit_code = EXIT_UNDELIVERED
