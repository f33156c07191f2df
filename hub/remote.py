"""Versions on the Hugging Face Hub: ``push`` store versions, ``pull`` them back, ``fetch`` ``hf://`` sources.

    adapterhub push medical@v3 --repo org/medical    one version
    adapterhub push medical --repo org/medical       every version of medical not on the Hub yet, oldest first
    adapterhub pull org/medical@v3 [--name medical]  a new local version recording the repo and commit
    adapterhub.load(model, "hf://org/medical@v3")    fetch() into the Hugging Face cache, then load

Everything goes through ``huggingface_hub`` (:class:`~huggingface_hub.HfApi`, ``snapshot_download``),
so ``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and the token settings apply as usual. The
token is whatever ``huggingface_hub`` finds (``HF_TOKEN``, else the one ``hf auth login`` saved); this
module never reads, prints or logs it, and no message it writes contains it.

**One version = one commit + one tag.** Pushing ``N@vK`` makes one commit on ``main`` whose files
are exactly the bundle's (README.md is the generated Hub card, see :mod:`adapterhub.remote_card`;
files of the previous version that this one lacks are deleted), message ``"N@vK: <message>"``, and
tags it ``vK``. Several versions are pushed oldest first, so ``main``'s history keeps their order.

**A failed push leaves no partial version**: a version counts as pushed only once its tag exists.

1. Commit. Each attempt reads ``main``'s head; if the head already holds exactly these files (an
   earlier attempt landed but its response was lost, or an earlier push committed and then failed
   to tag) that commit is reused, else one ``create_commit`` with ``parent_commit=head`` is made (a
   concurrent writer makes it fail with HTTP 412 rather than interleave). So retrying never makes a
   duplicate commit.
2. Tag ``vK`` on that commit's id, then read the refs back: ``vK`` must point at it.

If step 2 still fails after its retries, the commit stays on ``main`` untagged -- not a version:
pull and push only look at tags -- and the error says so; running the push again finds that commit
at the head and only tags it. A version whose tag already exists is skipped when the remote files
equal the local ones (README.md aside) and refused otherwise. Pushing never changes the local store.
Any other file on ``main`` (except the Hub's ``.gitattributes``) is deleted by the version's commit,
so a tag always holds exactly one bundle. ``create_commit`` is used rather than ``upload_folder``
because, with ``hf_xet`` installed, ``upload_folder`` may split a large folder into several commits.

**Pull** downloads a revision (by its commit id, into a temporary cache) and saves it as a new store
version: the same files as the pushed version, README.md being the Hub card.

**Retries**: every Hub request is retried on connection errors, timeouts and HTTP 5xx/408/429
(``Retry-After`` honoured) with exponential backoff (:class:`RetryPolicy`); other errors (401, 403,
404, 412, ...) fail at once with a message saying what to do. ``huggingface_hub`` shows its own
progress bars for transfers; ``notify`` receives one line per step (the CLI prints them).

Modules: remote_card.py (the Hub card, content ids), remote_retry.py (retries, error messages),
cli_remote.py (``adapterhub push`` / ``pull``).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub.registry import AdapterhubError

from .remote_card import CARD, IGNORED_REMOTE, MANIFEST, PEFT_CONFIG, card_text, remote_ids, same_content, version_files
from .remote_retry import Notify, RemoteError, RetryPolicy, hub_errors, message, retrying, status_of

__all__ = ["RemoteError", "RetryPolicy", "PushResult", "PullResult", "push", "pull", "fetch", "bundle_kind"]

MAIN = "main"
VERSION_TAG = re.compile(r"v(\d+)")


def _api(endpoint: str | None, token: str | None):
    from huggingface_hub import HfApi

    from adapterhub import __version__

    return HfApi(endpoint=endpoint, token=token, library_name="adapterhub", library_version=__version__)


def check_repo_id(repo_id: str) -> str:
    """``org/name`` as the Hub spells repository ids."""
    if not isinstance(repo_id, str) or re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id) is None:
        raise RemoteError(f"{repo_id!r} is not a Hub repository id: write org/name (letters, digits, '.', '_', '-')")
    return repo_id


def _refs(api: Any, repo_id: str) -> tuple[dict[str, str], dict[str, str]]:
    refs = api.list_repo_refs(repo_id)
    return {b.name: b.target_commit for b in refs.branches}, {t.name: t.target_commit for t in refs.tags}


def _tree(api: Any, repo_id: str, revision: str) -> dict[str, str]:
    return remote_ids(api.list_repo_tree(repo_id, recursive=True, revision=revision))


# -- push ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    """One pushed version: ``status`` is ``pushed`` (new commit), ``tagged`` (an untagged commit left by
    an earlier failed push was tagged) or ``already-pushed`` (nothing to do)."""

    ref: str
    repo_id: str
    tag: str
    commit: str
    status: str

    def to_json(self) -> dict[str, str]:
        return {"ref": self.ref, "repo": self.repo_id, "tag": self.tag, "commit": self.commit, "status": self.status,
                "source": f"hf://{self.repo_id}@{self.tag}"}


def push(ref: str, repo_id: str, *, store: Any = None, private: bool | None = None, create: bool = True,
         endpoint: str | None = None, token: str | None = None, retry: RetryPolicy | None = None,
         notify: Notify | None = None) -> list[PushResult]:
    """Push the store version ``ref`` (``name@v3``, ``name@tag``, ...) or, for a bare ``name``, every
    version of it that ``repo_id`` lacks, oldest first. Creates the repo (``private``) unless ``create``
    is False. See the module docstring for the commit/tag protocol."""
    from .store import Store

    store = store if store is not None else Store()
    policy, say = retry or RetryPolicy(), notify or (lambda _m: None)
    check_repo_id(repo_id)
    versions = store.versions(ref) if "@" not in ref else [store.resolve(ref)]
    api = _api(endpoint, token)
    with hub_errors(repo_id, api.endpoint, f"cannot push to {repo_id}"):
        if create:
            retrying(f"create {repo_id}", lambda: api.create_repo(repo_id, private=private, exist_ok=True), policy, say)
        tags = retrying(f"read the tags of {repo_id}", lambda: _refs(api, repo_id)[1], policy, say)
    results: list[PushResult] = []
    for v in versions:
        try:
            with hub_errors(repo_id, api.endpoint, f"cannot push {v.ref} to {repo_id}"):
                results.append(_push_one(api, store, v, repo_id, tags, policy, say))
        except RemoteError as exc:
            if results:
                done = ", ".join(r.ref for r in results)
                raise RemoteError(f"{exc} (before that, {done} reached {repo_id})") from None
            raise
    return results


def _push_one(api: Any, store: Any, v: Any, repo_id: str, tags: dict[str, str], policy: RetryPolicy,
              say: Notify) -> PushResult:
    tag = f"v{v.number}"
    directory = store.checkout(v.ref)
    manifest = json.loads((directory / MANIFEST).read_text()) if (directory / MANIFEST).is_file() else {}
    local = version_files(directory, card_text(manifest, v, repo_id, directory))
    if tag in tags:
        remote = retrying(f"list {repo_id}@{tag}", lambda: _tree(api, repo_id, tags[tag]), policy, say)
        if not same_content(remote, local, skip=frozenset({CARD})):
            raise RemoteError(f"{repo_id} already has a tag {tag} whose files differ from {v.ref}: the repository "
                              f"holds another adapter's versions (push to another --repo); nothing was pushed")
        say(f"{v.ref} is already on {repo_id} as {tag} (commit {tags[tag][:10]})")
        return PushResult(v.ref, repo_id, tag, tags[tag], "already-pushed")
    size = sum(f.size for f in local.values())
    say(f"{v.ref} -> {repo_id}: committing {len(local)} files ({_size(size)})")
    try:
        commit, reused = retrying(f"commit {v.ref} to {repo_id}", lambda: _commit(api, v, repo_id, local),
                                  policy, say)
    except Exception as exc:
        why = message(exc, repo_id, api.endpoint)
        raise RemoteError(f"{why}; {v.ref} was not pushed ({repo_id} has no tag {tag})") from exc
    say(f"{'found untagged' if reused else 'created'} commit {commit[:10]}; tagging it {tag}")
    try:
        retrying(f"tag commit {commit[:10]} of {repo_id} as {tag}", lambda: _tag(api, repo_id, tag, commit, v),
                 policy, say)
    except Exception as exc:
        why = message(exc, repo_id, api.endpoint)
        raise RemoteError(f"{v.ref} was uploaded to {repo_id} as commit {commit[:10]}, but {why}. {v.ref} is "
                          f"NOT pushed ({repo_id} has no tag {tag}); run the push again to tag that commit") from exc
    tags[tag] = commit
    say(f"pushed {v.ref} -> {repo_id}@{tag}")
    return PushResult(v.ref, repo_id, tag, commit, "tagged" if reused else "pushed")


def _commit(api: Any, v: Any, repo_id: str, local: dict) -> tuple[str, bool]:
    """One commit attempt (idempotent): reuse ``main``'s head if it holds exactly ``local``."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    head = _refs(api, repo_id)[0].get(MAIN)
    remote = _tree(api, repo_id, head) if head else {}
    if head and same_content(remote, local):
        return head, True
    ops: list[Any] = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=f.source if isinstance(f.source, bytes)
                                         else str(f.source)) for path, f in local.items()]
    ops += [CommitOperationDelete(path_in_repo=path) for path in sorted(set(remote) - set(local))]
    lines = (v.message or "").strip().splitlines()
    title = f"{v.ref}: {lines[0] if lines else f'version {v.number} of {v.name}'}"
    details = [f"adapterhub version: {v.ref}", f"digest: {v.digest}", f"created: {v.created}",
               f"base model: {v.base_model or '-'}", f"parent: {v.parent or '-'}"]
    info = api.create_commit(repo_id, operations=ops, commit_message=title,
                             commit_description="\n".join(details + ([""] + lines if len(lines) > 1 else [])),
                             revision=MAIN, parent_commit=head)
    return info.oid, False


