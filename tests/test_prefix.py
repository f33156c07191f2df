"""Prefix tuning beyond the shared matrix: attention computed by hand, masks, positions, caches,
generate(), training, errors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import adapterhub
from adapterhub.models import build_builtin
from adapterhub.plugins.prefix import PrefixLayer, prefix_count

from .variant_cases.case_prefix import reference_model, table

FAMS = ["tiny-llama", "tiny-gpt2"]


def adapted(name: str, spec: str = "layers -> prefix(tokens=4)", seed: int = 0):
    model = adapterhub.apply(build_builtin(name), spec, seed=seed)
    model.eval()
    return model


def prefix_layer(model) -> PrefixLayer:
    (layer,) = [lyr for _, lyr in adapterhub.adapter_layers(model)]
    return layer


def ids_for(seed: int, n: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(1, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def generate_matches_full_recompute(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """generate() (cached, incremental) gives at every step the logits of one uncached forward of the
    whole sequence; returns the first step's logits."""
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    seq, n = out.sequences, ids.shape[1]
    assert len(out.logits) >= 1
    with torch.no_grad():
        full = model(seq[:, :-1], use_cache=False).logits
    for s, step in enumerate(out.logits):
        assert torch.allclose(step, full[:, n - 1 + s], atol=1e-4), f"step {s}"
    return out.logits[0]


# --------------------------------------------------------------------------- attention by hand


def rotate(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE (Su et al.) on ``... x L x d`` at positions ``pos``, halves convention."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def test_one_layer_attention_by_hand():
    """softmax(q [P_K; K]^T / sqrt d + M) [P_V; V]: prefix fully visible, real keys causal and unpadded."""
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=260, max_position_embeddings=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    adapterhub.apply(model, "layers -> prefix(tokens=3)")
    layer = prefix_layer(model)
    attn = model.model.layers[0].self_attn
    seen = {}
    attn.register_forward_hook(lambda m, a, kw, out: seen.update(h=kw["hidden_states"], out=out[0]),
                               with_kwargs=True)
    ids = ids_for(7, n=2, length=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        h = seen["h"]
        b, n, p, heads, kvh, hd = h.shape[0], h.shape[1], 3, 4, 2, 16
        q = (h @ attn.q_proj.weight.t()).view(b, n, heads, hd).transpose(1, 2)
        k = (h @ attn.k_proj.weight.t()).view(b, n, kvh, hd).transpose(1, 2)
        v = (h @ attn.v_proj.weight.t()).view(b, n, kvh, hd).transpose(1, 2)
        pos = torch.arange(n) + p  # the real tokens follow the p prefix positions
        theta = cfg.rope_parameters["rope_theta"]
        q, k = rotate(q, pos, theta), rotate(k, pos, theta)
        t = table(layer, cfg)[:, 0]  # p x 2 x kv_heads x head_dim, layer 0
        pk = t[:, 0].permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1)
        pv = t[:, 1].permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1)
        keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)  # b x kvh x (p+n) x hd
        group = heads // kvh
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(hd)  # b x heads x n x (p+n)
        visible = torch.zeros(b, n, p + n, dtype=torch.bool)
        visible[:, :, :p] = True
        visible[:, :, p:] = torch.tril(torch.ones(n, n, dtype=torch.bool)) & mask.bool()[:, None, :]
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        out = (scores.softmax(-1) @ values).transpose(1, 2).reshape(b, n, heads * hd) @ attn.o_proj.weight.t()
    rows = mask.bool()  # padded query rows are undefined in transformers too; compare the real ones
    assert torch.allclose(seen["out"][rows], out[rows], atol=1e-5), (seen["out"][rows] - out[rows]).abs().max()


# --------------------------------------------------------------------------- model-level mechanics


@pytest.mark.parametrize("name", FAMS)
def test_padding_mask_matches_base_with_cache(name):
    model = adapted(name)
    ids = ids_for(1)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    want = reference_model(model, build_builtin(name), ids, attention_mask=mask)
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-5)


