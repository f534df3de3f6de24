"""SMTP transport: STARTTLS, implicit TLS or plain, optional AUTH, retries with exponential
backoff (tenacity) on transient failures only.

Failures are classified:

* **permanent** (:class:`PermanentSmtpError`, never retried): authentication rejected (535 and
  any other 5xx to AUTH), every recipient refused with a 5xx, sender or message refused with a
  5xx, the server lacks STARTTLS or AUTH, the certificate does not verify;
* **transient** (:class:`TransientSmtpError`, retried up to ``ARB_SMTP_RETRY_ATTEMPTS`` times,
  waiting ``initial × 2^(n−1)`` seconds capped at ``ARB_SMTP_RETRY_MAX_SECONDS``): connection
  refused, reset or timed out, server disconnected, any 4xx reply.

The transport takes :class:`SmtpConfig`, the SMTP slice of the settings. The password stays a
:class:`~pydantic.SecretStr` (``'**********'`` in ``repr``) and is only handed to
``smtplib.SMTP.login``; it appears in no log line or error.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import SecretStr
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

if TYPE_CHECKING:
    from arbstream.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmtpConfig:
    """The SMTP slice of :class:`~arbstream.config.Settings` (``ARB_SMTP_*``).

    ``security`` is ``starttls``, ``tls`` (implicit TLS, port 465 style) or ``none``;
    ``username`` and ``password`` (a secret, hidden from ``repr``) are both set or both
    ``None``; ``ca_file`` an extra CA bundle trusted besides the system's. Durations are
    seconds: ``timeout_seconds`` per connection or command, backoff delays
    ``retry_initial_seconds × 2^(n−1)`` capped at ``retry_max_seconds``, over at most
    ``retry_attempts`` attempts per e-mail.
    """

    host: str
    port: int
    security: Literal["starttls", "tls", "none"]
    username: str | None
    password: SecretStr | None
    ca_file: Path | None
    timeout_seconds: float
    retry_attempts: int
    retry_initial_seconds: float
    retry_max_seconds: float

    @classmethod
    def of(cls, settings: Settings) -> SmtpConfig:
        """The SMTP slice of ``settings`` (every ``smtp_*`` key)."""
        return cls(
            host=settings.smtp_host, port=settings.smtp_port, security=settings.smtp_security,
            username=settings.smtp_username, password=settings.smtp_password,
            ca_file=settings.smtp_ca_file, timeout_seconds=settings.smtp_timeout_seconds,
            retry_attempts=settings.smtp_retry_attempts,
            retry_initial_seconds=settings.smtp_retry_initial_seconds,
            retry_max_seconds=settings.smtp_retry_max_seconds,
        )


class SmtpError(Exception):
    """An e-mail could not be delivered. ``code`` is the SMTP reply code when there was one,
    ``attempts`` how many times it was tried."""

    permanent = False

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.attempts = 1


class PermanentSmtpError(SmtpError):
    """Retrying cannot help (bad credentials, refused recipients, TLS misconfiguration)."""

    permanent = True


class TransientSmtpError(SmtpError):
    """May succeed later (server down or busy, network error, 4xx reply)."""


@dataclass
class SendResult:
    """A delivered e-mail: ``attempts`` made, and the recipients the server refused while
    accepting the others (``address -> (code, reply)``)."""

    attempts: int
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


def _reply(code: int, msg: bytes | str) -> str:
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
    return f"{code} {text}".strip()


def classify(exc: BaseException) -> SmtpError:
    """Map an ``smtplib``/socket/TLS exception to a permanent or transient :class:`SmtpError`."""
    if isinstance(exc, SmtpError):
        return exc
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        kind = TransientSmtpError if 400 <= exc.smtp_code < 500 else PermanentSmtpError
        return kind(f"authentication rejected: {_reply(exc.smtp_code, exc.smtp_error)}",
                    exc.smtp_code)
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        detail = "; ".join(f"{rcpt}: {_reply(c, m)}" for rcpt, (c, m) in exc.recipients.items())
        kind = TransientSmtpError if codes and all(400 <= c < 500 for c in codes) else (
            PermanentSmtpError)
        return kind(f"every recipient refused: {detail}", max(codes) if codes else None)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return PermanentSmtpError(f"server does not support it: {exc}")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return TransientSmtpError(f"server disconnected: {exc}")
    if isinstance(exc, smtplib.SMTPResponseException):
        what = type(exc).__name__.removeprefix("SMTP")
        text = f"{what}: {_reply(exc.smtp_code, exc.smtp_error)}"
        if 400 <= exc.smtp_code < 500:
            return TransientSmtpError(text, exc.smtp_code)
        return PermanentSmtpError(text, exc.smtp_code)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return PermanentSmtpError(f"TLS certificate not trusted: {exc.verify_message or exc}")
    if isinstance(exc, smtplib.SMTPException):
        return PermanentSmtpError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, OSError):  # refused, reset, unreachable, timeout, DNS, TLS errors
        return TransientSmtpError(f"{type(exc).__name__}: {exc}")
    raise exc


def tls_context(config: SmtpConfig) -> ssl.SSLContext:
    """A verifying client TLS context: system CAs plus ``config.ca_file``
    (``ARB_SMTP_CA_FILE``).

    Raises:
        OSError, ssl.SSLError: the CA file cannot be read or parsed.
    """
    ctx = ssl.create_default_context()
    if config.ca_file is not None:
        ctx.load_verify_locations(cafile=str(config.ca_file))
    return ctx


def send_budget_seconds(config: SmtpConfig) -> float:
    """Upper bound on how long :meth:`SmtpTransport.send` can take, seconds: every attempt
    timing out on connect, TLS, AUTH and the message (4 timeouts), plus every backoff delay."""
    waits = sum(min(config.retry_max_seconds, config.retry_initial_seconds * 2 ** n)
                for n in range(config.retry_attempts - 1))
    return config.retry_attempts * 4 * config.timeout_seconds + waits


class SmtpTransport:
    """Sends :class:`~email.message.EmailMessage` s through the configured SMTP server.

    Args:
        config: the server, security, credentials, timeout and retry policy.
        sleep: the backoff sleep, seconds (tests may pass a recorder).
    """

    def __init__(self, config: SmtpConfig,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self._sleep = sleep

    def _connect(self) -> smtplib.SMTP:
        c = self.config
        if c.security == "tls":
            return smtplib.SMTP_SSL(c.host, c.port, timeout=c.timeout_seconds,
                                    context=tls_context(c))
        client = smtplib.SMTP(c.host, c.port, timeout=c.timeout_seconds)
        if c.security == "starttls":
            try:
                client.ehlo()
                client.starttls(context=tls_context(c))
                client.ehlo()
            except BaseException:
                client.close()
                raise
        return client

    def send_once(self, msg: EmailMessage) -> dict[str, tuple[int, str]]:
        """One delivery attempt.

        Returns:
            The refused recipients when the server accepted the others.

        Raises:
            PermanentSmtpError, TransientSmtpError: see the module docstring.
        """
        c = self.config
        try:
            client = self._connect()
            try:
                if c.username is not None and c.password is not None:
                    client.login(c.username, c.password.get_secret_value())
                refused = client.send_message(msg)
            finally:
                try:
                    client.quit()
                except (smtplib.SMTPException, OSError):
                    client.close()
        except Exception as exc:  # classified; an unexpected exception propagates as is
            raise classify(exc) from exc
        return {rcpt: (code, _reply(code, m)) for rcpt, (code, m) in refused.items()}

    def send(self, msg: EmailMessage) -> SendResult:
        """Deliver ``msg``, retrying transient failures with exponential backoff.

        Returns:
            :class:`SendResult` (attempts made, recipients refused while others accepted).

        Raises:
            PermanentSmtpError: at once, on a permanent failure.
            TransientSmtpError: the last transient failure, after every attempt failed.
            Either carries ``attempts``.
        """
        c = self.config
        mid = msg.get("Message-ID", "?")

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            log.warning("SMTP attempt %d for %s failed (%s); retrying in %.1f s",
                        state.attempt_number, mid, exc, delay)

        retrying = Retrying(
            stop=stop_after_attempt(c.retry_attempts),
            wait=wait_exponential(multiplier=c.retry_initial_seconds, max=c.retry_max_seconds),
            retry=retry_if_exception_type(TransientSmtpError),
            reraise=True, sleep=self._sleep, before_sleep=before_sleep,
        )
        attempts = 0
        try:
            for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    refused = self.send_once(msg)
        except SmtpError as exc:
            exc.attempts = attempts
            raise
        return SendResult(attempts=attempts, refused=refused)
