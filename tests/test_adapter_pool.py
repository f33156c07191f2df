"""AdapterPool: every row of a mixed batch equals that adapter alone, loaded the normal way.

Bundles are made with ``adapterhub.apply`` + a random ``lora_B`` + ``adapterhub.save``; the expected
output of row ``b`` is a fresh model with ``adapterhub.load(model, bundle)`` (or no adapter) run on
that row alone. Adapters differ in rank, alpha, rslora and target modules.
"""

from __future__ import annotations

import pytest
import torch

import adapterhub
from adapterhub.adapter_pool import AdapterPool
from adapterhub.models import build_builtin
from adapterhub.registry import AdapterhubError

ATOL = 2e-5
LLAMA_SPECS = {
    "qv4": "attn.{q,v}_proj -> lora(r=4, alpha=8)",
    "mlp2": "mlp.* -> lora(r=2, alpha=3, rslora=true)",
    "all7": "attn.* -> lora(r=7, alpha=5)\nmlp.down_proj -> lora(r=1, alpha=2)",
    "fa3": "layers.[1..2].self_attn.o_proj -> lora_fa(r=3, alpha=6)",
    "r16": "layers.0.mlp.up_proj -> lora(r=16, alpha=16)",
}
GPT2_SPECS = {
    "attn5": "attn.* -> lora(r=5, alpha=10)",
    "mlp3": "mlp.c_fc -> lora(r=3, alpha=4, rslora=true)",
    "both1": "attn.c_attn -> lora(r=1)\nmlp.c_proj -> lora(r=2)",
}


def make_bundle(directory, family: str, spec: str, seed: int):
    """An adapter with a random (non-zero) ``lora_B``, saved as a bundle in ``directory``."""
    model = adapterhub.apply(build_builtin(family), spec, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for _, layer in adapterhub.adapter_layers(model):
            layer.lora_B.weight.add_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)
    adapterhub.save(model, directory)
    return directory


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool-bundles")
    out = {}
    for family, specs in (("tiny-llama", LLAMA_SPECS), ("tiny-gpt2", GPT2_SPECS)):
        for i, (name, spec) in enumerate(specs.items()):
            out[name] = make_bundle(root / name, family, spec, seed=i)
    return out


def reference_logits(family, bundle, ids, past_ids=None):
    """Logits of ``ids`` (1 x T) from a fresh model with ``bundle`` loaded (None: the base);
    with ``past_ids`` the model first prefills them and ``ids`` are decoded with the KV cache."""
    model = build_builtin(family).eval()
    if bundle is not None:
        adapterhub.load(model, bundle)
    with torch.no_grad():
        if past_ids is None:
            return model(input_ids=ids).logits
        past = model(input_ids=past_ids, use_cache=True).past_key_values
        return model(input_ids=ids, past_key_values=past, use_cache=True).logits