@pytest.mark.parametrize("name", FAMS)
def test_given_positions_are_shifted_like_the_default(name):
    model = adapted(name)
    ids = ids_for(2)
    with torch.no_grad():
        plain = model(ids).logits
        given = model(ids, position_ids=torch.arange(ids.shape[1]).unsqueeze(0)).logits
        positional = model(ids, None).logits  # positional arguments are bound by name
    assert torch.allclose(plain, given, atol=1e-6)
    assert torch.equal(plain, positional)


@pytest.mark.parametrize("name", FAMS)
def test_generate_equals_full_recompute(name):
    model = adapted(name)
    ids = ids_for(3, n=2, length=5)
    first = generate_matches_full_recompute(model, ids, 6)
    with torch.no_grad():
        base = build_builtin(name)(ids).logits[:, -1]
    assert not torch.allclose(first, base, atol=1e-4)


@pytest.mark.parametrize("name", FAMS)
def test_continuing_a_returned_cache(name):
    model = adapted(name)
    ids = ids_for(4, length=10)
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :6], use_cache=True)
        assert first.past_key_values.get_seq_length() == 4 + 6
        rest = model(ids[:, 6:], past_key_values=first.past_key_values,
                     attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(rest, full[:, 6:], atol=1e-5)


def test_a_cache_without_the_prefix_is_an_error():
    model = adapted("tiny-llama")
    base = build_builtin("tiny-llama")
    ids = ids_for(5)
    with torch.no_grad():
        cache = base(ids, use_cache=True).past_key_values
    with pytest.raises(adapterhub.AdapterhubError, match="prefix"):
        model(ids[:, :1], past_key_values=cache)


def test_an_empty_cache_is_filled_in_place():
    model = adapted("tiny-gpt2")
    cache = DynamicCache()
    with torch.no_grad():
        model(ids_for(6), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 4 + 9


# --------------------------------------------------------------------------- training


def test_training_updates_only_the_reparameterisation():
    model = adapted("tiny-llama")
    model.train()
    layer = prefix_layer(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = ids_for(8)
    with torch.no_grad():
        eval_before = model.eval()(ids).logits
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert set(grads) == {"embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight",
                          "transform.2.bias"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"model.layers_prefix.{n}" for n in grads}
    with torch.no_grad():
        eval_after = model.eval()(ids).logits  # the eval-time table cache notices the update
    assert not torch.allclose(eval_before, eval_after)


def test_the_table_is_cached_without_gradients():
    layer = prefix_layer(adapted("tiny-gpt2"))
    with torch.no_grad():
        a, b = layer.prefix_table(), layer.prefix_table()
        assert a is b and a.shape == (4, 2, 4, 4, 16)  # L x K/V x heads x p x head_dim
        layer.embedding.weight.add_(1.0)
        c = layer.prefix_table()
    assert c is not a and not torch.allclose(a, c)
    assert layer.prefix_table().requires_grad  # with gradients: computed afresh, in the graph


def test_gradient_checkpointing_is_refused_in_training():
    model = adapted("tiny-llama")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    with pytest.raises(adapterhub.AdapterhubError, match="gradient checkpointing"):
        model(ids_for(9))


def test_disabled_layer_gives_the_base_model():
    model = adapted("tiny-llama")
    ids = ids_for(10)
    prefix_layer(model).disabled = True
    with torch.no_grad():
        assert torch.equal(model(ids).logits, build_builtin("tiny-llama")(ids).logits)


def test_remove_hooks_gives_the_base_model():
    model = adapted("tiny-gpt2")
    prefix_layer(model).remove_hooks()
    ids = ids_for(11)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, build_builtin("tiny-gpt2")(ids).logits)


# --------------------------------------------------------------------------- plan, params, errors


def test_plan_count_and_attached_name():
    p = adapterhub.plan("tiny-llama", "layers -> prefix(tokens=10)")
    (entry,) = p.entries
    assert entry.module == "model.layers"
    # p d + d h + h + h (2 L kv_dim) + 2 L kv_dim with d = h = 64, L = 4, kv_dim = 2 * 16
    assert p.trainable == 10 * 64 + 64 * 64 + 64 + 64 * 256 + 256 == prefix_count(10, 4, 64, 32, True, 0)
    gpt2 = adapterhub.plan("tiny-gpt2", "layers -> prefix(tokens=10, projection=false)")
    assert gpt2.trainable == 10 * 2 * 4 * 64
    model = adapted("tiny-llama", "layers -> prefix(tokens=10)")
    assert isinstance(model.model.layers_prefix, PrefixLayer)
    assert "model.layers.0.self_attn.q_proj" in dict(model.named_modules())  # names unchanged


def test_bundle_stores_the_reparameterisation(tmp_path):
    from safetensors.torch import load_file

    adapterhub.save(adapted("tiny-llama"), tmp_path / "b")
    keys = set(load_file(str(tmp_path / "b" / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.model.layers_prefix.{k}" for k in
                    ("embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight",
                     "transform.2.bias")}


def test_not_mergeable_message():
    layer = prefix_layer(adapted("tiny-llama"))
    with pytest.raises(adapterhub.AdapterhubError, match="prefix tuning cannot be merged"):
        layer.merge()
    with pytest.raises(adapterhub.AdapterhubError, match="prefix tuning cannot be merged"):
        layer.delta_weight()


def test_encoder_models_are_refused():
    with pytest.raises(adapterhub.AdapterhubError, match="decoder"):
        adapterhub.apply(build_builtin("tiny-bert"), "layers -> prefix(tokens=4)")


@pytest.mark.parametrize("spec, param", [
    ("layers -> prefix(tokens=0)", "tokens"),
    ("layers -> prefix(projection=false, projection_hidden=8)", "projection_hidden"),
    ("layers -> prefix(projection_hidden=-1)", "projection_hidden"),
])
def test_bad_params(spec, param):
    with pytest.raises(adapterhub.AdapterhubError, match=param):
        adapterhub.plan("tiny-llama", spec)


def test_prefix_and_prompt_together():
    """Both hooks compose in either registration order: cache prefix + prepended prompt."""
    model = adapted("tiny-llama", "layers -> prefix(tokens=3)\nembed -> prompt(tokens=2)")
    layers = dict(adapterhub.adapter_layers(model))
    prefix, prompt = layers["model.layers_prefix"], layers["model.embed_tokens"]
    base = build_builtin("tiny-llama")
    ids = ids_for(12, length=6)
    t = table(prefix, base.config)
    cache = DynamicCache()
    for i in range(t.shape[1]):
        cache.update(t[:, i, 0].permute(1, 0, 2).unsqueeze(0).expand(2, -1, -1, -1),
                     t[:, i, 1].permute(1, 0, 2).unsqueeze(0).expand(2, -1, -1, -1), i)
    embeds = torch.cat([prompt.prompt_embeddings.expand(2, -1, -1), base.get_input_embeddings()(ids)], 1)
    with torch.no_grad():
        want = base(inputs_embeds=embeds, past_key_values=cache).logits[:, 2:]
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    generate_matches_full_recompute(model, ids, 4)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # from peft
@pytest.mark.parametrize("name, projection", [("tiny-gpt2", True), ("tiny-gpt2", False), ("tiny-llama", False)])
def test_same_outputs_as_peft_with_the_same_tensors(name, projection):
    """PEFT's PrefixEncoder has our layout (GPT-2; Llama without projection, where GQA shapes agree)."""
    peft = pytest.importorskip("peft")
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection)
    theirs = peft.get_peft_model(build_builtin(name), cfg).eval()
    ours = adapted(name, f"layers -> prefix(tokens=4, projection={str(projection).lower()})")
    mine = dict(prefix_layer(ours).named_parameters())
    with torch.no_grad():
        for key, value in theirs.prompt_encoder["default"].state_dict().items():
            mine[key].copy_(value)
        ids = ids_for(13)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        want = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-6)
