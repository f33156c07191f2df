"""The scheduler thread of ``adapterhub serve``: it loops ``engine.step()`` while the engine has work.

It sleeps on a condition variable while the engine is idle (no busy spin); :meth:`Scheduler.wake` after a
``submit`` starts it again. After every step it records how many requests got a token in that step (the
running batch: :attr:`ServerStats.max_batch`, :attr:`ServerStats.batch_sizes`) and cancels requests whose
text now contains one of their ``stop`` strings. A step that raises fails every request in flight (their
clients get a 500) and the loop goes on.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .server_api import truncate_at_stop


@dataclass
class Tracked:
    """A request in flight, as the server sees it."""

    request: Any  # adapterhub.generation.Request
    adapter: str | None
    stops: list[str]
    stopped: bool = False  # cancelled by the scheduler because a stop string appeared
    error: str | None = None  # set when the server failed it (engine failure, unload, shutdown, timeout)
    status: int = 500  # the HTTP status of that failure


@dataclass
class ServerStats:
    """Counters since start: ``max_batch`` is the most requests that got a token in one engine step."""

    steps: int = 0
    max_batch: int = 0
    tokens: int = 0
    completed: int = 0
    failed: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # requests given a token in a step -> steps

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "max_batch": self.max_batch, "tokens": self.tokens,
                "completed": self.completed, "failed": self.failed,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


class Scheduler:
    """Runs ``engine.step()`` in its own thread. ``in_flight()`` returns the server's tracked requests;
    ``decode(ids) -> str`` is for stop strings; ``stats`` is updated under ``lock`` (the server's)."""

    def __init__(self, engine, in_flight: Callable[[], list[Tracked]], decode: Callable[[list[int]], str],
                 lock: threading.Lock, log: Callable[[str], None]):
        self.engine, self.in_flight, self.decode, self.lock, self.log = engine, in_flight, decode, lock, log
        self.stats = ServerStats()
        self._work = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = threading.Thread(target=self._run, name="adapterhub-scheduler",
                                                                 daemon=True)
        self._thread.start()

    def wake(self) -> None:
        with self._work:
            self._work.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        with self._work:
            self._stop = True
            self._work.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def fail(self, tracked: list[Tracked], message: str, status: int = 500) -> None:
        """End requests the server gives up on; their handlers answer ``status`` with ``message``."""
        for t in tracked:
            if t.request.done.is_set():
                continue
            t.error, t.status = message, status
            try:
                self.engine.cancel(t.request)
            except Exception as exc:  # pragma: no cover - a broken engine; the event below still frees the client
                self.log(f"error: cancel failed: {exc}")
            t.request.done.set()
        self.wake()

    def _run(self) -> None:
        while True:
            with self._work:
                self._work.wait_for(lambda: self._stop or self.engine.has_work())
                if self._stop:
                    return
            with self.lock:
                tracked = self.in_flight()
            before = [len(t.request.output_ids) for t in tracked]
            try:
                self.engine.step()
            except Exception as exc:  # the engine's state is unknown: fail what is in flight, keep serving
                self.log(f"error: engine step failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                self.fail(tracked, f"generation failed: {type(exc).__name__}: {exc}")
                continue
            grown = [len(t.request.output_ids) - n for t, n in zip(tracked, before)]
            batch = sum(g > 0 for g in grown)
            with self.lock:
                s = self.stats
                s.steps += 1
                s.tokens += sum(grown)
                s.max_batch = max(s.max_batch, batch)
                s.batch_sizes[batch] = s.batch_sizes.get(batch, 0) + 1
            for t in tracked:
                r = t.request
                if t.stops and not t.stopped and not r.done.is_set() and \
                        truncate_at_stop(self.decode(r.output_ids), t.stops)[1]:
                    t.stopped = True
                    self.engine.cancel(r)
