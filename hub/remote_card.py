"""What one pushed version holds: its files, the Hub model card, and how remote content is compared.

The card (``README.md`` on the Hub) is generated from the version's manifest with
``huggingface_hub``'s :class:`~huggingface_hub.ModelCardData`: YAML metadata ``base_model`` (when
the manifest names a Hub id -- not a built-in model or a local path), ``library_name`` (``peft``
when the bundle has an ``adapter_config.json`` PEFT loads, else ``adapterhub``) and ``tags``
(``adapterhub``, the variants, ``peft`` and the PEFT type); the body says how to load the version
(``hf://org/name@vK``), and shows the version's digest, parent, spec and metrics. It is a function
of the version and the repo only (no clock), so pushing the same version twice gives the same bytes.

Remote files are compared by content ids: a regular file's git blob id (sha1 of
``"blob <size>\\0" + data``), an LFS/Xet file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CARD = "README.md"
PEFT_CONFIG = "adapter_config.json"
MANIFEST = "adapterhub.json"
IGNORED_REMOTE = frozenset({".gitattributes"})  # the Hub's own file, created with the repo
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass(frozen=True)
class LocalFile:
    """A file to push: its source (a path, or bytes for the generated card) and its content ids."""

    source: Path | bytes
    size: int
    git_oid: str
    sha256: str

    @classmethod
    def of(cls, source: Path | bytes) -> LocalFile:
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        sha1 = hashlib.sha1(b"blob %d\0" % size)
        sha256 = hashlib.sha256()
        for chunk in _chunks(source):
            sha1.update(chunk)
            sha256.update(chunk)
        return cls(source, size, sha1.hexdigest(), sha256.hexdigest())


def _chunks(source: Path | bytes, size: int = 1 << 20) -> Iterable[bytes]:
    if isinstance(source, bytes):
        yield source
        return
    with open(source, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def hub_base_model(base: str | None) -> str | None:
    """``base`` if it can name a model on the Hub (``org/name`` or ``name``), else None: built-in
    models, local paths and anything else the Hub would reject stay out of the metadata."""
    if not base or base.startswith(("/", ".", "~")) or "\\" in base or _HUB_ID.fullmatch(base) is None:
        return None
    from .models import BUILTIN_MODELS

    return None if base in BUILTIN_MODELS else base


def _peft_type(directory: Path) -> str | None:
    path = directory / PEFT_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not config.get("peft_type"):
        return None
    return str(config["peft_type"])


def card_text(manifest: dict[str, Any], version: Any, repo_id: str, directory: Path) -> str:
    """The README.md pushed with ``version`` (an :class:`adapterhub.store.Version`) to ``repo_id``."""
    from huggingface_hub import ModelCard, ModelCardData

    modules = manifest.get("modules") or {}
    variants = sorted({str(m.get("variant")) for m in modules.values() if isinstance(m, dict) and m.get("variant")})
    peft_type = _peft_type(directory)
    tags = ["adapterhub", *variants]
    if peft_type:
        tags += [t for t in ("peft", peft_type.lower()) if t not in tags]
    base = manifest.get("base_model") or version.base_model
    hub_base = hub_base_model(base)
    data = ModelCardData(base_model=hub_base, library_name="peft" if peft_type else "adapterhub", tags=tags)
    tag = f"v{version.number}"
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"Version `{tag}` of this repository is the adapterhub version `{version.ref}` "
             f"(content digest `{version.digest}`, created {version.created}).", ""]
    facts = [("base model", f"`{base}`" if base else "not recorded"),
             ("base fingerprint", f"`{version.base_fingerprint}`" if version.base_fingerprint else "not recorded"),
             ("parent version", f"`{version.parent}`" if version.parent else "none"),
             ("adapted modules", f"{len(modules)} ({', '.join(variants) or 'no adapter variant'})")]
    if isinstance(manifest.get("trainable_params"), int):
        facts.append(("trainable parameters", f"{manifest['trainable_params']:,}"))
    if version.message:
        facts.append(("message", version.message))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in facts] + [""]
    lines += ["## Loading", "", "```python", "import adapterhub", "",
              f"model = ...  # the base model{f' ({base})' if base else ''}",
              f'adapterhub.load(model, "hf://{repo_id}@{tag}")', "```", "",
              f"or into the local version store: `adapterhub pull {repo_id}@{tag}`.", ""]
    if peft_type:
        lines += [f"PEFT loads it too ({peft_type}, `adapter_config.json`):", "", "```python",
                  "from peft import PeftModel", "",
                  f'model = PeftModel.from_pretrained(base_model, "{repo_id}", revision="{tag}")', "```", ""]
    spec = str(manifest.get("spec") or "").rstrip()
    if spec:
        lines += ["## Surgery spec", "", "```", spec, "```", ""]
    metrics = manifest.get("metrics") or version.metrics or {}
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in sorted(metrics.items())] + [""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return str(ModelCard(content))


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def version_files(directory: Path, card: str) -> dict[str, LocalFile]:
    """The files of one pushed version: the bundle's files, with README.md replaced by ``card``."""
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != CARD:
            files[rel] = LocalFile.of(path)
    files[CARD] = LocalFile.of(card.encode())
    return dict(sorted(files.items()))


def remote_ids(entries: Iterable[Any]) -> dict[str, str]:
    """``path -> content id`` of the files in a ``list_repo_tree`` listing (sha256 for LFS/Xet
    files, the git blob id otherwise), without the Hub's own ``.gitattributes``."""
    out = {}
    for e in entries:
        if getattr(e, "blob_id", None) is None or e.path in IGNORED_REMOTE:
            continue  # folders, and .gitattributes
        lfs = getattr(e, "lfs", None)
        out[e.path] = f"sha256:{lfs.sha256}" if lfs is not None else f"git:{e.blob_id}"
    return out


def same_content(remote: dict[str, str], local: dict[str, LocalFile], skip: frozenset[str] = frozenset()) -> bool:
    """Whether the remote listing holds exactly the ``local`` files (those in ``skip`` not compared)."""
    if set(remote) - skip != set(local) - skip:
        return False
    for path, f in local.items():
        if path in skip:
            continue
        if remote[path] not in (f"git:{f.git_oid}", f"sha256:{f.sha256}"):
            return False
    return True
