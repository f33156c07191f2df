"""LongLoRA: S²-Attn (math, causality, errors) and the ``longlora`` variant on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import adapterhub
from adapterhub.dsl import SurgeryError
from adapterhub.models import build_builtin
from adapterhub.plugins import _s2attn
from adapterhub.plugins._s2attn import s2_attention
from adapterhub.plugins.longlora import LongLoraLayer, LongLoraParams, interpolation_factor
from adapterhub.registry import AdapterhubError, ModuleTypeError, ParamError

SPEC = "attn.* -> lora(r=8, alpha=16)\nlayers -> longlora(context=2048)"


def qkv(b: int = 2, h: int = 4, n: int = 16, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))


def dense_reference(q, k, v, group: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense attention with the paper's pattern written as a mask: head h < H/2 sees its group
    t // G, the shifted heads group (t + G/2) // G; always causal."""
    b, h, n, d = q.shape
    t = torch.arange(n)
    out = torch.empty_like(q)
    for head in range(h):
        gid = t // group if (head < h // 2 or group == n) else (t + group // 2) // group
        allowed = (gid[:, None] == gid[None, :]) & (t[None, :] <= t[:, None])
        allowed = allowed.expand(b, n, n)
        if mask is not None:
            allowed = allowed & mask[:, 0]
        s = q[:, head] @ k[:, head].transpose(-1, -2) / math.sqrt(d)
        s = s.masked_fill(~allowed, float("-inf"))
        out[:, head] = torch.softmax(s, -1) @ v[:, head]
    return out


# ------------------------------------------------------------------------------ S²-Attn


def test_equals_full_causal_attention_when_group_is_the_sequence():
    q, k, v = qkv()
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(s2_attention(q, k, v, 16), full)


@pytest.mark.parametrize("heads,n,group", [(4, 16, 4), (4, 16, 8), (3, 12, 6), (2, 8, 2)])
def test_matches_dense_reference(heads: int, n: int, group: int):
    q, k, v = qkv(h=heads, n=n)
    torch.testing.assert_close(s2_attention(q, k, v, group), dense_reference(q, k, v, group))


def test_default_group_is_a_quarter():
    q, k, v = qkv(n=16)
    torch.testing.assert_close(s2_attention(q, k, v), dense_reference(q, k, v, 4))


def test_causal_for_every_head():
    """Changing tokens t.. never changes outputs before t, in any head (no roll wrap-around)."""
    q, k, v = qkv(n=16)
    base = s2_attention(q, k, v, 4)
    for t in range(1, 16):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t:] = torch.randn_like(x[:, :, t:])
        out = s2_attention(q2, k2, v2, 4)
        torch.testing.assert_close(out[:, :, :t], base[:, :, :t], rtol=0, atol=0)


def test_shifted_half_mixes_groups():
    """The shifted heads let token G (first of group 2) see tokens of the previous group."""
    q, k, v = qkv(n=16)
    base = s2_attention(q, k, v, 4)
    v2 = v.clone()
    v2[:, :, 3] += 1.0
    out = s2_attention(q, k, v2, 4)
    assert torch.equal(out[:, :2, 4], base[:, :2, 4])  # unshifted heads: group [4, 8) only
    assert not torch.allclose(out[:, 2:, 4], base[:, 2:, 4])  # shifted heads: group [2, 6)


def test_padding_mask_is_honoured():
    q, k, v = qkv(n=16)
    t = torch.arange(16)
    mask = (t[None, :] <= t[:, None]).expand(2, 1, 16, 16).clone()
    mask[0, :, :, :3] = False  # batch 0: three left-pad tokens
    mask[0, :, :3, :3] = torch.eye(3, dtype=torch.bool)  # pad rows see themselves (no NaN)
    torch.testing.assert_close(s2_attention(q, k, v, 4, mask=mask), dense_reference(q, k, v, 4, mask))


def test_bad_lengths_are_clear_errors():
    q, k, v = qkv(n=12)
    with pytest.raises(AdapterhubError, match="divisible by the group size 5"):
        s2_attention(q, k, v, 5)
    with pytest.raises(AdapterhubError, match="even"):
        s2_attention(*qkv(n=9), 3)


def test_gradients_flow():
    q, k, v = (x.requires_grad_() for x in qkv())
    s2_attention(q, k, v, 4).sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (q, k, v))


# ------------------------------------------------------------------------------ the variant


def adapted(spec: str = SPEC, seed: int = 0):
    return adapterhub.apply(build_builtin("tiny-llama", seed=seed), spec)


def longlora_layer(model) -> LongLoraLayer:
    return next(m for m in model.modules() if isinstance(m, LongLoraLayer))


def ids(n: int = 32, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 260, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_rope_interpolation_factor_applied():
    base = build_builtin("tiny-llama")
    model = adapted()
    assert interpolation_factor(2048, 512) == 4 and interpolation_factor(513, 512) == 2
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 4.0
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, base.model.rotary_emb.inv_freq / 4)
    # the model's cos/sin at position m are the base's at m / 4
    x = torch.zeros(1, 8, 64)
    pos = torch.arange(8)[None]
    for a, b in zip(model.model.rotary_emb(x, pos), base.model.rotary_emb(x, pos.float() / 4)):
        torch.testing.assert_close(a, b)
    assert longlora_layer(model).factor == 4