def ids_for(n, t, seed=0):
    return torch.randint(1, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def check_rows(family, pool_model, pool, rows, bundles, ids):
    with torch.no_grad(), pool.batch(rows):
        got = pool_model(input_ids=ids).logits
    for b, name in enumerate(rows):
        want = reference_logits(family, bundles[name] if name else None, ids[b:b + 1])
        assert torch.allclose(got[b:b + 1], want, atol=ATOL), f"row {b} ({name}): {(got[b] - want[0]).abs().max():.2e}"


@pytest.mark.parametrize("family, rows", [
    ("tiny-llama", ["qv4", None, "mlp2", "all7", "qv4", "fa3", "r16"]),
    ("tiny-gpt2", ["attn5", "mlp3", None, "both1", "attn5"]),
])
def test_mixed_batch_prefill_rows_equal_each_adapter_alone(family, rows, bundles):
    model = build_builtin(family).eval()
    pool = AdapterPool(model, max_resident=8)
    for name in dict.fromkeys(r for r in rows if r):
        assert pool.add(bundles[name], name=name) == name
    check_rows(family, model, pool, rows, bundles, ids_for(len(rows), 6))
    with torch.no_grad():  # after the batch every row is base-only again
        base = build_builtin(family).eval()(input_ids=ids_for(2, 4)).logits
        assert torch.allclose(model(input_ids=ids_for(2, 4)).logits, base, atol=ATOL)


@pytest.mark.parametrize("family, rows", [
    ("tiny-llama", ["all7", "mlp2", None, "r16"]),
    ("tiny-gpt2", ["mlp3", None, "both1"]),
])
def test_decode_with_kv_cache_rows_equal_each_adapter_alone(family, rows, bundles):
    model = build_builtin(family).eval()
    pool = AdapterPool(model)
    for name in dict.fromkeys(r for r in rows if r):
        pool.add(bundles[name], name=name)
    ids = ids_for(len(rows), 7, seed=3)
    with torch.no_grad(), pool.batch(rows):
        past = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        got = model(input_ids=ids[:, -1:], past_key_values=past, use_cache=True).logits  # T = 1
    for b, name in enumerate(rows):
        want = reference_logits(family, bundles[name] if name else None, ids[b:b + 1, -1:], ids[b:b + 1, :-1])
        assert torch.allclose(got[b:b + 1], want, atol=ATOL), f"row {b} ({name})"


def test_lru_paging_gives_same_outputs_and_counts(bundles):
    model = build_builtin("tiny-llama").eval()
    pool = AdapterPool(model, max_resident=2)
    names = ["qv4", "mlp2", "all7", "fa3"]
    for n in names:
        pool.add(bundles[n], name=n)
    assert pool.stats()["resident"] == 0 and pool.stats()["page_ins"] == 0
    ids = ids_for(3, 5, seed=4)
    # slots: 2. Each step: (rows, page_ins after, evictions after)
    steps = [(["qv4", None, "mlp2"], 2, 0),   # both paged in
             (["all7", "all7", "mlp2"], 3, 1),  # all7 evicts qv4 (least recently used, not in batch)
             (["mlp2", "qv4", None], 4, 2),     # qv4 evicts all7
             (["mlp2", "qv4", "qv4"], 4, 2),    # both resident: nothing moves
             (["fa3", None, "all7"], 6, 4)]     # both evicted
    for rows, page_ins, evictions in steps:
        check_rows("tiny-llama", model, pool, rows, bundles, ids)
        s = pool.stats()
        assert (s["page_ins"], s["evictions"], s["resident"], s["slots"]) == (page_ins, evictions, 2, 2), rows
    with pytest.raises(AdapterhubError, match="max_resident=2"):
        pool.set_batch(["qv4", "mlp2", "all7"])


def test_stats_bytes_and_remove(bundles):
    model = build_builtin("tiny-llama").eval()
    pool = AdapterPool(model, max_resident=4)
    pool.add(bundles["qv4"], name="a")
    pool.add(bundles["r16"], name="b")
    s = pool.stats()
    # float32 A (r x in) + B (out x r): qv4 at r=4 on every q_proj and v_proj, r16 on layers.0.mlp.up_proj
    feats = {n: (m.in_features, m.out_features) for n, m in build_builtin("tiny-llama").named_modules()
             if n.endswith(("q_proj", "v_proj")) or n == "model.layers.0.mlp.up_proj"}
    assert len(feats) == 9
    assert s["host_bytes"] == 4 * sum((16 if n.endswith("up_proj") else 4) * (fin + fout)
                                      for n, (fin, fout) in feats.items())
    assert s["adapters"] == 2 and s["slots"] == 0 and s["device_bytes"] == 0
    assert sorted(pool.names()) == ["a", "b"] and "a" in pool and len(pool) == 2
    with pool.batch(["a", "b"]):
        s = pool.stats()
        assert s["resident"] == 2 and s["slots"] == 2
        # two slots at rank 16 in the 9 wrapped modules: A, B, scaling (float32), rank (int32)
        assert s["device_bytes"] == sum(2 * (16 * (fin + fout) * 4 + 4 + 4) for fin, fout in feats.values())
        with pytest.raises(AdapterhubError, match="used by the current batch"):
            pool.remove("a")
    pool.remove("a")
    assert "a" not in pool and pool.stats()["resident"] == 1
    pool.add(bundles["mlp2"], name="a")  # the name is free again; the freed slot is reused
    check_rows("tiny-llama", model, pool, ["a", "b", None], {"a": bundles["mlp2"], "b": bundles["r16"]},
               ids_for(3, 4))
    assert pool.stats()["slots"] == 2


def test_rank_growth_keeps_resident_slots(bundles):
    model = build_builtin("tiny-llama").eval()
    pool = AdapterPool(model)
    pool.add(bundles["qv4"], name="qv4")
    ids = ids_for(2, 4, seed=5)
    check_rows("tiny-llama", model, pool, ["qv4", None], bundles, ids)
    pool.add(bundles["r16"], name="r16")  # grows every layer to rank 16 and wraps up_proj
    check_rows("tiny-llama", model, pool, ["qv4", "r16"], bundles, ids)
    assert pool.stats()["page_ins"] == 2


def test_names_from_store_refs_and_directories(bundles, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "home"))
    store = adapterhub.Store()
    store.save(bundles["qv4"], "medical")
    store.save(bundles["all7"], "medical")
    model = build_builtin("tiny-llama").eval()
    pool = AdapterPool(model)
    assert pool.add("medical@v2") == "medical@v2"
    assert pool.add("medical@v1") == "medical@v1"
    assert pool.add(bundles["mlp2"]) == "mlp2"  # a directory: its name
    refs = {"medical@v2": bundles["all7"], "medical@v1": bundles["qv4"], "mlp2": bundles["mlp2"]}
    check_rows("tiny-llama", model, pool, ["medical@v1", "medical@v2", "mlp2"], refs, ids_for(3, 5))


