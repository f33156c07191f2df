"""``adapterhub serve``: an OpenAI-style HTTP server over one base model and many adapters.

One stdlib ``ThreadingHTTPServer`` (a thread per connection) plus one scheduler thread. A handler thread parses a
request, submits one :class:`~adapterhub.generation.Request` per prompt to the shared
:class:`~adapterhub.generation.GenerationEngine` and waits on ``request.done``; the scheduler thread calls
``engine.step()`` while the engine has work (it sleeps on a condition variable when idle), so requests from
concurrent clients, whatever their adapters, are decoded together in one batch (continuous batching: a request
joins and leaves the running batch at step boundaries).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``GET /v1/adapters``,
``POST /v1/adapters`` (load at runtime; reading the bundle holds the engine between two steps) and
``DELETE /v1/adapters/<name>`` (unload at runtime: new requests for it are refused at once with 404; requests
already in flight on it finish first -- up to ``drain_timeout`` seconds, after which they fail with a 500 -- and
then the adapter leaves the pool). Every error is a JSON body ``{"error": {"message", "type", "code", "param"}}``;
a failure inside the server is a 500 and the server keeps serving. ``stop`` strings are checked by the scheduler
after every step: a request whose text contains one is cancelled at once and its text cut before it.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from adapterhub.registry import AdapterhubError

from .server_api import (
    ApiError,
    CompletionParams,
    bad_request,
    completion_object,
    model_entry,
    not_found,
    parse_adapter_load,
    parse_completion,
    parse_json,
    truncate_at_stop,
)
from .server_http import Handler
from .server_scheduler import Scheduler, Tracked
from .server_sources import AdapterCatalog, AdapterSource, NameInUse, expand_source


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 128  # the listen backlog: socketserver's default of 5 resets bursts of clients
    daemon_threads = True


class CompletionServer:
    """The server (see the module docstring). ``start()`` serves in a background thread, ``serve_forever()``
    in the calling one; ``shutdown()`` stops taking requests, lets those in flight finish (``grace`` seconds),
    then stops the scheduler and closes the socket."""

    def __init__(self, engine, codec, *, model_name: str, pool=None, host: str = "127.0.0.1", port: int = 0,
                 max_seq_len: int, vocab_size: int | None = None, store_home: str | Path | None = None,
                 quiet: bool = False, request_timeout: float = 300.0, drain_timeout: float = 60.0,
                 max_body: int = 1 << 20, log: Callable[[str], None] | None = None):
        self.engine, self.codec, self.pool, self.model_name = engine, codec, pool, model_name
        self.max_seq_len, self.vocab_size, self.store_home = max_seq_len, vocab_size, store_home
        self.quiet, self.request_timeout, self.drain_timeout, self.max_body = quiet, request_timeout, \
            drain_timeout, max_body
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.created = int(time.time())
        self._lock = threading.Lock()  # guards everything below; never held while waiting for engine.lock ...
        self._changed = threading.Condition(self._lock)  # ... except around engine.submit (see _submit)
        self._inflight: dict[int, Tracked] = {}
        self.catalog = AdapterCatalog(model_name)  # adapter names and aliases
        self._draining: set[str] = set()  # adapters being unloaded
        self._loading = threading.Lock()  # one load at a time (two loads of one name must not race)
        self._handlers = 0
        self._closing = False
        try:
            self._httpd = _HTTPServer((host, port), Handler)
        except OSError as exc:
            raise AdapterhubError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self._httpd.app = self  # type: ignore[attr-defined]
        self._serving = False
        self._serve_thread: threading.Thread | None = None
        self.scheduler = Scheduler(engine, lambda: list(self._inflight.values()), self._decode, self._lock, self.log)
        self.stats = self.scheduler.stats

    # -- lifecycle -----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> CompletionServer:
        """Serve in a background thread; returns self."""
        self._serving = True
        self._serve_thread = threading.Thread(target=self._httpd.serve_forever, name="adapterhub-http", daemon=True)
        self._serve_thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until ``shutdown()`` from another thread or KeyboardInterrupt."""
        self._serving = True
        self._httpd.serve_forever()

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting requests (new completions get 503), wait up to ``grace`` s for those in flight,
        fail the rest, stop the scheduler and close the socket. Safe to call twice."""
        with self._lock:
            if self._closing and not self.scheduler.running:
                return
            self._closing = True
        if self._serving:
            self._httpd.shutdown()  # returns once serve_forever has stopped (at once if it already has)
            self._serving = False
        deadline = time.monotonic() + grace
        with self._changed:
            self._changed.wait_for(lambda: not self._inflight, timeout=max(0.0, deadline - time.monotonic()))
            left = list(self._inflight.values())
        self.scheduler.fail(left, "the server shut down before this request finished", 503)
        with self._changed:
            self._changed.wait_for(lambda: self._handlers == 0, timeout=max(1.0, deadline - time.monotonic()))
        self.scheduler.stop()
        self._httpd.server_close()

    def __enter__(self) -> CompletionServer:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def log(self, line: str) -> None:
        if not self.quiet:
            self._log(line)

    def _log_traceback(self) -> None:
        if not self.quiet:
            self._log(traceback.format_exc().rstrip())

    # -- adapters ------------------------------------------------------------------------------------

    def resolve_model(self, model: str) -> str | None:
        """The canonical adapter name for ``model`` (an adapter name or alias), None for the base model;
        404 for anything else (call with ``_lock`` held)."""
        name = self.catalog.canonical(model)
        if name is not None:
            if name in self._draining:
                raise not_found(f"adapter '{model}' is being unloaded", param="model", code="model_not_found")
            return name
        if model == self.model_name:
            return None
        from .store_refs import did_you_mean

        raise not_found(f"no adapter or model named '{model}'{did_you_mean(model, self.catalog.known())} "
                        "(GET /v1/models lists them)", param="model", code="model_not_found")

    def load(self, spec: str, name: str | None = None,
             progress: Callable[[AdapterSource, int, int], None] | None = None) -> list[AdapterSource]:
        """Load the adapters ``spec`` names (see adapterhub.server_sources) into the pool, between engine steps;
        ``name`` renames a single adapter. A store version already loaded is not loaded twice (only its new
        aliases are added); another source under a name already in use is a 409 (ApiError).
        ``progress(item, i, n)`` is called after the i-th (1-based) of the n adapters is loaded."""
        items = expand_source(spec, self.store_home)
        if name is not None:
            if len(items) != 1:
                raise bad_request(f"'name' given, but '{spec}' holds {len(items)} adapters", param="name")
            items = [AdapterSource(name, items[0].source, [], items[0].immutable, items[0].origin)]
        done = []
        with self._loading:
            for i, item in enumerate(items, 1):
                try:
                    with self._lock:
                        fresh = self.catalog.needs_loading(item)
                except NameInUse as exc:
                    raise ApiError(409, str(exc), "conflict_error", "name_in_use", "name") from None
                if fresh:
                    with self.engine.lock:  # between steps
                        self.pool.add(item.source, name=item.name)
                with self._lock:
                    done.append(self.catalog.add(item))
                if progress is not None:
                    progress(item, i, len(items))
        return done

    def unload(self, model: str) -> dict[str, Any]:
        """Unload an adapter (or the one an alias names): refuse new requests for it, let those in flight
        finish (failing them after ``drain_timeout`` s), then remove it from the pool."""
        with self._lock:
            name = self.catalog.canonical(model)
            if name is None:
                raise not_found(f"no adapter named '{model}' is loaded", code="model_not_found")
            if name in self._draining:
                raise ApiError(409, f"adapter '{name}' is already being unloaded", "conflict_error", "unloading")
            self._draining.add(name)
        try:
            with self._changed:
                users = lambda: [t for t in self._inflight.values() if t.adapter == name]  # noqa: E731
                drained = self._changed.wait_for(lambda: not users(), timeout=self.drain_timeout)
                left = [] if drained else users()
            self.scheduler.fail(left, f"adapter '{name}' was unloaded while this request ran")
            with self._changed:
                self._changed.wait_for(lambda: not users(), timeout=self.drain_timeout)
            with self.engine.lock:
                self.pool.remove(name)
            with self._lock:
                entry = self.catalog.remove(name)
        finally:
            with self._lock:
                self._draining.discard(name)
        return {"id": name, "object": "adapter", "deleted": True, "aliases": entry.aliases,
                "failed_in_flight": len(left)}

    # -- endpoints -----------------------------------------------------------------------------------

    def get_health(self) -> dict[str, Any]:
        with self._lock:
            by_adapter: dict[str, int] = {}
            for t in self._inflight.values():
                key = t.adapter or self.model_name
                by_adapter[key] = by_adapter.get(key, 0) + 1
            return {"status": "closing" if self._closing else "ok", "model": self.model_name,
                    "adapters": len(self.catalog.loaded), "in_flight": len(self._inflight),
                    "in_flight_by_model": by_adapter, "unloading": sorted(self._draining),
                    "stats": self.stats.to_json()}

    def get_models(self) -> dict[str, Any]:
        with self._lock:
            data = [model_entry(self.model_name, self.created, self.model_name)]
            data += [model_entry(n, self.created, self.model_name) for n in self.catalog.loaded]
            data += [model_entry(a, self.created, self.model_name, parent=n) for a, n in self.catalog.aliases.items()]
        return {"object": "list", "data": data}

    def get_adapters(self) -> dict[str, Any]:
        with self._lock:
            data = [{"id": n, "object": "adapter", "source": e.origin or e.source, "aliases": list(e.aliases)}
                    for n, e in self.catalog.loaded.items()]
        stats = dict(self.pool.stats()) if self.pool is not None else {}  # the pool has its own lock
        return {"object": "list", "data": data, "pool": stats}

    def post_adapters(self, raw: bytes) -> dict[str, Any]:
        source, name = parse_adapter_load(parse_json(raw))
        if self.pool is None:
            raise bad_request("this server has no adapter pool")
        try:
            loaded = self.load(source, name)
        except AdapterhubError as exc:
            from .store import StoreError

            raise (not_found(str(exc), "source") if isinstance(exc, StoreError)
                   else bad_request(str(exc), "source")) from None
        return {"object": "list", "data": [{"id": e.name, "object": "adapter", "source": e.origin or e.source,
                                            "aliases": list(e.aliases)} for e in loaded]}

    def delete_adapter(self, name: str) -> dict[str, Any]:
        return self.unload(name)

    def post_completions(self, raw: bytes) -> dict[str, Any]:
        p = parse_completion(parse_json(raw))
        prompts = [self._prompt_ids(x, i, len(p.prompts)) for i, x in enumerate(p.prompts)]
        tracked = self._submit(p, prompts)
        try:
            deadline = time.monotonic() + self.request_timeout
            for t in tracked:
                if not t.request.done.wait(max(0.0, deadline - time.monotonic())):
                    self.scheduler.fail(tracked, f"the request took longer than {self.request_timeout:g} s", 504)
                    raise ApiError(504, f"generation took longer than {self.request_timeout:g} s; it was cancelled",
                                   "timeout_error", "timeout")
            choices = [self._choice(t, p.return_token_ids) for t in tracked]
        finally:
            with self._changed:
                for t in tracked:
                    self._inflight.pop(id(t.request), None)
                ok = all(t.error is None and t.request.finish_reason != "error" for t in tracked)
                self.stats.completed += ok
                self.stats.failed += not ok
                self._changed.notify_all()
        used = sum(len(t.request.output_ids) for t in tracked)
        return completion_object(p.model, choices, sum(len(x) for x in prompts), used)

    def _prompt_ids(self, prompt: str | list[int], index: int, count: int) -> list[int]:
        where = f"prompt {index}" if count > 1 else "the prompt"
        if isinstance(prompt, str):
            ids = self.codec.encode(prompt)
        else:
            ids = prompt
            bad = [t for t in ids if t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
            if bad:
                raise bad_request(f"{where} has token id {bad[0]} outside the vocabulary (0..{self.vocab_size - 1})",
                                  param="prompt")
        if not ids:
            raise bad_request(f"{where} is empty", param="prompt")
        return ids

    def _submit(self, p: CompletionParams, prompts: list[list[int]]) -> list[Tracked]:
        for i, ids in enumerate(prompts):
            if len(ids) + p.max_tokens > self.max_seq_len:
                where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
                raise bad_request(f"{where} has {len(ids)} tokens and max_tokens is {p.max_tokens}: "
                                  f"{len(ids) + p.max_tokens} is over this server's limit of {self.max_seq_len} "
                                  "tokens; shorten the prompt or lower max_tokens",
                                  param="max_tokens", code="context_length_exceeded")
        tracked: list[Tracked] = []
        with self._lock:  # submit under the lock, so an unload cannot slip between the name check and submit
            if self._closing:
                raise ApiError(503, "the server is shutting down", "server_error", "shutting_down")
            adapter = self.resolve_model(p.model)
            try:
                for i, ids in enumerate(prompts):  # prompt i samples with seed + i, as adapterhub.generate does
                    r = self.engine.submit(ids, adapter=adapter, max_new_tokens=p.max_tokens,
                                           temperature=p.temperature, top_p=p.top_p,
                                           seed=None if p.seed is None else p.seed + i)
                    tracked.append(Tracked(r, adapter, p.stop))
            except AdapterhubError as exc:
                for t in tracked:
                    self.engine.cancel(t.request)
                raise bad_request(str(exc)) from None
            for t in tracked:
                self._inflight[id(t.request)] = t
        self.scheduler.wake()
        return tracked

    def _decode(self, ids: list[int]) -> str:
        eos = self.codec.eos_id
        return self.codec.decode(ids[:-1] if eos is not None and ids and ids[-1] == eos else ids)

    def _choice(self, t: Tracked, with_ids: bool) -> tuple[str, str, list[int] | None]:
        """``(text, finish_reason, token_ids)``; ``token_ids`` (when asked for) are every generated token,
        the tokens of a stop string included."""
        r = t.request
        ids = list(r.output_ids) if with_ids else None
        if t.error is not None:
            raise ApiError(t.status, t.error, "server_error", "generation_failed")
        if r.finish_reason == "error":
            raise ApiError(500, f"generation failed: {r.error}", "server_error", "generation_failed")
        text, cut = truncate_at_stop(self._decode(r.output_ids), t.stops)
        if cut or t.stopped:
            return text, "stop", ids
        if r.finish_reason == "cancelled":  # pragma: no cover - only the server cancels, and it marks why
            raise ApiError(500, "the request was cancelled", "server_error", "cancelled")
        return text, r.finish_reason or "length", ids


def model_max_len(model) -> int:
    """The longest sequence the model's positions allow (``max_position_embeddings`` / ``n_positions``)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def create_server(model: str, adapters: Sequence[str] = (), *, host: str = "127.0.0.1", port: int = 8000,
                  max_batch: int = 32, max_resident: int = 64, max_seq_len: int | None = None,
                  max_rank: int | None = None, device: str | None = None, home: str | Path | None = None,
                  quiet: bool = False, request_timeout: float = 300.0, log: Callable[[str], None] | None = None,
                  progress: Callable[[str, AdapterSource, int, int], None] | None = None) -> CompletionServer:
    """Load ``model`` (a built-in name, a directory or a cached Hub id), its text codec, an adapter pool and a
    generation engine; load every ``adapters`` source (``progress(spec, item, i, n)`` after each adapter); return
    the server, bound but not yet serving."""
    import torch

    from .adapter_pool import AdapterPool
    from .generation import GenerationEngine
    from .models import load_model
    from .text_codec import text_codec

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    m = load_model(model).to(dev).eval()
    limit = model_max_len(m)
    if max_seq_len is not None:
        if max_seq_len < 2 or max_seq_len > limit:
            raise AdapterhubError(f"--max-seq-len {max_seq_len}: {model} allows 2..{limit} tokens")
        limit = max_seq_len
    codec = text_codec(model)
    pool = AdapterPool(m, max_resident=max_resident, max_rank=max_rank, device=dev)
    engine = GenerationEngine(m, pool, max_batch=max_batch, max_seq_len=limit, eos_id=codec.eos_id)
    vocab = m.get_input_embeddings().num_embeddings
    server = CompletionServer(engine, codec, model_name=model, pool=pool, host=host, port=port, max_seq_len=limit,
                              vocab_size=vocab, store_home=home, quiet=quiet, request_timeout=request_timeout,
                              log=log)
    try:
        for spec in adapters:
            server.load(spec, progress=None if progress is None else
                        lambda item, i, n, spec=spec: progress(spec, item, i, n))
    except ApiError as exc:
        server.shutdown(grace=0)
        raise AdapterhubError(f"--adapters {spec}: {exc.message}") from None
    except BaseException:
        server.shutdown(grace=0)
        raise
    return server