def _tag(api: Any, repo_id: str, tag: str, commit: str, v: Any) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_tag(repo_id, tag=tag, revision=commit, tag_message=f"{v.ref} ({v.digest})")
    except HfHubHTTPError as exc:
        if status_of(exc) != 409:  # 409: it exists (a lost response, or someone else's): checked below
            raise
    target = _refs(api, repo_id)[1].get(tag)
    if target != commit:
        raise RemoteError(f"tag {tag} of {repo_id} points at commit {str(target)[:10]}, not {commit[:10]} "
                          "(another push at the same time?)")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# -- pull and fetch ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PullResult:
    """The local version a pull produced (``new`` False: identical to the latest version of the name)."""

    version: Any
    repo_id: str
    revision: str
    commit: str
    new: bool

    def to_json(self) -> dict[str, Any]:
        return {**self.version.to_json(), "repo": self.repo_id, "revision": self.revision, "commit": self.commit,
                "new": self.new}


def _latest_tag(tags: dict[str, str]) -> str | None:
    numbered = [(int(m.group(1)), t) for t in tags if (m := VERSION_TAG.fullmatch(t))]
    return max(numbered)[1] if numbered else None


def _resolve(api: Any, repo_id: str, revision: str | None, policy: RetryPolicy, say: Notify) -> tuple[str, str]:
    """``(revision name, commit id)``; no revision: the highest ``vK`` tag, else ``main``."""
    from huggingface_hub.errors import RevisionNotFoundError

    if revision is None:
        revision = _latest_tag(retrying(f"read the tags of {repo_id}", lambda: _refs(api, repo_id)[1],
                                        policy, say)) or MAIN
    try:
        info = retrying(f"resolve {repo_id}@{revision}", lambda: api.model_info(repo_id, revision=revision),
                        policy, say)
    except RevisionNotFoundError:
        branches, tags = _refs(api, repo_id)
        have = f"tags: {', '.join(sorted(tags)) or 'none'}; branches: {', '.join(sorted(branches)) or 'none'}"
        raise RemoteError(f"{repo_id} has no revision {revision!r} ({have})") from None
    return revision, str(info.sha)