def test_peft_lora_directory(tmp_path):
    peft = pytest.importorskip("peft")
    base = build_builtin("tiny-llama").eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "down_proj"], use_rslora=True,
                          rank_pattern={"down_proj": 2})
    pm = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(tmp_path / "peft-adapter")
    ids = ids_for(2, 5, seed=6)
    with torch.no_grad():
        want = pm(input_ids=ids[:1]).logits
    model = build_builtin("tiny-llama").eval()
    pool = AdapterPool(model)
    assert pool.add(tmp_path / "peft-adapter") == "peft-adapter"
    with torch.no_grad(), pool.batch(["peft-adapter", None]):
        got = model(input_ids=ids).logits
    assert torch.allclose(got[:1], want, atol=ATOL)
    with torch.no_grad():
        assert torch.allclose(got[1:], build_builtin("tiny-llama").eval()(input_ids=ids[1:]).logits, atol=ATOL)


def test_errors(bundles, tmp_path):
    model = build_builtin("tiny-llama").eval()
    pool = AdapterPool(model, max_resident=2, max_rank=8)
    pool.add(bundles["qv4"], name="medical")
    with pytest.raises(AdapterhubError, match="already in the pool"):
        pool.add(bundles["qv4"], name="medical")
    with pytest.raises(AdapterhubError, match="unknown adapter 'medicl'.*did you mean 'medical'"):
        pool.set_batch(["medicl"])
    with pytest.raises(AdapterhubError, match="unknown adapter"):
        pool.remove("nope")
    with pytest.raises(AdapterhubError, match="rank 16 > the pool's max_rank 8"):
        pool.add(bundles["r16"])
    with pytest.raises(AdapterhubError, match="another base model"):
        pool.add(bundles["attn5"])  # a GPT-2 adapter
    dora = make_bundle_variant(tmp_path / "dora", "attn.q_proj -> dora(r=2)")
    with pytest.raises(AdapterhubError, match="dora.*not a plain LoRA.*adapterhub export"):
        pool.add(dora)
    train = make_bundle_variant(tmp_path / "train", "attn.q_proj -> lora(r=2)\nlayers.0.mlp.up_proj -> train")
    with pytest.raises(AdapterhubError, match="train rule"):
        pool.add(train)
    emb = make_bundle_variant(tmp_path / "emb", "embed_tokens -> lora(r=2)")
    with pytest.raises(AdapterhubError, match="Linear / Conv1D"):
        pool.add(emb)
    with pytest.raises(AdapterhubError, match="does not exist|neither"):
        pool.add(tmp_path / "missing")
    assert pool.names() == ["medical"]  # failed adds left nothing behind
    assert set(pool.layers()) == {f"model.layers.{i}.self_attn.{m}_proj" for i in range(4) for m in "qv"}
    with pool.batch(["medical", None]), pytest.raises(AdapterhubError, match="rows"):
        model(input_ids=ids_for(3, 2))
    with pytest.raises(AdapterhubError, match="plain model"):
        AdapterPool(adapterhub.apply(build_builtin("tiny-llama"), "attn.q_proj -> lora(r=2)"))


