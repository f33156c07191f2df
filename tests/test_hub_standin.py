"""The Hub stand-in (tests/hub_standin.py) answers the plain ``huggingface_hub`` client correctly."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from .hub_standin import GITATTRIBUTES, HubStandin, git_oid, serve

REPO = "org/demo"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    yield from serve(monkeypatch, tmp_path)


def _folder(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_git_oid_matches_the_client():
    from huggingface_hub.utils.sha import git_hash

    assert git_oid(b"hello\n") == git_hash(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_create_upload_tag_branch_refs_commits(hub, tmp_path):
    api = HfApi()
    assert api.create_repo(REPO).endswith(REPO)
    api.create_repo(REPO, exist_ok=True)
    with pytest.raises(HfHubHTTPError, match="409"):
        api.create_repo(REPO)
    c1 = api.upload_folder(repo_id=REPO, folder_path=_folder(tmp_path / "a", {"w.bin": b"r=8", "sub/x.txt": b"x"}),
                           commit_message="first")
    api.create_tag(REPO, tag="v1.0", revision=c1.oid)
    c2 = api.upload_folder(repo_id=REPO, folder_path=_folder(tmp_path / "b", {"w.bin": b"r=16"}),
                           commit_message="second")
    api.create_branch(REPO, branch="old", revision="v1.0")
    with pytest.raises(HfHubHTTPError, match="409"):
        api.create_tag(REPO, tag="v1.0", revision=c2.oid)
    api.create_tag(REPO, tag="v1.0", revision=c2.oid, exist_ok=True)  # 409 swallowed: tag unchanged

    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": c2.oid, "old": c1.oid}
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1.0", "refs/tags/v1.0", c1.oid)]
    commits = api.list_repo_commits(REPO)
    assert [c.title for c in commits] == ["second", "first", "initial commit"]
    assert commits[0].commit_id == c2.oid
    assert [c.commit_id for c in api.list_repo_commits(REPO, revision="v1.0")][0] == c1.oid

    assert Path(hf_hub_download(REPO, "w.bin", revision="v1.0")).read_bytes() == b"r=8"
    assert Path(hf_hub_download(REPO, "w.bin")).read_bytes() == b"r=16"
    snap = Path(snapshot_download(REPO, revision="old"))
    assert snap.name == c1.oid
    assert {p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()} == \
        {".gitattributes", "w.bin", "sub/x.txt"}
    info = api.model_info(REPO, revision="v1.0")
    assert info.sha == c1.oid and {s.rfilename for s in info.siblings} == {".gitattributes", "w.bin", "sub/x.txt"}

    api.delete_tag(REPO, tag="v1.0")
    api.delete_branch(REPO, branch="old")
    refs = api.list_repo_refs(REPO)
    assert refs.tags == [] and [b.name for b in refs.branches] == ["main"]


def test_tree_listing_and_deletions(hub, tmp_path):
    api = HfApi()
    hub.create_repo(REPO, {"a.txt": b"a", "d/b.txt": b"bb", "d/e/c.txt": b"ccc"})
    flat = {e.path: type(e).__name__ for e in api.list_repo_tree(REPO)}
    assert flat == {".gitattributes": "RepoFile", "a.txt": "RepoFile", "d": "RepoFolder"}
    deep = {e.path: e for e in api.list_repo_tree(REPO, recursive=True)}
    assert deep["d/e/c.txt"].size == 3 and deep["d/e/c.txt"].blob_id == git_oid(b"ccc")
    assert set(deep) == {".gitattributes", "a.txt", "d", "d/b.txt", "d/e", "d/e/c.txt"}
    assert {e.path for e in api.list_repo_tree(REPO, path_in_repo="d")} == {"d/b.txt", "d/e"}
    api.create_commit(REPO, operations=[CommitOperationDelete("a.txt"), CommitOperationDelete("d/", is_folder=True)],
                      commit_message="clean")
    assert hub.files(REPO) == {".gitattributes": GITATTRIBUTES}


def test_unchanged_upload_is_skipped_and_parent_commit_is_checked(hub, tmp_path):
    api = HfApi()
    api.create_repo(REPO)
    folder = _folder(tmp_path / "a", {"w.bin": b"same"})
    c1 = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="one")
    c2 = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="again")  # nothing changed: no commit
    assert c2.oid == c1.oid and len(api.list_repo_commits(REPO)) == 2
    stale = api.list_repo_commits(REPO)[1].commit_id
    with pytest.raises(HfHubHTTPError, match="412"):
        api.create_commit(REPO, operations=[CommitOperationAdd("n.txt", b"n")], commit_message="late",
                          parent_commit=stale)


def test_model_card_round_trip_and_yaml_validation(hub):
    api = HfApi()
    api.create_repo(REPO)
    card = ModelCard("---\nbase_model: org/base\nlibrary_name: peft\ntags:\n- lora\n---\n\n# Demo\n")
    card.push_to_hub(REPO)
    loaded = ModelCard.load(REPO)
    assert loaded.data.base_model == "org/base" and loaded.data.library_name == "peft" and loaded.data.tags == ["lora"]
    assert api.model_info(REPO).card_data.library_name == "peft"
    with pytest.raises(ValueError, match="tags"):
        api.create_commit(REPO, operations=[CommitOperationAdd("README.md", b"---\ntags: 3\n---\n# bad\n")],
                          commit_message="bad card")


def test_errors_carry_the_hub_error_codes(hub):
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_refs("org/missing")
    api.create_repo(REPO)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="v9")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, ".gitattributes", revision="v9")


def test_failure_injection(hub):
    api = HfApi()
    api.create_repo(REPO)
    hub.fail("refs", times=2, status=503)
    for _ in range(2):
        with pytest.raises(HfHubHTTPError, match="503"):
            api.list_repo_refs(REPO)
    assert [b.name for b in api.list_repo_refs(REPO).branches] == ["main"]
    assert hub.calls["refs"] == 3

    hub.fail("commit", status=500, after=True)  # the commit lands, its response is lost
    with pytest.raises(HfHubHTTPError, match="500"):
        api.create_commit(REPO, operations=[CommitOperationAdd("x.txt", b"x")], commit_message="lost reply")
    assert hub.files(REPO)["x.txt"] == b"x"

    hub.fail("tag", status=None)  # connection dropped
    with pytest.raises(Exception) as info:
        api.create_tag(REPO, tag="v1")
    assert not isinstance(info.value, HfHubHTTPError)
    assert api.list_repo_refs(REPO).tags == []


def test_writes_need_the_token_when_one_is_set(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    with HubStandin(token="hf_standin_secret") as standin:
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        with pytest.raises(HfHubHTTPError, match="401"):
            HfApi(endpoint=standin.url, token="hf_wrong").create_repo(REPO)
        HfApi(endpoint=standin.url, token="hf_standin_secret").create_repo(REPO)
        assert HfApi(endpoint=standin.url, token=False).list_repo_refs(REPO).branches[0].name == "main"
        assert standin.auth_headers == ["Bearer hf_wrong", "Bearer hf_standin_secret"]
