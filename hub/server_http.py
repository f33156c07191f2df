"""The HTTP layer of ``adapterhub serve``: routing, body limits, JSON replies and one log line per request.

The handler knows nothing about models: it maps ``(method, path)`` to a method of the
:class:`~adapterhub.server.CompletionServer` it serves (``server.app``), turns :class:`ApiError` into its
status + JSON body and any other exception into a 500 (logged with its traceback on the server's stderr,
never sent to the client). Connections are HTTP/1.1 keep-alive; every reply carries a Content-Length.
"""

from __future__ import annotations

import json
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlsplit

from .server_api import ApiError

# path -> {method: CompletionServer method name}; "/v1/adapters/" routes take the rest of the path as a name
ROUTES: dict[str, dict[str, str]] = {
    "/health": {"GET": "get_health"},
    "/v1/models": {"GET": "get_models"},
    "/v1/completions": {"POST": "post_completions"},
    "/v1/adapters": {"GET": "get_adapters", "POST": "post_adapters"},
    "/v1/adapters/": {"DELETE": "delete_adapter"},
}


def route(path: str) -> tuple[dict[str, str], str | None]:
    """The methods of ``path``'s route and its name argument; 404 for an unknown path."""
    path = path.rstrip("/") or "/"
    if path in ROUTES:
        return ROUTES[path], None
    prefix = "/v1/adapters/"
    if path.startswith(prefix) and len(path) > len(prefix):
        return ROUTES[prefix], unquote(path[len(prefix):])
    raise ApiError(404, f"no route {path}: the server has /health, /v1/models, /v1/completions, /v1/adapters",
                   "not_found_error", "unknown_route")


class Handler(BaseHTTPRequestHandler):
    """One connection; ``self.server.app`` is the CompletionServer."""

    protocol_version = "HTTP/1.1"
    server_version = "adapterhub"
    timeout = 60  # seconds a client may take to send a request (socket timeout)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def _handle(self, method: str) -> None:
        app = self.server.app  # type: ignore[attr-defined]
        start = time.monotonic()
        with app._changed:
            app._handlers += 1
        path = urlsplit(self.path).path
        headers: dict[str, str] = {}
        try:
            try:
                methods, arg = route(path)
                if method not in methods:
                    headers["Allow"] = ", ".join(methods)
                    raise ApiError(405, f"{method} is not allowed on {path} (allowed: {', '.join(methods)})",
                                   "invalid_request_error", "method_not_allowed")
                handler = getattr(app, methods[method])
                args = [arg] if arg is not None else []
                if method == "POST":
                    args.append(self._read_body(app.max_body))
                status, payload = 200, handler(*args)
            except ApiError as exc:
                status, payload = exc.status, exc.body()
            except Exception as exc:  # noqa: BLE001 - a bug must not take the server down or reach the client
                app.log(f"error: {method} {path}: {type(exc).__name__}: {exc}")
                app._log_traceback()
                status = 500
                payload = ApiError(500, f"internal server error ({type(exc).__name__}); see the server log",
                                   "server_error", "internal_error").body()
            note = ""
            try:
                self._send(status, payload, headers)
            except OSError as exc:  # the client went away while its request ran
                self.close_connection = True
                note = f" (reply not delivered: {type(exc).__name__})"
            app.log(f'{self.client_address[0]} "{method} {self.path}" {status} '
                    f"{(time.monotonic() - start) * 1000:.0f}ms{note}")
        finally:
            with app._changed:
                app._handlers -= 1
                app._changed.notify_all()

    def _read_body(self, limit: int) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "chunked request bodies are not supported; send a Content-Length",
                           "invalid_request_error", "length_required")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise ApiError(411, "a POST needs a Content-Length header", "invalid_request_error", "length_required")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ApiError(400, f"bad Content-Length {length!r}", "invalid_request_error", "bad_length") from None
        if n > limit:
            self.close_connection = True  # the body is left unread, so this connection cannot be reused
            raise ApiError(413, f"the request body has {n} bytes; the limit is {limit}", "invalid_request_error",
                           "body_too_large")
        return self.rfile.read(n)

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors the stdlib raises itself (a malformed request line, header too long) as JSON too."""
        self.close_connection = True
        phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "Error"
        try:
            self._send(code, ApiError(code, message or phrase, "invalid_request_error", "bad_http").body())
        except OSError:
            pass
        app = self.server.app  # type: ignore[attr-defined]
        app.log(f'{self.client_address[0]} "{getattr(self, "requestline", "")}" {code} ({message or phrase})')

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        """Silenced: ``_handle`` logs one line per request itself (with the time taken)."""

    def log_message(self, format: str, *args: Any) -> None:
        self.server.app.log(f"{self.client_address[0]} {format % args}")  # type: ignore[attr-defined]