def make_bundle_variant(directory, spec):
    model = adapterhub.apply(build_builtin("tiny-llama"), spec, seed=0)
    adapterhub.save(model, directory)
    return directory


def test_loading_reads_no_pickle_and_builds_no_model(bundles, monkeypatch):
    """The pool reads safetensors + JSON only: torch.load and adapterhub.apply are never called."""
    import adapterhub.surgery

    def refuse(*args, **kwargs):
        raise AssertionError("called")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(adapterhub.surgery, "apply", refuse)
    pool = AdapterPool(build_builtin("tiny-llama"))
    for i in range(20):
        pool.add(bundles["qv4" if i % 2 else "mlp2"], name=f"a{i}")
    assert len(pool) == 20


def test_same_rows_reuse_slot_rows_and_page_ins_show(bundles, tmp_path):
    """Decode steps with the same rows share one SlotRows (and the layers' gathered A / B); another adapter
    paged into the same slot between two forwards with identical rows changes the outputs to its own."""
    other = make_bundle(tmp_path / "qv4b", "tiny-llama", LLAMA_SPECS["qv4"], seed=42)  # same shapes, other weights
    model = build_builtin("tiny-llama").eval()
    pool = AdapterPool(model, max_resident=1)
    pool.add(bundles["qv4"], name="a")
    pool.add(other, name="b")
    assert pool._adapters["a"].rank == pool._adapters["b"].rank == 4
    ids = ids_for(2, 3, seed=7)
    refs = {"a": bundles["qv4"], "b": other}
    check_rows("tiny-llama", model, pool, ["a", None], refs, ids)
    pool.set_batch(["a", None])
    rows = pool._state.rows
    pool.clear_batch()
    pool.set_batch(["a", None])
    assert pool._state.rows is rows  # same slots, nothing paged in: reused
    with torch.no_grad():
        first = model(input_ids=ids).logits
    pool._page_in("b", rows.host_slots[0])  # 'b' overwrites the slot under the very same rows object
    assert pool._state.rows is rows
    with torch.no_grad():
        got = model(input_ids=ids).logits
    want = reference_logits("tiny-llama", other, ids[:1])
    assert torch.allclose(got[:1], want, atol=ATOL) and not torch.allclose(got[:1], first[:1], atol=1e-3)
    pool._page_in("a", rows.host_slots[0])
    pool.clear_batch()
    # the public path: 'b' evicts 'a' from the one slot; identical slot rows, b's outputs
    for name in ("b", "a", "b"):
        check_rows("tiny-llama", model, pool, [name, None], refs, ids)
        assert pool._state.rows is None and pool._last_rows.host_slots == rows.host_slots
    assert pool.stats()["evictions"] == 3
