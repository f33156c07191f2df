"""push / pull / fetch against the local Hub stand-in, through the real ``huggingface_hub`` client."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from adapterhub.remote import RemoteError, RetryPolicy, fetch, pull, push
from adapterhub.remote_card import hub_base_model
from adapterhub.remote_retry import is_transient
from adapterhub.store import Store

from .hub_standin import HubStandin, serve

REPO = "org/medical"
SPEC = "attn.* -> lora(r=4, alpha=8)\n"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    yield from serve(monkeypatch, tmp_path)


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "home"))  # Store() and "name@vK" sources too
    return Store(tmp_path / "home")


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def fast() -> RetryPolicy:
    """Three attempts, 1s then 2s between them -- recorded, not slept."""
    return RetryPolicy(attempts=3, base_delay=1.0, sleep=Sleeps())


def make_bundle(path: Path, payload: bytes, *, metrics: dict | None = None, base: str = "tiny-llama",
                peft: bool = False, variant: str = "lora") -> Path:
    """A minimal bundle directory (valid manifest, tensors file, card) without building a model."""
    path.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "adapterhub.bundle", "format_version": 1, "spec": SPEC, "base_model": base,
                "base_fingerprint": "sha256:" + "ab" * 32, "seed": 0, "parent": None, "metrics": metrics or {},
                "modules": {"model.layers.0.self_attn.q_proj": {"action": "adapt", "variant": variant, "params": {},
                                                                "quant": None, "quant_params": {}}}}
    (path / "adapterhub.json").write_text(json.dumps(manifest, sort_keys=True))
    (path / "adapter_model.safetensors").write_bytes(payload)
    (path / "README.md").write_text("# local card\n")
    if peft:
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return path


def save_versions(store: Store, tmp_path: Path, n: int, name: str = "medical") -> list:
    out = []
    for k in range(1, n + 1):
        b = make_bundle(tmp_path / f"{name}-b{k}", f"weights-{k}".encode(), metrics={"loss": 1.0 / k}, peft=k == 2)
        out.append(store.save(b, name, message=f"run {k}"))
    return out


def bundle_files(store: Store, ref: str, card: bool = False) -> dict[str, bytes]:
    d = store.checkout(ref)
    return {p.name: p.read_bytes() for p in d.iterdir() if card or p.name != "README.md"}


def remote_files(hub: HubStandin, rev: str, repo: str = REPO) -> dict[str, bytes]:
    return {p: d for p, d in hub.files(repo, rev).items() if p not in (".gitattributes", "README.md")}


def store_state(store: Store) -> list:
    return [(v.ref, v.tags, v.digest) for n in store.names() for v in store.versions(n)]


# -- push ----------------------------------------------------------------------------------------


def test_one_version_is_one_commit_tagged_vk_with_a_model_card(hub, store, tmp_path):
    save_versions(store, tmp_path, 1)
    [r] = push("medical@v1", REPO, store=store)
    repo = hub.repos[REPO]
    assert (r.ref, r.tag, r.status) == ("medical@v1", "v1", "pushed") and repo.tags == {"v1": r.commit}
    assert repo.branches["main"] == r.commit and repo.commits[r.commit].title == "medical@v1: run 1"
    assert "digest: sha256:" in repo.commits[r.commit].message
    assert remote_files(hub, "v1") == bundle_files(store, "medical@v1")
    card = ModelCard(hub.files(REPO, "v1")["README.md"].decode())
    assert card.data.library_name == "adapterhub" and card.data.tags == ["adapterhub", "lora"]
    assert card.data.base_model is None  # a built-in model is not a Hub id
    assert SPEC.strip() in card.text and "| loss | 1.0 |" in card.text and 'hf://org/medical@v1' in card.text


def test_card_of_a_peft_loadable_version(hub, store, tmp_path):
    store.save(make_bundle(tmp_path / "b", b"w", base="meta-llama/Llama-3.2-1B", peft=True), "medical")
    push("medical", REPO, store=store)
    card = ModelCard(hub.files(REPO, "v1")["README.md"].decode())
    assert card.data.library_name == "peft" and card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.tags == ["adapterhub", "lora", "peft"]
    assert 'PeftModel.from_pretrained(base_model, "org/medical", revision="v1")' in card.text


@pytest.mark.parametrize("base,expected", [("org/base-1.5", "org/base-1.5"), ("gpt2", "gpt2"), ("tiny-llama", None),
                                           ("/models/llama", None), ("./x", None), ("a/b/c", None), (None, None)])
def test_only_hub_ids_become_card_base_models(base, expected):
    assert hub_base_model(base) == expected


def test_pushing_a_name_pushes_missing_versions_in_order_and_again_is_a_noop(hub, store, tmp_path):
    save_versions(store, tmp_path, 3)
    results = push("medical", REPO, store=store)
    assert [(r.ref, r.status) for r in results] == [("medical@v1", "pushed"), ("medical@v2", "pushed"),
                                                    ("medical@v3", "pushed")]
    repo = hub.repos[REPO]
    history = repo.history(repo.branches["main"])
    assert [c.title for c in history] == ["medical@v3: run 3", "medical@v2: run 2", "medical@v1: run 1",
                                          "initial commit"]
    assert [repo.tags[f"v{k}"] for k in (3, 2, 1)] == [c.oid for c in history[:3]]
    for k in (1, 2, 3):  # each tag holds exactly its version: v3 no longer has v2's adapter_config.json
        assert remote_files(hub, f"v{k}") == bundle_files(store, f"medical@v{k}")
    commits = hub.calls["commit"]
    assert [r.status for r in push("medical", REPO, store=store)] == ["already-pushed"] * 3
    assert [r.status for r in push("medical@v2", REPO, store=store)] == ["already-pushed"]
    assert hub.calls["commit"] == commits
    store.save(make_bundle(tmp_path / "b4", b"weights-4"), "medical")
    assert [(r.ref, r.status) for r in push("medical", REPO, store=store)][-1] == ("medical@v4", "pushed")
    assert hub.calls["commit"] == commits + 1


def test_a_tag_holding_other_content_is_refused(hub, store, tmp_path):
    other = Store(tmp_path / "other")
    other.save(make_bundle(tmp_path / "o", b"someone else"), "medical")
    push("medical@v1", REPO, store=other)
    save_versions(store, tmp_path, 1)
    with pytest.raises(RemoteError, match="already has a tag v1 whose files differ from medical@v1"):
        push("medical@v1", REPO, store=store)


def test_bad_repo_ids_and_refs_are_clear_errors(hub, store, tmp_path):
    save_versions(store, tmp_path, 1)
    with pytest.raises(RemoteError, match="not a Hub repository id"):
        push("medical@v1", "no-slash", store=store)
    with pytest.raises(Exception, match="medical@v9 does not exist"):
        push("medical@v9", REPO, store=store)


# -- retries and failures ------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint,status", [("commit", 503), ("tag", 502), ("refs", None), ("create", 429)])
def test_transient_failures_are_retried_with_backoff(hub, store, tmp_path, fast, endpoint, status):
    save_versions(store, tmp_path, 1)
    hub.fail(endpoint, times=2, status=status)
    seen: list[str] = []
    [r] = push("medical@v1", REPO, store=store, retry=fast, notify=seen.append)
    assert r.status == "pushed" and hub.repos[REPO].tags == {"v1": r.commit}
    assert fast.sleep == [1.0, 2.0]
    assert sum("retrying in" in line for line in seen) == 2
    assert len(hub.repos[REPO].commits) == 2  # initial + one version commit


def test_a_lost_commit_response_does_not_commit_twice(hub, store, tmp_path, fast):
    save_versions(store, tmp_path, 1)
    hub.fail("commit", status=500, after=True)  # the commit lands, the client sees HTTP 500
    [r] = push("medical@v1", REPO, store=store, retry=fast)
    assert r.status == "tagged" and len(hub.repos[REPO].commits) == 2 and hub.calls["commit"] == 1


def test_a_failed_tag_leaves_no_version_and_the_next_push_only_tags(hub, store, tmp_path, fast):
    save_versions(store, tmp_path, 1)
    before = store_state(store)
    hub.fail("tag", times=3, status=503)
    with pytest.raises(RemoteError) as info:
        push("medical@v1", REPO, store=store, retry=fast)
    message = str(info.value)
    assert "failed after 3 attempts (HTTP 503" in message and "NOT pushed" in message and "no tag v1" in message
    assert hub.repos[REPO].tags == {} and store_state(store) == before and store.fsck() == []
    head = hub.repos[REPO].branches["main"]
    [r] = push("medical@v1", REPO, store=store, retry=fast)
    assert (r.status, r.commit) == ("tagged", head) and hub.repos[REPO].tags == {"v1": head}
    assert hub.calls["commit"] == 1


def test_a_failed_commit_leaves_nothing(hub, store, tmp_path, fast):
    save_versions(store, tmp_path, 2)
    before = store_state(store)
    push("medical@v1", REPO, store=store, retry=fast)
    hub.fail("commit", times=10, status=503)
    with pytest.raises(RemoteError, match=r"medical@v2 was not pushed \(org/medical has no tag v2\)") as info:
        push("medical", REPO, store=store, retry=fast)
    assert "commit medical@v2 to org/medical failed after 3 attempts" in str(info.value)
    assert set(hub.repos[REPO].tags) == {"v1"} and len(hub.repos[REPO].commits) == 2
    assert store_state(store) == before


def test_client_errors_are_not_retried(monkeypatch, store, tmp_path, fast):
    save_versions(store, tmp_path, 1)
    monkeypatch.setenv("HF_TOKEN", "hf_wrongwrongwrong")
    with HubStandin(token="hf_right") as standin:
        import huggingface_hub.constants as hf_constants

        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        with pytest.raises(RemoteError, match="refused the credentials .*HF_TOKEN") as info:
            push("medical@v1", REPO, store=store, endpoint=standin.url, retry=fast)
        assert standin.calls["create"] == 1 and fast.sleep == []
        assert "hf_wrongwrongwrong" not in str(info.value)


def test_unreachable_hub_is_a_clear_error(store, tmp_path, monkeypatch):
    import socket

    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    save_versions(store, tmp_path, 1)
    policy = RetryPolicy(attempts=2, base_delay=0)
    with pytest.raises(RemoteError, match=r"create org/medical failed after 2 attempts \(ConnectError"):
        push("medical@v1", REPO, store=store, endpoint=f"http://127.0.0.1:{port}", retry=policy)


def test_offline_mode_is_a_clear_error(store, tmp_path):
    save_versions(store, tmp_path, 1)  # tests/conftest.py sets HF_HUB_OFFLINE=1 and no fixture undoes it here
    with pytest.raises(RemoteError, match=r"cannot push to org/medical: offline mode is on \(HF_HUB_OFFLINE=1\)"):
        push("medical@v1", REPO, store=store)


def test_push_and_pull_with_xet_enabled(hub, store, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", False)  # the default for users with hf_xet
    save_versions(store, tmp_path, 2)
    assert [r.status for r in push("medical", REPO, store=store)] == ["pushed", "pushed"]
    r = pull(f"{REPO}@v2", store=Store(tmp_path / "mine"))
    assert bundle_files(Store(tmp_path / "mine"), r.version.ref) == bundle_files(store, "medical@v2")


def test_retry_policy_and_classification():
    p = RetryPolicy(attempts=5, base_delay=0.5, factor=3, max_delay=4)
    assert [p.delay(k) for k in (1, 2, 3, 4)] == [0.5, 1.5, 4, 4] and p.delay(1, retry_after=3) == 3
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)

    class Response:
        def __init__(self, status):
            self.status_code = status

    def http(status):
        exc = Exception(f"HTTP {status}")
        exc.response = Response(status)
        return exc

    assert [is_transient(http(s)) for s in (500, 503, 429, 408, 400, 401, 403, 404, 409, 412)] == \
        [True, True, True, True, False, False, False, False, False, False]
    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    wrapped = LocalEntryNotFoundError("cannot find it")
    wrapped.__cause__ = httpx2.ConnectError("refused")
    assert is_transient(httpx2.ReadTimeout("slow")) and is_transient(wrapped)
    assert not is_transient(OfflineModeIsEnabled("offline")) and not is_transient(ValueError("bug"))


# -- pull and fetch ------------------------------------------------------------------------------


def test_pull_round_trip_records_the_origin(hub, store, tmp_path):
    save_versions(store, tmp_path, 2)
    pushed = {r.tag: r.commit for r in push("medical", REPO, store=store)}
    mine = Store(tmp_path / "mine")
    r = pull(f"{REPO}@v1", store=mine)
    assert (r.version.ref, r.revision, r.commit, r.new) == ("medical@v1", "v1", pushed["v1"], True)
    assert r.version.message == f"pulled from hf://{REPO}@v1 (commit {pushed['v1']})"
    assert bundle_files(mine, "medical@v1") == bundle_files(store, "medical@v1")
    assert bundle_files(mine, "medical@v1", card=True)["README.md"] == hub.files(REPO, "v1")["README.md"]
    latest = pull(f"hf://{REPO}", store=mine, name="copy")  # no revision: the highest vK tag
    assert (latest.version.ref, latest.revision, latest.commit) == ("copy@v1", "v2", pushed["v2"])
    assert bundle_files(mine, "copy@v1") == bundle_files(store, "medical@v2")
    again = pull(f"{REPO}@{pushed['v2']}", store=mine, name="copy")  # by commit id: same content
    assert (again.version.ref, again.new) == ("copy@v1", False)
    assert pull(f"{REPO}@main", store=mine, name="copy").version.ref == "copy@v1"


def test_pull_errors_leave_the_store_unchanged(hub, store, tmp_path, fast):
    save_versions(store, tmp_path, 1)
    push("medical", REPO, store=store)
    hub.create_repo("org/not-an-adapter", {"notes.txt": b"hello"})
    mine = Store(tmp_path / "mine")
    with pytest.raises(RemoteError, match=r"has no revision 'v7' \(tags: v1; branches: main\)"):
        pull(f"{REPO}@v7", store=mine)
    with pytest.raises(RemoteError, match="repository org/missing not found"):
        pull("org/missing@v1", store=mine)
    with pytest.raises(RemoteError, match=r"is not an adapter: it has neither adapterhub.json .*files: notes.txt"):
        pull("org/not-an-adapter", store=mine)
    with pytest.raises(RemoteError, match="choose the local name with --name"):
        pull("org/modèle", store=mine)
    hub.fail("revision", times=3, status=503)
    with pytest.raises(RemoteError, match=r"resolve org/medical@v1 failed after 3 attempts \(HTTP 503"):
        pull(f"{REPO}@v1", store=mine, retry=fast)
    assert mine.names() == []


def test_pull_of_a_plain_peft_repo_converts_it(hub, store, tmp_path, ids):
    peft = pytest.importorskip("peft")
    import warnings

    import torch

    from adapterhub.models import build_builtin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(build_builtin("tiny-llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.05)
        pm.save_pretrained(str(tmp_path / "p"))
    hub.create_repo("org/plain-peft", {p.name: p.read_bytes() for p in (tmp_path / "p").iterdir() if p.is_file()})
    with pytest.warns(UserWarning, match="fingerprint"):
        r = pull("org/plain-peft", store=store, model="tiny-llama")
    assert r.revision == "main" and r.version.parent == f"hf://org/plain-peft@{r.commit}"
    import adapterhub

    model = adapterhub.load(build_builtin("tiny-llama"), "plain-peft@v1")
    with torch.no_grad():
        assert (model(input_ids=ids).logits - pm(input_ids=ids).logits).abs().max().item() <= 1e-5


def test_fetch_and_load_an_hf_source(hub, store, tmp_path, ids, monkeypatch):
    import huggingface_hub.constants as hf_constants
    import torch

    import adapterhub
    from adapterhub.models import build_builtin

    model = adapterhub.apply(build_builtin("tiny-llama"), SPEC, seed=1)
    with torch.no_grad():
        for _, p in adapterhub.trainable_parameters(model):
            p.add_(0.03)
        expected = model(input_ids=ids).logits
    adapterhub.save(model, tmp_path / "bundle")
    store.save(tmp_path / "bundle", "medical")
    push("medical", REPO, store=store)

    directory = fetch(REPO, "v1")
    assert directory.is_relative_to(Path(hf_constants.HF_HUB_CACHE)) and (directory / "adapterhub.json").is_file()
    loaded = adapterhub.load(build_builtin("tiny-llama"), f"hf://{REPO}@v1")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # the cache answers alone
    assert fetch(REPO, "v1") == directory and fetch(REPO) == directory
    with pytest.raises(RemoteError, match="not in the Hugging Face cache .*HF_HUB_OFFLINE"):
        fetch(REPO, "v2")


# -- the command line ----------------------------------------------------------------------------


def test_cli_push_and_pull(hub, store, tmp_path):
    from adapterhub.cli import cli

    save_versions(store, tmp_path, 2)
    runner = CliRunner()
    home = ["--home", str(store.home)]
    out = runner.invoke(cli, ["push", "medical", "--repo", REPO, *home])
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines()[0].startswith("medical@v1 -> hf://org/medical@v1  pushed, commit ")
    assert "committing 4 files" in out.stderr  # progress on stderr
    out = runner.invoke(cli, ["push", "medical@v2", "--repo", REPO, "--json", *home])
    assert json.loads(out.stdout)[0]["status"] == "already-pushed"
    mine = ["--home", str(tmp_path / "mine")]
    out = runner.invoke(cli, ["pull", f"{REPO}@v2", "--name", "copy", *mine])
    assert out.exit_code == 0 and out.stdout.strip() == "copy@v1"
    out = runner.invoke(cli, ["pull", f"{REPO}@v2", "--name", "copy", "--json", *mine])
    assert json.loads(out.stdout)["new"] is False
    out = runner.invoke(cli, ["pull", f"{REPO}@v9", *mine])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert out.stderr == "error: org/medical has no revision 'v9' (tags: v1, v2; branches: main)\n"


def test_cli_failure_is_a_message_without_traceback(hub, store, tmp_path):
    from adapterhub.cli import cli

    save_versions(store, tmp_path, 1)
    hub.fail("commit", times=10, status=503)
    out = CliRunner().invoke(cli, ["push", "medical@v1", "--repo", REPO, "--retries", "1",
                                   "--home", str(store.home)])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert out.stderr.strip().splitlines()[-1].startswith("error: commit medical@v1 to org/medical failed after "
                                                           "1 attempt (HTTP 503")


def test_the_token_is_used_but_never_printed_or_logged(hub, store, tmp_path, monkeypatch, caplog):
    from adapterhub.cli import cli

    secret = "hf_FakeTokenForTests0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", secret)
    hub.token = secret
    hf_logger = logging.getLogger("huggingface_hub")
    monkeypatch.setattr(hf_logger, "level", logging.DEBUG)
    hf_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG):
            save_versions(store, tmp_path, 1)
            hub.fail("tag", status=503)
            ok = CliRunner().invoke(cli, ["push", "medical", "--repo", REPO, "--home", str(store.home)])
            hub.token = "hf_another_token"
            bad = CliRunner().invoke(cli, ["push", "medical", "--repo", "org/other", "--home", str(store.home)])
    finally:
        hf_logger.removeHandler(caplog.handler)
    assert ok.exit_code == 0 and bad.exit_code == 1 and "HF_TOKEN" in bad.stderr
    assert f"Bearer {secret}" in hub.auth_headers  # the token was sent...
    assert any("retrying" in r.getMessage() for r in caplog.records)
    for text in (ok.stdout, ok.stderr, bad.stdout, bad.stderr, caplog.text,
                 "\n".join(r.getMessage() for r in caplog.records)):
        assert secret not in text  # ...and appears nowhere else