def test_no_interpolation_within_original_context():
    base = build_builtin("tiny-llama")
    model = adapted("layers -> longlora(context=512)")
    assert model.config.rope_parameters["rope_type"] == "default"
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, base.model.rotary_emb.inv_freq)


def test_trainable_embeddings_norms_and_lora():
    model = adapted()
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" in train and "model.norm.weight" in train
    assert {f"model.layers.{i}.{w}.weight" for i in range(4)
            for w in ("input_layernorm", "post_attention_layernorm")} <= train
    assert not any(n.endswith(("q_proj.base_layer.weight", "mlp.up_proj.weight", "lm_head.weight")) for n in train)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == lora + 260 * 64 + 9 * 64
    assert longlora_layer(model).state_dict() == {}  # holds, does not own, the base tensors


def test_trains_with_s2_attention(monkeypatch):
    calls = []
    real = _s2attn.s2_attention

    def counting(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(_s2attn, "s2_attention", counting)
    model = adapted()
    model.train()
    x = ids(32)
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert len(calls) == 4 and calls[0] == (2, 4, 32, 16)  # every layer, GQA keys repeated to 4 heads
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.model.norm.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
    # a padded batch trains too
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    loss = model(input_ids=x, attention_mask=mask, labels=x).loss
    assert torch.isfinite(loss)


def test_training_output_differs_from_full_attention():
    model = adapted()
    model.train()
    x = ids(32)
    s2 = model(input_ids=x).logits
    model.config._attn_implementation = "sdpa"
    full = model(input_ids=x).logits
    assert not torch.allclose(s2, full)
    torch.testing.assert_close(s2[:, :4], full[:, :4])  # the first half group: causal for every head


def test_inference_uses_standard_attention(monkeypatch):
    model = adapted()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = ids(32)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    model.eval()
    monkeypatch.setattr(_s2attn, "s2_attention", lambda *a, **k: pytest.fail("S²-Attn used in eval"))
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    with torch.no_grad():
        ours = model(input_ids=x, attention_mask=mask).logits
        model.config._attn_implementation = "sdpa"
        sdpa = model(input_ids=x, attention_mask=mask).logits
    torch.testing.assert_close(ours, sdpa, rtol=0, atol=0)


def test_generate_in_eval():
    model = adapted().eval()
    out = model.generate(ids(8, batch=1), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_save_load_keeps_embeddings_and_norms(tmp_path):
    model = adapted()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    adapterhub.save(model, tmp_path / "b")
    fresh = adapterhub.load(build_builtin("tiny-llama"), tmp_path / "b")
    x = ids(16)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits)
    torch.testing.assert_close(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert fresh.config.rope_parameters["factor"] == 4.0


def test_merge_and_unload_keeps_the_trained_model():
    model = adapted().eval()
    x = ids(16)
    with torch.no_grad():
        before = model(input_ids=x).logits
        adapterhub.merge_and_unload(model)
        after = model(input_ids=x).logits
    assert not any(isinstance(m, LongLoraLayer) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_errors():
    with pytest.raises(ModuleTypeError, match="longlora cannot wrap"):
        adapterhub.apply(build_builtin("tiny-gpt2"), "layers -> longlora(context=1024)")
    with pytest.raises(SurgeryError, match="longlora cannot wrap"):
        adapted("attn.* -> longlora()")
    with pytest.raises(SurgeryError, match="group_ratio"):
        adapted("layers -> longlora(group_ratio=1.5)")
    with pytest.raises(ParamError, match="group_ratio"):
        LongLoraParams(group_ratio=0.0)
    model = adapted("layers -> longlora(group_ratio=0.3)").train()
    with pytest.raises(AdapterhubError, match="divisible"):
        model(input_ids=ids(30))


def test_plan_count_formula():
    """``vocab * hidden + (2 L + 1) * hidden``; the embedding term needs ``vocab_size`` in the plan's
    ModuleInfo.extra (without it plan counts the norms only)."""
    from adapterhub.plugins.longlora import LongLora
    from adapterhub.registry import ModuleInfo

    extra = {"num_blocks": 4, "hidden_size": 64, "vocab_size": 260}
    info = ModuleInfo("model.layers", "ModuleList", "blocks", None, None, 0, 0, None, False, extra=extra)
    model = adapted("layers -> longlora(context=2048)")
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert LongLora().trainable_params(LongLoraParams(), info) == total == 260 * 64 + 9 * 64
    assert LongLora().trainable_params(LongLoraParams(trainable=False), info) == 0


def test_plan_counts_the_trainable_embeddings_and_norms():
    import adapterhub
    from adapterhub.models import build_builtin

    spec = "attn.* -> lora(r=8, alpha=16)\nlayers -> longlora(context=2048)"
    model = adapterhub.apply(build_builtin("tiny-llama"), spec)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapterhub.plan("tiny-llama", spec).trainable == trainable