def _parse_source(source: str) -> tuple[str, str | None]:
    from .sources import HF_SCHEME, parse_hf

    repo_id, revision = parse_hf(source if source.startswith(HF_SCHEME) else HF_SCHEME + source)
    return check_repo_id(repo_id), revision


def bundle_kind(directory: Path, what: str) -> str:
    """``adapterhub`` (a bundle, manifest checked) or ``peft`` (a plain PEFT adapter); else an error."""
    from .bundle import read_manifest

    if (directory / MANIFEST).is_file():
        read_manifest(directory)
        return "adapterhub"
    if (directory / PEFT_CONFIG).is_file():
        return "peft"
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    raise RemoteError(f"{what} is not an adapter: it has neither {MANIFEST} nor {PEFT_CONFIG} "
                      f"(files: {', '.join(files) or 'none'})")


def _download(api: Any, repo_id: str, revision: str, cache_dir: Path | None, policy: RetryPolicy,
              say: Notify, **kwargs: Any) -> Path:
    from huggingface_hub import snapshot_download

    say(f"downloading {repo_id}@{revision}")
    return Path(retrying(f"download {repo_id}@{revision}", lambda: snapshot_download(
        repo_id, revision=revision, cache_dir=cache_dir, endpoint=api.endpoint, token=api.token,
        ignore_patterns=sorted(IGNORED_REMOTE), library_name="adapterhub", **kwargs), policy, say))


