"""SMTP transport: STARTTLS, implicit TLS or plain, optional AUTH, retries with exponential
backoff (tenacity) on transient failures only.

Failures are classified:

* **permanent** (:class:`PermanentSmtpError`, never retried): authentication rejected (535 and
  any other 5xx to AUTH), every recipient refused with a 5xx, sender or message refused with a
  5xx, the server lacks STARTTLS or AUTH, the certificate does not verify;
* **transient** (:class:`TransientSmtpError`, retried up to ``ARB_SMTP_RETRY_ATTEMPTS`` times,
  waiting ``initial × 2^(n−1)`` seconds capped at ``ARB_SMTP_RETRY_MAX_SECONDS``): connection
  refused, reset or timed out, server disconnected, any 4xx reply.

The password is only handed to ``smtplib.SMTP.login``; it appears in no log line or error.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from arbstream.config import Settings

log = logging.getLogger(__name__)


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


def tls_context(settings: Settings) -> ssl.SSLContext:
    """A verifying client TLS context: system CAs plus ``ARB_SMTP_CA_FILE``."""
    ctx = ssl.create_default_context()
    if settings.smtp_ca_file is not None:
        ctx.load_verify_locations(cafile=str(settings.smtp_ca_file))
    return ctx


def send_budget_seconds(settings: Settings) -> float:
    """Upper bound on how long :meth:`SmtpTransport.send` can take, seconds: every attempt
    timing out on connect, TLS, AUTH and the message (4 timeouts), plus every backoff delay."""
    waits = sum(min(settings.smtp_retry_max_seconds,
                    settings.smtp_retry_initial_seconds * 2 ** n)
                for n in range(settings.smtp_retry_attempts - 1))
    return settings.smtp_retry_attempts * 4 * settings.smtp_timeout_seconds + waits


class SmtpTransport:
    """Sends :class:`~email.message.EmailMessage` s through the configured SMTP server.

    Args:
        settings: ``smtp_*`` settings.
        sleep: the backoff sleep (tests may pass a recorder).
    """

    def __init__(self, settings: Settings, sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self._sleep = sleep

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        if s.smtp_security == "tls":
            return smtplib.SMTP_SSL(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_seconds,
                                    context=tls_context(s))
        client = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_seconds)
        if s.smtp_security == "starttls":
            try:
                client.ehlo()
                client.starttls(context=tls_context(s))
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
        s = self.settings
        try:
            client = self._connect()
            try:
                if s.smtp_username is not None and s.smtp_password is not None:
                    client.login(s.smtp_username, s.smtp_password.get_secret_value())
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
        s = self.settings
        mid = msg.get("Message-ID", "?")

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            log.warning("SMTP attempt %d for %s failed (%s); retrying in %.1f s",
                        state.attempt_number, mid, exc, delay)

        retrying = Retrying(
            stop=stop_after_attempt(s.smtp_retry_attempts),
            wait=wait_exponential(multiplier=s.smtp_retry_initial_seconds,
                                  max=s.smtp_retry_max_seconds),
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
