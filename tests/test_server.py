"""`adapterhub serve`: the OpenAI-style server on tiny-llama with adapters from a temporary store.

Expected completions come from an independent computation: the adapter applied the normal way
(`adapterhub.load` on a fresh model) and a plain greedy loop that recomputes the whole sequence at every step
(no KV cache, no engine, no pool).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import adapterhub
from adapterhub.models import build_builtin
from adapterhub.server import create_server
from adapterhub.store import Store
from adapterhub.text_codec import byte_codec

SPECS = {  # name -> (spec, seed): different targets and ranks
    "medical": ("attn.* -> lora(r=4)", 1),
    "legal": ("mlp.* -> lora(r=8)", 2),
    "code": ("attn.{q,v}_proj -> lora(r=2, alpha=8)", 3),
}
CODEC = byte_codec()


def make_bundle(path: Path, spec: str, seed: int) -> Path:
    model = build_builtin("tiny-llama")
    adapterhub.apply(model, spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # LoRA starts with B = 0: make the adapters change the outputs
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    adapterhub.save(model, path)
    return path


def greedy(bundle: Path | None, prompt: str, n: int, temperature: float = 0.0, seed: int = 0) -> list[int]:
    """The reference: ``n`` tokens, recomputing the whole sequence at every step; greedy, or drawn from
    softmax(logits / temperature) with a generator seeded ``seed``."""
    model = build_builtin("tiny-llama")
    if bundle is not None:
        adapterhub.load(model, bundle)
    model.eval()
    ids = CODEC.encode(prompt)
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            if temperature == 0:
                out.append(int(logits.argmax()))
            else:
                out.append(int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)))
    return out


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    store = Store(root / "store")
    for name, (spec, seed) in SPECS.items():  # medical@v1 carries a tag, so `--adapters store` loads it too
        store.save(make_bundle(root / "bundles" / name, spec, seed), name, tag="stable" if name == "medical" else None)
    store.save(make_bundle(root / "bundles" / "medical-2", "attn.* -> lora(r=6)", 7), "medical")
    make_bundle(root / "extra", "mlp.{gate,up}_proj -> lora(r=3)", 11)
    return root


@pytest.fixture(scope="module")
def server(home):
    logs: list[str] = []
    srv = create_server("tiny-llama", ["store"], home=home / "store", port=0, max_batch=16, max_seq_len=96,
                        log=logs.append).start()
    srv.test_logs = logs
    yield srv
    srv.shutdown()


def call(url: str, method: str, path: str, body=None, raw: bytes | None = None, timeout: float = 30):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def complete(url: str, model: str, prompt, n: int, **extra):
    return call(url, "POST", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": n,
                                                 "temperature": 0, "return_token_ids": True, **extra})


def bundle_of(home: Path, model: str) -> Path | None:
    if model == "tiny-llama":
        return None
    store = Store(home / "store")
    return store.checkout(model)


def test_models_lists_adapters_aliases_and_base(server):
    status, body = call(server.url, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    entries = {m["id"]: m for m in body["data"]}
    assert set(entries) >= {"tiny-llama", "medical@v1", "medical@v2", "legal@v1", "code@v1", "medical",
                            "medical@latest", "medical@stable", "legal", "legal@latest", "code", "code@latest"}
    assert all(m["owned_by"] == "adapterhub" and m["object"] == "model" for m in body["data"])
    assert entries["medical"]["parent"] == "medical@v2" and entries["medical@stable"]["parent"] == "medical@v1"
    assert entries["legal@v1"]["parent"] is None and entries["legal@v1"]["root"] == "tiny-llama"


def test_completions_equal_the_adapter_applied_alone(server, home):
    prompts = ["Hello there", "The patient"]
    for model in ("medical@v1", "medical", "legal@v1", "code", "tiny-llama"):
        status, body = complete(server.url, model, prompts, 6)
        assert status == 200, body
        assert body["object"] == "text_completion" and body["model"] == model
        bundle = bundle_of(home, model)
        for i, choice in enumerate(body["choices"]):
            want = greedy(bundle, prompts[i], 6)
            assert choice["index"] == i and choice["finish_reason"] == "length" and choice["logprobs"] is None
            assert choice["token_ids"] == want, (model, i)
            assert choice["text"] == CODEC.decode(want)
        assert body["usage"] == {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 12,
                                 "total_tokens": sum(len(p) for p in prompts) + 12}
    # the adapters really differ from each other and from the base model
    outs = {m: complete(server.url, m, "Hello there", 6)[1]["choices"][0]["token_ids"]
            for m in ("medical@v1", "medical@v2", "legal", "code", "tiny-llama")}
    assert len({tuple(v) for v in outs.values()}) == 5


def test_concurrent_clients_are_batched_and_none_is_dropped(server, home, monkeypatch):
    models = ["medical@v1", "medical", "legal", "code", "tiny-llama", "medical@stable"]
    jobs = [(models[i % len(models)], f"request {i}: " + "abc"[: i % 4], 4 + i % 5) for i in range(32)]
    want = {(m, prompt): greedy(bundle_of(home, m), prompt, n) for m, prompt, n in jobs}
    _, before = call(server.url, "GET", "/health")
    gate = Gate(server.engine, monkeypatch)  # hold the engine until all 32 clients are in flight
    threads, results = start_clients(server.url, jobs)
    deadline = time.monotonic() + 30
    while call(server.url, "GET", "/health")[1]["in_flight"] < len(jobs):
        assert time.monotonic() < deadline, "the clients never all got in flight"
        time.sleep(0.01)
    gate.open.set()
    deadline = time.monotonic() + 55
    for t in threads:
        t.join(timeout=max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "clients still waiting after 55 s"
    for (model, prompt, _), res in zip(jobs, results):
        assert isinstance(res, tuple) and res[0] == 200, (model, prompt, res)
        choice = res[1]["choices"][0]
        assert choice["token_ids"] == want[(model, prompt)] and choice["finish_reason"] == "length"
    _, after = call(server.url, "GET", "/health")
    assert after["stats"]["completed"] - before["stats"]["completed"] == len(jobs)
    # 6 adapters (and the base) in one batch, as large as the engine allows; the other 16 joined as rows finished
    assert after["stats"]["max_batch"] == server.engine.max_batch == 16
    assert after["in_flight"] == 0


def test_seeded_sampling_follows_the_seed_per_prompt(server, home):
    prompts = ["Once", "Once", "upon"]
    status, body = complete(server.url, "code", prompts, 8, temperature=0.9, seed=41)
    assert status == 200, body
    bundle = bundle_of(home, "code")
    got = [c["token_ids"] for c in body["choices"]]
    assert got == [greedy(bundle, p, 8, temperature=0.9, seed=41 + i) for i, p in enumerate(prompts)]
    assert got[0] != got[1]  # same prompt, seeds 41 and 42
    again = complete(server.url, "code", prompts, 8, temperature=0.9, seed=41)[1]
    assert [c["token_ids"] for c in again["choices"]] == got


def test_stop_strings_cut_the_text_and_end_early(server, home):
    want = greedy(bundle_of(home, "legal"), "Hello there", 24)
    full = CODEC.decode(want)
    j = next(k for k, t in enumerate(want) if 32 < t < 127 and k > 0)  # a printable ASCII token
    stop = chr(want[j])
    first = next(k for k in range(len(want)) if stop in CODEC.decode(want[:k + 1]))
    status, body = complete(server.url, "legal", "Hello there", 24, stop=[stop, "\u2603never"])
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == full[:full.find(stop)]
    assert choice["token_ids"] == want[:first + 1]  # cancelled right after the token that completed the stop


@pytest.mark.parametrize("body, status, code", [
    ({"model": "nobody@v9", "prompt": "x"}, 404, "model_not_found"),
    ({"model": "medical", "prompt": "x" * 90, "max_tokens": 10}, 400, "context_length_exceeded"),
    ({"model": "medical", "prompt": "x", "max_tokens": "5"}, 400, None),
    ({"model": "medical", "prompt": "x", "temperature": "hot"}, 400, None),
    ({"model": "medical", "prompt": 5}, 400, None),
    ({"model": "medical", "prompt": ""}, 400, None),
    ({"model": "medical"}, 400, None),
    ({"prompt": "x"}, 400, None),
    ({"model": "medical", "prompt": "x", "stream": True}, 400, "unsupported"),
    ({"model": "medical", "prompt": [1, 2, 999]}, 400, None),
    ([1, 2], 400, "invalid_json"),
])
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(server, body, status, code):
    got, reply = call(server.url, "POST", "/v1/completions", body)
    assert got == status, reply
    assert set(reply) == {"error"} and reply["error"]["message"] and reply["error"]["type"]
    assert "Traceback" not in reply["error"]["message"]
    if code:
        assert reply["error"]["code"] == code
    assert complete(server.url, "medical", "ok", 2)[0] == 200


def test_http_level_errors(server):
    assert call(server.url, "POST", "/v1/completions", raw=b'{"model": "medical", "prompt": ')[0] == 400
    assert call(server.url, "POST", "/v1/completions", raw=b"\xff\xfe")[0] == 400
    status, reply = call(server.url, "GET", "/v1/completions")
    assert status == 405 and reply["error"]["code"] == "method_not_allowed"
    assert call(server.url, "GET", "/v2/nothing")[0] == 404
    assert call(server.url, "DELETE", "/v1/adapters/nobody")[0] == 404
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(50 << 20))  # announced, never sent: refused before it is read
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "body_too_large"
    conn.close()
    assert call(server.url, "GET", "/health")[1]["status"] == "ok"


def test_internal_failures_are_500s_and_the_server_recovers(server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(server, "get_models", broken)
    status, reply = call(server.url, "GET", "/v1/models")
    assert status == 500 and reply["error"]["type"] == "server_error" and "boom" not in reply["error"]["message"]
    monkeypatch.undo()
    monkeypatch.setattr(server.engine, "step", broken)
    status, reply = complete(server.url, "medical", "hi", 3)
    assert status == 500 and "boom" in reply["error"]["message"]
    monkeypatch.undo()
    assert complete(server.url, "medical", "hi", 3)[0] == 200
    assert any("RuntimeError: boom" in line for line in server.test_logs)


class Gate:
    """Holds the scheduler before each engine step while closed, so a test decides when requests advance."""

    def __init__(self, engine, monkeypatch):
        self.open = threading.Event()
        real = engine.step

        def step():
            assert self.open.wait(timeout=60), "gate never opened"
            return real()

        monkeypatch.setattr(engine, "step", step)


def wait_in_flight(url: str, model: str, n: int) -> None:
    deadline = time.monotonic() + 30
    while call(url, "GET", "/health")[1]["in_flight_by_model"].get(model, 0) < n:
        assert time.monotonic() < deadline, f"{n} requests on {model} never got in flight"
        time.sleep(0.01)


def start_clients(url: str, jobs: list[tuple[str, str, int]]) -> tuple[list[threading.Thread], list]:
    results: list = [None] * len(jobs)

    def client(i: int) -> None:
        model, prompt, n = jobs[i]
        try:
            results[i] = complete(url, model, prompt, n, timeout=60)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    return threads, results


def test_load_and_unload_at_runtime_while_requests_run(server, home, monkeypatch):
    want_med = greedy(bundle_of(home, "medical"), "busy", 12)
    want_extra = greedy(home / "extra", "busy", 12)
    background, med_results = start_clients(server.url, [("medical", "busy", 12)] * 4)
    status, body = call(server.url, "POST", "/v1/adapters", {"source": str(home / "extra"), "name": "extra"})
    assert status == 200 and body["data"][0]["id"] == "extra"
    assert call(server.url, "POST", "/v1/adapters", {"source": str(home / "extra"), "name": "extra"})[0] == 409
    status, body = complete(server.url, "extra", "busy", 12)
    assert status == 200 and body["choices"][0]["token_ids"] == want_extra
    # unload while requests on the adapter are in flight: new ones are refused at once, running ones finish
    gate = Gate(server.engine, monkeypatch)
    on_extra, extra_results = start_clients(server.url, [("extra", "busy", 12)] * 3)
    wait_in_flight(server.url, "extra", 3)
    deleted: list = []
    unloading = threading.Thread(target=lambda: deleted.append(call(server.url, "DELETE", "/v1/adapters/extra")))
    unloading.start()
    deadline = time.monotonic() + 30
    while "extra" not in call(server.url, "GET", "/health")[1]["unloading"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # the DELETE waits for the requests on 'extra' (held at the gate); new requests for it get a 404 meanwhile
    status, body = complete(server.url, "extra", "Hello", 2)
    assert status == 404 and "being unloaded" in body["error"]["message"]
    assert not deleted
    gate.open.set()
    for t in [unloading, *background, *on_extra]:
        t.join(timeout=60)
    assert deleted[0][0] == 200 and deleted[0][1]["deleted"] and deleted[0][1]["failed_in_flight"] == 0
    assert complete(server.url, "extra", "Hello", 2)[0] == 404
    assert "extra" not in {m["id"] for m in call(server.url, "GET", "/v1/models")[1]["data"]}
    for res in med_results:
        assert res[0] == 200 and res[1]["choices"][0]["token_ids"] == want_med
    for res in extra_results:
        assert res[0] == 200 and res[1]["choices"][0]["token_ids"] == want_extra
    assert call(server.url, "POST", "/v1/adapters", {"source": "nobody@v1"})[0] == 404
    assert call(server.url, "POST", "/v1/adapters", {"name": "x"})[0] == 400


def test_unload_fails_requests_that_outlast_the_drain_timeout(server, home, monkeypatch):
    assert call(server.url, "POST", "/v1/adapters", {"source": str(home / "extra"), "name": "extra2"})[0] == 200
    monkeypatch.setattr(server, "drain_timeout", 0.0)
    gate = Gate(server.engine, monkeypatch)
    threads, results = start_clients(server.url, [("extra2", "slow", 12)] * 2)
    wait_in_flight(server.url, "extra2", 2)
    status, body = call(server.url, "DELETE", "/v1/adapters/extra2")
    gate.open.set()
    for t in threads:
        t.join(timeout=60)
    assert status == 200 and body["failed_in_flight"] == 2
    for res in results:
        assert res[0] == 500 and "unloaded" in res[1]["error"]["message"]
    assert complete(server.url, "medical", "ok", 2)[0] == 200


def test_request_timeout_is_a_504_and_the_server_goes_on(server, monkeypatch):
    monkeypatch.setattr(server, "request_timeout", 0.001)
    gate = Gate(server.engine, monkeypatch)  # closed: the request cannot finish in time
    status, body = complete(server.url, "medical", "slow", 20)
    gate.open.set()
    assert status == 504 and body["error"]["code"] == "timeout"
    monkeypatch.undo()
    assert complete(server.url, "medical", "ok", 2)[0] == 200


def test_keep_alive_connection_survives_errors(server):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    for method, path, body, status in [("GET", "/health", None, 200), ("POST", "/v1/completions", b"{oops", 400),
                                       ("GET", "/nothing", None, 404),
                                       ("POST", "/v1/completions", json.dumps(
                                           {"model": "code", "prompt": "hi", "max_tokens": 2}).encode(), 200),
                                       ("GET", "/v1/models", None, 200)]:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == status and isinstance(json.loads(resp.read()), dict)
    conn.close()


@pytest.mark.parametrize("grace", [30.0, 0.0])
def test_shutdown_finishes_or_fails_requests_in_flight(grace, monkeypatch):
    srv = create_server("tiny-llama", [], port=0, max_seq_len=64, quiet=True).start()
    gate = Gate(srv.engine, monkeypatch)
    threads, results = start_clients(srv.url, [("tiny-llama", "bye", 6)] * 3)
    wait_in_flight(srv.url, "tiny-llama", 3)
    stopper = threading.Thread(target=srv.shutdown, kwargs={"grace": grace})
    stopper.start()
    if grace:
        gate.open.set()  # the requests may now finish: shutdown waits for them
    for t in threads:
        t.join(timeout=60)
    gate.open.set()
    stopper.join(timeout=60)
    assert not stopper.is_alive()
    for res in results:
        if grace:
            assert res[0] == 200 and res[1]["choices"][0]["token_ids"] == greedy(None, "bye", 6)
        else:
            assert res[0] == 503 and res[1]["error"]["type"] == "server_error"
    with pytest.raises(urllib.error.URLError):
        call(srv.url, "GET", "/health", timeout=5)


def test_loading_a_new_version_moves_the_name_to_it(server, home):
    store = Store(home / "store")
    store.save(home / "bundles" / "code", "ops")
    status, body = call(server.url, "POST", "/v1/adapters", {"source": "ops"})
    assert status == 200 and body["data"][0]["id"] == "ops@v1" and body["data"][0]["aliases"] == ["ops", "ops@latest"]
    assert call(server.url, "POST", "/v1/adapters", {"source": "ops@v1"})[0] == 200  # already loaded: nothing new
    store.save(home / "bundles" / "legal", "ops")
    status, body = call(server.url, "POST", "/v1/adapters", {"source": "ops"})
    assert status == 200 and body["data"][0]["id"] == "ops@v2"
    parents = {m["id"]: m["parent"] for m in call(server.url, "GET", "/v1/models")[1]["data"]}
    assert parents["ops"] == parents["ops@latest"] == "ops@v2" and "ops@v1" in parents
    assert complete(server.url, "ops", "Hi", 4)[1]["choices"][0]["token_ids"] == greedy(home / "bundles" / "legal",
                                                                                      "Hi", 4)
    assert call(server.url, "DELETE", "/v1/adapters/ops")[1]["id"] == "ops@v2"  # an alias unloads what it names
    assert call(server.url, "DELETE", "/v1/adapters/ops@v1")[1]["aliases"] == []


def test_adapter_sources(home):
    from adapterhub.registry import AdapterhubError
    from adapterhub.server_sources import expand_source

    in_dir = expand_source(str(home / "bundles"))
    assert [a.name for a in in_dir] == ["code", "legal", "medical", "medical-2"]
    assert [a.name for a in expand_source(str(home / "extra"))] == ["extra"]
    by_store_dir = {a.name: a.aliases for a in expand_source(str(home / "store"))}
    assert by_store_dir == {a.name: a.aliases for a in expand_source("store", home / "store")}
    assert by_store_dir["medical@v1"] == ["medical@stable"]
    assert by_store_dir["medical@v2"] == ["medical", "medical@latest"]
    [stable] = expand_source("medical@stable", home / "store")
    assert (stable.name, stable.aliases, stable.immutable) == ("medical@v1", ["medical@stable"], True)
    assert [(a.name, a.aliases) for a in expand_source("medical@v2", home / "store")] == [("medical@v2", [])]
    for bad, message in [(str(home / "nope"), "does not exist"), (str(home / "extra" / "adapterhub.json"), "file"),
                         ("nobody", "nobody"), ("medical@v9", "v9")]:
        with pytest.raises(AdapterhubError, match=message):
            expand_source(bad, home / "store")
    empty = home / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(AdapterhubError, match="neither a bundle directory"):
        expand_source(str(empty))


def test_serve_cli_reports_bad_sources_without_a_traceback(home):
    from click.testing import CliRunner

    from adapterhub.cli import cli

    result = CliRunner().invoke(cli, ["serve", "--model", "tiny-llama", "--adapters", str(home / "nope"),
                                      "--port", "0", "--home", str(home / "store")])
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output


def test_serve_cli_starts_answers_and_stops(home):
    env = {**os.environ, "ADAPTERHUB_HOME": str(home / "store")}
    cmd = [sys.executable, "-c", "from adapterhub.cli import main; main()", "serve", "--model", "tiny-llama",
           "--adapters", "legal@v1", "--adapters", str(home / "extra"), "--port", "0", "--json", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # the start-up summary, printed once the server listens
        assert line, proc.stderr.read()
        info = json.loads(line)
        assert {a["id"] for a in info["adapters"]} == {"legal@v1", "extra"}
        url = info["url"]
        deadline = time.monotonic() + 30
        while True:
            try:
                assert call(url, "GET", "/health", timeout=5)[1]["status"] == "ok"
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline
                time.sleep(0.1)
        status, body = complete(url, "legal@v1", "Hello", 4)
        assert status == 200 and body["choices"][0]["token_ids"] == greedy(bundle_of(home, "legal@v1"), "Hello", 4)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