def pull(source: str, *, name: str | None = None, store: Any = None, model: str | None = None,
         endpoint: str | None = None, token: str | None = None, retry: RetryPolicy | None = None,
         notify: Notify | None = None) -> PullResult:
    """Download ``org/name[@rev]`` (``rev``: ``vK``, a tag, a branch or a commit; default the highest
    ``vK`` tag, else ``main``) and save it in the store as the next version of ``name`` (default: the
    repo's name), its message recording the repo, revision and commit. A plain PEFT repository is
    converted into a bundle first, on ``model`` (default: its ``base_model_name_or_path``)."""
    from .store import Store, validate_name

    repo_id, revision = _parse_source(source)
    store = store if store is not None else Store()
    if name is None:
        try:
            name = validate_name(repo_id.split("/")[1])
        except AdapterhubError as exc:
            raise RemoteError(f"{exc}; choose the local name with --name") from None
    validate_name(name)
    policy, say = retry or RetryPolicy(), notify or (lambda _m: None)
    api = _api(endpoint, token)
    with hub_errors(repo_id, api.endpoint, f"cannot pull {repo_id}"), \
            tempfile.TemporaryDirectory(prefix="adapterhub-pull-") as tmp:
        revision, commit = _resolve(api, repo_id, revision, policy, say)
        directory = _download(api, repo_id, commit, Path(tmp) / "cache", policy, say)
        origin = f"hf://{repo_id}@{revision}"
        if bundle_kind(directory, f"{origin} (commit {commit[:10]})") == "peft":
            directory = _convert_peft(directory, model, Path(tmp) / "bundle", f"hf://{repo_id}@{commit}")
        before = {x.ref for x in store.versions(name)} if name in store.names() else set()
        v = store.save(directory, name, message=f"pulled from {origin} (commit {commit})")
    say(f"{'saved' if v.ref not in before else 'unchanged:'} {v.ref}")
    return PullResult(v, repo_id, revision, commit, v.ref not in before)


def _convert_peft(directory: Path, model: str | None, out: Path, origin: str) -> Path:
    """A plain PEFT adapter as an adapterhub bundle: loaded on its base model and saved again."""
    from .bundle import load, save
    from .models import load_model
    from .peft_read import read_config

    config = read_config(directory) or {}
    base = model or config.get("base_model_name_or_path")
    if not base:
        raise RemoteError(f"{origin} is a plain PEFT adapter without base_model_name_or_path: pass --model")
    m = load_model(base)
    load(m, directory)
    save(m, out, parent=origin)
    return out


def fetch(repo_id: str, revision: str | None = None, *, endpoint: str | None = None, token: str | None = None,
          cache_dir: str | Path | None = None, retry: RetryPolicy | None = None,
          notify: Notify | None = None) -> Path:
    """Download ``hf://repo_id@revision`` into the Hugging Face cache and return its directory (the
    cached snapshot: read-only, shared). Default revision: the highest ``vK`` tag, else ``main``.
    With ``HF_HUB_OFFLINE=1`` the cache alone answers (no revision: the highest cached ``vK``)."""
    from huggingface_hub import constants

    check_repo_id(repo_id)
    policy, say = retry or RetryPolicy(), notify or (lambda _m: None)
    api = _api(endpoint, token)
    where = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    with hub_errors(repo_id, api.endpoint, f"cannot fetch {where}"):
        if constants.HF_HUB_OFFLINE:
            revision = revision or _cached_latest(cache, repo_id) or MAIN
            try:
                directory = _download(api, repo_id, revision, cache, policy, say, local_files_only=True)
            except FileNotFoundError:
                raise RemoteError(f"{where} is not in the Hugging Face cache ({cache}) and offline mode is on "
                                  "(HF_HUB_OFFLINE=1): set HF_HUB_OFFLINE=0 to download it") from None
        else:
            revision, _ = _resolve(api, repo_id, revision, policy, say)
            directory = _download(api, repo_id, revision, cache, policy, say)
    bundle_kind(directory, f"hf://{repo_id}@{revision}")
    return directory


def _cached_latest(cache: Path, repo_id: str) -> str | None:
    from huggingface_hub.file_download import repo_folder_name

    refs = cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs"
    return _latest_tag({p.name: "" for p in refs.iterdir()}) if refs.is_dir() else None
