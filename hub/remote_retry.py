"""Hub errors and retries for :mod:`adapterhub.remote`: which failures are worth retrying, the
backoff, and one-line messages that say what to do (never a request header, so never the token).

Retried: connection errors, timeouts (``httpx2``'s ``TimeoutException``/``NetworkError``/
``RemoteProtocolError``), HTTP 5xx, 408 and 429 (``Retry-After`` honoured). Not retried: offline
mode and every other 4xx (401 bad token, 403 no write access, 404, 412 the branch moved, ...).
"""

from __future__ import annotations

import functools
import http
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from adapterhub.registry import AdapterhubError

__all__ = ["RemoteError", "RetryPolicy", "describe", "hub_errors", "is_transient", "message", "retrying", "status_of"]

logger = logging.getLogger("adapterhub.remote")
T = TypeVar("T")
Notify = Callable[[str], None]


class RemoteError(AdapterhubError):
    """A Hub operation failed (after its retries, where the failure was transient)."""


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries per request; the k-th retry waits ``min(max_delay, base_delay * factor**(k-1))``."""

    attempts: int = 4
    base_delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 30.0
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.factor < 1 or self.max_delay < 0:
            raise ValueError(f"invalid retry policy {self}")

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        d = self.base_delay * self.factor ** (retry - 1)
        return min(self.max_delay, max(d, retry_after or 0.0))


@functools.cache
def _transport_errors() -> tuple[type[BaseException], ...]:
    out: list[type[BaseException]] = [TimeoutError]
    for module in ("httpx2", "httpx"):  # huggingface_hub's HTTP client (httpx2 since 2.x, httpx before)
        try:
            mod = __import__(module)
        except ImportError:
            continue
        out += [mod.TimeoutException, mod.NetworkError, mod.RemoteProtocolError]
    return tuple(out)


def status_of(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: a connection error, a timeout, HTTP 5xx / 408 / 429 -- never offline mode or
    another 4xx. Follows ``raise ... from`` causes (``snapshot_download`` wraps network errors)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (OfflineModeIsEnabled, RemoteError)):
            return False
        status = status_of(current)
        if status is not None:
            return status >= 500 or status in (408, 429)
        if isinstance(current, _transport_errors()):
            return True
        current = current.__cause__
    return False


def describe(exc: BaseException) -> str:
    """One line saying what went wrong, for messages (never a header, so never the token)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled) or isinstance(exc.__cause__, OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE=1); set HF_HUB_OFFLINE=0 to reach the Hub"
    status = status_of(exc)
    if status is not None:
        response = exc.response  # type: ignore[attr-defined]
        try:
            where = f" on {response.request.method} {response.request.url.path}"
        except Exception:  # noqa: BLE001 - a response without its request
            where = ""
        reason = getattr(response, "reason_phrase", "") or _phrase(status)
        server = (getattr(exc, "server_message", None) or "").strip().splitlines()
        return f"HTTP {status} {reason}{where}" + (f": {server[0]}" if server else "")
    if exc.__cause__ is not None and not str(exc).strip():
        return describe(exc.__cause__)
    if exc.__cause__ is not None and is_transient(exc.__cause__):
        return describe(exc.__cause__)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _retry_after(exc: BaseException) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    try:
        return float(headers.get("retry-after"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def retrying(what: str, fn: Callable[[], T], policy: RetryPolicy, notify: Notify) -> T:
    """``fn()``, retried on transient failures (each retry announced to ``notify`` and logged at INFO
    on ``adapterhub.remote``); when they persist, a :class:`RemoteError`."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == policy.attempts:
                tries = f"{policy.attempts} attempts" if policy.attempts > 1 else "1 attempt"
                raise RemoteError(f"{what} failed after {tries} ({describe(exc)})") from exc
            delay = policy.delay(attempt, _retry_after(exc))
            message = f"{what}: {describe(exc)}; retrying in {delay:g}s (attempt {attempt + 1} of {policy.attempts})"
            logger.info(message)  # the CLI prints it through notify; library users can log it
            notify(message)
            policy.sleep(delay)
    raise AssertionError("unreachable")


def _friendly(exc: BaseException, repo_id: str, endpoint: str) -> str | None:
    """What to tell the user about a non-transient Hub error (None: not a Hub error, let it raise)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    status = status_of(exc)
    if isinstance(exc, RepositoryNotFoundError):
        return (f"repository {repo_id} not found on {endpoint} (if it is private, the token must be allowed to "
                "read it: set HF_TOKEN or run `hf auth login`)")
    if status == 401:
        return ("the Hub refused the credentials (HTTP 401): set HF_TOKEN or run `hf auth login` with a token "
                f"that can write to {repo_id}")
    if status == 403:
        return f"not allowed (HTTP 403): the token needs write access to {repo_id} ({describe(exc)})"
    if status == 412:
        return f"{repo_id} changed while pushing (another push at the same time?); run the push again"
    if isinstance(exc, HfHubHTTPError) or isinstance(exc, _transport_errors()):
        return f"the Hub at {endpoint} answered {describe(exc)}" if status else \
            f"cannot reach the Hub at {endpoint} ({describe(exc)})"
    if isinstance(exc, OfflineModeIsEnabled) or isinstance(exc.__cause__, OfflineModeIsEnabled):
        return describe(exc)
    if isinstance(exc, HFValidationError) or (isinstance(exc, ValueError) and "README.md" in str(exc)):
        return str(exc).strip().replace("\n", " ")
    if exc.__cause__ is not None:  # snapshot_download wraps the Hub's error in LocalEntryNotFoundError
        return _friendly(exc.__cause__, repo_id, endpoint)
    if isinstance(exc, LocalEntryNotFoundError):
        return f"the download failed ({describe(exc)})"
    return None


@contextmanager
def hub_errors(repo_id: str, endpoint: str, doing: str) -> Iterator[None]:
    """Turn a Hub error raised inside into ``RemoteError("<doing>: <what to do>")``."""
    try:
        yield
    except AdapterhubError:
        raise
    except Exception as exc:
        message = _friendly(exc, repo_id, endpoint)
        if message is None:
            raise
        raise RemoteError(f"{doing}: {message}") from None


def message(exc: BaseException, repo_id: str, endpoint: str) -> str:
    """The one-line explanation of any failure (for errors that add what it left behind)."""
    if isinstance(exc, AdapterhubError):
        return str(exc)
    return _friendly(exc, repo_id, endpoint) or describe(exc)
