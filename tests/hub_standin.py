"""A local stand-in of the Hugging Face Hub HTTP API, for tests only (it is not part of the package).

The real ``huggingface_hub`` client talks to it through ``HF_ENDPOINT`` (the ``hub`` fixture below sets
it). It keeps model repositories in memory as commits -- each a full ``{path: bytes}`` snapshot with a
parent link -- plus branches and tags, and answers the endpoints the client uses
(/work/shared/reference/hub-http.md):

    POST   /api/repos/create                      create a repo (initial commit with .gitattributes)
    POST   /api/validate-yaml                     README metadata check
    POST   /api/models/{id}/preupload/{rev}       always ``uploadMode: regular`` (files come inline, base64)
    POST   /api/models/{id}/commit/{rev}          NDJSON: header, file, deletedFile, deletedFolder
    GET    /api/models/{id}/refs                  branches and tags
    GET    /api/models/{id}/commits/{rev}         history, newest first, Link-header pagination
    POST   /api/models/{id}/tag/{rev}             create a tag;  DELETE /api/models/{id}/tag/{tag}
    POST   /api/models/{id}/branch/{name}         create a branch;  DELETE likewise
    GET    /api/models/{id}[/revision/{rev}]      repo info: sha, siblings, cardData
    GET    /api/models/{id}/tree/{rev}[/{path}]   file listing (``recursive``)
    HEAD/GET /{id}/resolve/{rev}/{path}           file bytes with X-Repo-Commit, ETag, Content-Length

Failure injection: ``hub.fail("commit", times=2, status=503)`` makes the next two commit requests fail
(``status=None`` drops the connection; ``after=True`` performs the request, then answers the failure --
a lost response). ``hub.calls`` counts requests per endpoint; ``hub.auth_headers`` records the
``Authorization`` headers received. With ``token=...`` every write needs that bearer token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
PAGE_SIZE = 50


def git_oid(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub reports as a regular file's ``oid``/ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, bytes]
    title: str
    message: str
    date: str


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        """A branch, a tag (also as ``refs/heads/x`` / ``refs/tags/x``) or a full commit id."""
        for prefix, refs in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if rev.startswith(prefix):
                return self.commits.get(refs.get(rev[len(prefix):], ""))
        oid = self.branches.get(rev) or self.tags.get(rev) or rev
        return self.commits.get(oid)

    def history(self, oid: str) -> list[Commit]:
        out = []
        while oid is not None:
            out.append(self.commits[oid])
            oid = self.commits[oid].parent
        return out

    def add_commit(self, branch: str, files: dict[str, bytes], title: str, message: str = "") -> Commit:
        parent = self.branches.get(branch)
        date = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        seed = json.dumps([parent, sorted((p, git_oid(d)) for p, d in files.items()), title, message,
                           len(self.commits)])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, dict(files), title, message, date)
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        return commit


@dataclass
class Failure:
    remaining: int
    status: int | None
    after: bool


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(obj, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES: list[tuple[str, str, re.Pattern]] = [
    (m, name, re.compile(p)) for m, name, p in [
        ("POST", "create", r"/api/repos/create"),
        ("POST", "validate-yaml", r"/api/validate-yaml"),
        ("POST", "preupload", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)"),
        ("POST", "commit", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)"),
        ("GET", "refs", rf"/api/models/{REPO}/refs"),
        ("GET", "commits", rf"/api/models/{REPO}/commits/(?P<rev>[^/]+)"),
        ("POST", "tag", rf"/api/models/{REPO}/tag/(?P<rev>[^/]+)"),
        ("DELETE", "tag", rf"/api/models/{REPO}/tag/(?P<name>[^/]+)"),
        ("POST", "branch", rf"/api/models/{REPO}/branch/(?P<name>[^/]+)"),
        ("DELETE", "branch", rf"/api/models/{REPO}/branch/(?P<name>[^/]+)"),
        ("GET", "revision", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?"),
        ("GET", "tree", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"),
        ("HEAD", "resolve", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
        ("GET", "resolve", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
    ]
]
WRITES = {"create", "commit", "tag", "branch"}


class HubStandin:
    """The in-memory Hub (see the module docstring). Use as a context manager or ``start()``/``stop()``."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.calls: Counter[str] = Counter()
        self.auth_headers: list[str] = []
        self._failures: dict[str, list[Failure]] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> HubStandin:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                         name="hub-standin").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubStandin:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "the stand-in is not running"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- test helpers ----------------------------------------------------------------------------

    def fail(self, endpoint: str, times: int = 1, status: int | None = 503, after: bool = False) -> None:
        """Make the next ``times`` requests of ``endpoint`` fail with ``status`` (None: drop the connection)."""
        with self._lock:
            self._failures.setdefault(endpoint, []).append(Failure(times, status, after))

    def create_repo(self, repo_id: str, files: dict[str, bytes] | None = None) -> Repo:
        """A repo with an initial commit (``.gitattributes``), plus a commit of ``files`` if given."""
        with self._lock:
            repo = self.repos[repo_id] = Repo(repo_id)
            repo.add_commit("main", {".gitattributes": GITATTRIBUTES}, "initial commit")
            if files:
                repo.add_commit("main", {".gitattributes": GITATTRIBUTES, **files}, "Upload files")
            return repo

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(rev)
        assert commit is not None, f"{repo_id} has no revision {rev}"
        return dict(commit.files)

    # -- dispatch --------------------------------------------------------------------------------

    def _take_failure(self, endpoint: str) -> Failure | None:
        with self._lock:
            queue = self._failures.get(endpoint) or []
            if not queue:
                return None
            failure = queue[0]
            failure.remaining -= 1
            if failure.remaining <= 0:
                queue.pop(0)
            return failure

    def handle(self, method: str, target: str, headers, body: bytes) -> Reply | None:
        """Answer one request; None means: drop the connection."""
        url = urlsplit(target)
        routed = [(name, m) for verb, name, pattern in ROUTES
                  if verb == method and (m := pattern.fullmatch(url.path)) is not None]
        if not routed:
            return _json({"error": f"stand-in: no route for {method} {url.path}"}, 404)
        endpoint, match = routed[0]
        with self._lock:
            self.calls[endpoint] += 1
            if headers.get("authorization"):
                self.auth_headers.append(headers["authorization"])
        failure = self._take_failure(endpoint)
        if failure is not None and not failure.after:
            return self._failure_reply(failure)
        args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if endpoint in WRITES and self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
                raise HttpError(401, "Invalid credentials in Authorization header")
            with self._lock:
                handler: Callable[..., Reply] = getattr(self, f"_{endpoint.replace('-', '_')}_{method.lower()}",
                                                        None) or getattr(self, f"_{endpoint.replace('-', '_')}")
                reply = handler(body=body, query=query, headers=headers, method=method, **args)
        except HttpError as exc:
            extra = {"X-Error-Message": exc.message, **({"X-Error-Code": exc.code} if exc.code else {})}
            reply = _json({"error": exc.message}, exc.status, extra)
        if failure is not None:
            return self._failure_reply(failure)
        return reply

    @staticmethod
    def _failure_reply(failure: Failure) -> Reply | None:
        if failure.status is None:
            return None
        return _json({"error": f"stand-in: injected failure {failure.status}"}, failure.status)

    def _repo(self, repo: str) -> Repo:
        if repo not in self.repos:
            raise HttpError(404, "Repository not found", "RepoNotFound")
        return self.repos[repo]

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # -- endpoints -------------------------------------------------------------------------------

    def _create(self, body: bytes, **_) -> Reply:
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            raise HttpError(400, "the stand-in serves model repos only")
        repo_id = f"{payload.get('organization') or 'standin-user'}/{payload['name']}"
        if repo_id in self.repos:
            return _json({"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, 409)
        self.create_repo(repo_id)
        return _json({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, body: bytes, **_) -> Reply:
        content = json.loads(body).get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        if match is None:
            return _json({"warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        try:
            meta = yaml.safe_load(match.group(1))
        except yaml.YAMLError as exc:
            return _json({"errors": [{"message": f"Invalid YAML: {exc}"}]}, 400)
        errors = []
        if not isinstance(meta, dict):
            errors.append("metadata must be a mapping")
        else:
            tags = meta.get("tags", [])
            if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
                errors.append('"tags" must be a list of strings')
            base = meta.get("base_model")
            if base is not None and not (isinstance(base, str) or (isinstance(base, list) and
                                                                     all(isinstance(b, str) for b in base))):
                errors.append('"base_model" must be a string or a list of strings')
            if "library_name" in meta and not isinstance(meta["library_name"], str):
                errors.append('"library_name" must be a string')
        if errors:
            return _json({"errors": [{"message": e} for e in errors]}, 400)
        return _json({"warnings": []})

    def _preupload(self, repo: str, rev: str, body: bytes, **_) -> Reply:
        existing = self._commit_at(self._repo(repo), rev).files
        files = []
        for f in json.loads(body)["files"]:
            entry = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
            if f["path"] in existing:
                entry["oid"] = git_oid(existing[f["path"]])
            files.append(entry)
        return _json({"files": files, "commitOid": self._commit_at(self._repo(repo), rev).oid})

    def _commit(self, repo: str, rev: str, body: bytes, query: dict[str, str], **_) -> Reply:
        r = self._repo(repo)
        if query.get("create_pr") in ("1", "true"):
            raise HttpError(400, "the stand-in does not do pull requests")
        if rev not in r.branches:
            raise HttpError(404 if r.resolve(rev) is None else 400, f"Invalid rev id: {rev} (commits go to a branch)",
                            "RevisionNotFound" if r.resolve(rev) is None else None)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "the first NDJSON line must be the header")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != r.branches[rev]:
            raise HttpError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(r.resolve(rev).files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HttpError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:
                raise HttpError(400, f"the stand-in does not accept {key!r} (preupload always answers 'regular')")
        commit = r.add_commit(rev, files, header["summary"], header.get("description", ""))
        return _json({"commitOid": commit.oid, "commitUrl": f"{self.url}/{repo}/commit/{commit.oid}",
                      "success": True, "hookOutput": ""})

    def _refs(self, repo: str, **_) -> Reply:
        r = self._repo(repo)

        def refs(kind: str, table: dict[str, str]) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid} for n, oid in sorted(table.items())]

        return _json({"branches": refs("heads", r.branches), "converts": [], "tags": refs("tags", r.tags),
                      "pullRequests": []})

    def _commits(self, repo: str, rev: str, query: dict[str, str], **_) -> Reply:
        r = self._repo(repo)
        history = r.history(self._commit_at(r, rev).oid)
        page = int(query.get("p", "0"))
        items = [{"id": c.oid, "authors": [{"user": "standin-user"}], "date": c.date, "title": c.title,
                  "message": c.message} for c in history[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]]
        headers = {}
        if (page + 1) * PAGE_SIZE < len(history):
            headers["Link"] = f'<{self.url}/api/models/{repo}/commits/{quote(rev, safe="")}?p={page + 1}>; rel="next"'
        return _json(items, headers=headers)

    def _tag_post(self, repo: str, rev: str, body: bytes, **_) -> Reply:
        r = self._repo(repo)
        tag = json.loads(body)["tag"]
        commit = self._commit_at(r, rev)
        if tag in r.tags:
            raise HttpError(409, f"Tag {tag} already exists")
        r.tags[tag] = commit.oid
        return _json({})

    def _tag_delete(self, repo: str, name: str, **_) -> Reply:
        if self._repo(repo).tags.pop(name, None) is None:
            raise HttpError(404, f"Invalid rev id: {name}", "RevisionNotFound")
        return _json({})

    def _branch_post(self, repo: str, name: str, body: bytes, **_) -> Reply:
        r = self._repo(repo)
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        if name in r.branches:
            raise HttpError(409, f"Branch {name} already exists")
        r.branches[name] = self._commit_at(r, start).oid
        return _json({})

    def _branch_delete(self, repo: str, name: str, **_) -> Reply:
        if self._repo(repo).branches.pop(name, None) is None:
            raise HttpError(404, f"Invalid rev id: {name}", "RevisionNotFound")
        return _json({})

    def _revision(self, repo: str, rev: str = "main", **_) -> Reply:
        commit = self._commit_at(self._repo(repo), rev)
        info = {"id": repo, "modelId": repo, "sha": commit.oid, "private": False, "lastModified": commit.date,
                "siblings": [{"rfilename": p, "size": len(d), "blobId": git_oid(d)}
                             for p, d in sorted(commit.files.items())], "tags": []}
        readme = commit.files.get("README.md", b"").decode(errors="replace")
        match = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
        if match:
            meta = yaml.safe_load(match.group(1))
            if isinstance(meta, dict):
                info["cardData"] = meta
                info["tags"] = list(meta.get("tags") or [])
                if "library_name" in meta:
                    info["library_name"] = meta["library_name"]
        return _json(info)

    def _tree(self, repo: str, rev: str, query: dict[str, str], path: str = "", **_) -> Reply:
        commit = self._commit_at(self._repo(repo), rev)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        entries: dict[str, dict] = {}
        for p, data in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                                "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entries[p] = {"type": "file", "oid": git_oid(data), "size": len(data), "path": p}
        if prefix and not entries:
            raise HttpError(404, f"{path} does not exist at {rev}", "EntryNotFound")
        return _json(list(entries.values()))

    def _resolve(self, repo: str, rev: str, path: str, method: str, headers, **_) -> Reply:
        commit = self._commit_at(self._repo(repo), rev)
        if path not in commit.files:
            raise HttpError(404, f"Entry not found: {path}", "EntryNotFound")
        data = commit.files[path]
        out = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_oid(data)}"', "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream"}
        status, start = 200, 0
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", headers.get("range") or "")
        if rng and method == "GET":
            start = int(rng.group(1))
            end = int(rng.group(2)) + 1 if rng.group(2) else len(data)
            status, data = 206, data[start:end]
            out["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{len(commit.files[path])}"
        out["Content-Length"] = str(len(data))
        return Reply(status, data if method == "GET" else b"", out)


class _Handler(BaseHTTPRequestHandler):
    """Reads a request, lets :meth:`HubStandin.handle` answer it, writes the reply."""

    server_version = "hub-standin/1"

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply = self.server.hub.handle(method, self.path, headers, body)  # type: ignore[attr-defined]
        if reply is None:  # injected connection drop
            self.close_connection = True
            return
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        if "Content-Length" not in reply.headers:
            self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(reply.body)

    def do_GET(self) -> None:  # noqa: N802
        self._serve("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: no request log on stderr
        pass


def serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubStandin]:
    """Run a stand-in and point the ``huggingface_hub`` client at it: online, Xet off, a private HF
    home and cache (no real token or cache is touched). Test modules wrap it in their fixture::

        @pytest.fixture
        def hub(monkeypatch, tmp_path):
            yield from serve(monkeypatch, tmp_path)
    """
    import huggingface_hub.constants as hf_constants
    from huggingface_hub import hf_api

    with HubStandin() as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(hf_constants, "ENDPOINT", standin.url)
        monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            standin.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hf_api.api, "endpoint", standin.url)  # the instance behind module-level functions
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
        monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
        yield standin
