"""Prompt tuning beyond the shared matrix: init, labels/loss, masks, positions, inputs_embeds,
generate(), caches, training, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adapterhub
from adapterhub.models import build_builtin
from adapterhub.plugins.prompt import PromptLayer

from .test_prefix import generate_matches_full_recompute, ids_for
from .variant_cases.case_prompt import reference_model

FAMS = ["tiny-llama", "tiny-gpt2"]


def adapted(name: str, spec: str = "embed -> prompt(tokens=4)", seed: int = 0):
    model = adapterhub.apply(build_builtin(name), spec, seed=seed)
    model.eval()
    return model


def prompt_layer(model) -> PromptLayer:
    (layer,) = [lyr for _, lyr in adapterhub.adapter_layers(model)]
    return layer


# --------------------------------------------------------------------------- init


def test_random_init_is_uniform_half():
    layer = prompt_layer(adapted("tiny-llama", "embed -> prompt(tokens=50)"))
    p = layer.prompt_embeddings
    assert p.shape == (50, 64) and p.min() >= -0.5 and p.max() <= 0.5 and p.std() > 0.2


def test_vocab_init_takes_embedding_rows_and_seed_is_reproducible():
    a = prompt_layer(adapted("tiny-gpt2", 'embed -> prompt(tokens=6, init="vocab", seed=5)'))
    b = prompt_layer(adapted("tiny-gpt2", 'embed -> prompt(tokens=6, init="vocab", seed=5)', seed=9))
    c = prompt_layer(adapted("tiny-gpt2", 'embed -> prompt(tokens=6, init="vocab", seed=6)'))
    vocab = a.base_layer.weight
    for row in a.prompt_embeddings:
        assert (vocab == row).all(dim=1).any()
    assert torch.equal(a.prompt_embeddings, b.prompt_embeddings)  # `seed` wins over the apply seed
    assert not torch.equal(a.prompt_embeddings, c.prompt_embeddings)


def test_apply_seed_drives_random_init_without_seed():
    a = prompt_layer(adapted("tiny-llama", seed=1)).prompt_embeddings
    b = prompt_layer(adapted("tiny-llama", seed=1)).prompt_embeddings
    c = prompt_layer(adapted("tiny-llama", seed=2)).prompt_embeddings
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_text_init_repeats_and_truncates_the_bytes():
    layer = prompt_layer(adapted("tiny-llama", 'embed -> prompt(tokens=7, init="text", text="abc")'))
    ids = list(b"abcabca")
    assert torch.equal(layer.prompt_embeddings, layer.base_layer.weight[ids])
    short = prompt_layer(adapted("tiny-gpt2", 'embed -> prompt(tokens=2, init="text", text="xyz")'))
    assert torch.equal(short.prompt_embeddings, short.base_layer.weight[list(b"xy")])


def test_text_init_uses_the_models_tokenizer():
    model = build_builtin("tiny-llama")
    model.config._name_or_path = "somewhere/else"

    class Tok:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [len(w) for w in text.split()]}

    model.tokenizer = Tok()
    adapterhub.apply(model, 'embed -> prompt(tokens=3, init="text", text="a bb cccc")')
    layer = prompt_layer(model)
    assert torch.equal(layer.prompt_embeddings, layer.base_layer.weight[[1, 2, 4]])


@pytest.mark.parametrize("spec, param", [
    ('embed -> prompt(init="text")', "text"),
    ('embed -> prompt(text="hi")', "text"),
    ("embed -> prompt(tokens=0)", "tokens"),
    ('embed -> prompt(init="vocabulary")', "init"),
])
def test_bad_params(spec, param):
    with pytest.raises(adapterhub.AdapterhubError, match=param):
        adapterhub.plan("tiny-llama", spec)


# --------------------------------------------------------------------------- forward mechanics


def test_layer_prepends_the_prompt():
    layer = prompt_layer(adapted("tiny-gpt2"))
    ids = ids_for(1, length=6)
    with torch.no_grad():
        out = layer(ids)
    assert out.shape == (2, 4 + 6, 64)
    assert torch.equal(out[:, :4], layer.prompt_embeddings.expand(2, -1, -1))
    assert torch.equal(out[:, 4:], layer.base_layer(ids))


@pytest.mark.parametrize("name", FAMS)
def test_loss_covers_the_real_labels_only(name):
    model = adapted(name)
    layer = prompt_layer(model)
    ids = ids_for(2)
    labels = ids.clone()
    labels[:, :2] = -100
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        embeds = torch.cat([layer.prompt_embeddings.expand(2, -1, -1), layer.base_layer(ids)], 1)
        full = build_builtin(name)(inputs_embeds=embeds).logits  # p + n positions
    assert out.logits.shape == (2, ids.shape[1], 260)
    assert torch.allclose(out.logits, full[:, 4:], atol=1e-5)
    padded = torch.cat([torch.full((2, 4), -100), labels], 1)
    want = F.cross_entropy(full[:, :-1].reshape(-1, 260), padded[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, want, atol=1e-5)


@pytest.mark.parametrize("name", FAMS)
def test_padding_mask_matches_reference(name):
    model = adapted(name)
    ids = ids_for(3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    want = reference_model(model, build_builtin(name), ids, attention_mask=mask)
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5)


@pytest.mark.parametrize("name", FAMS)
def test_positions_inputs_embeds_and_tuples_agree(name):
    model = adapted(name)
    layer = prompt_layer(model)
    ids = ids_for(4)
    with torch.no_grad():
        plain = model(ids).logits
        given = model(ids, position_ids=torch.arange(ids.shape[1]).unsqueeze(0)).logits
        embeds = model(inputs_embeds=layer.base_layer(ids)).logits
        tup = model(ids, return_dict=False)
        tup_loss = model(input_ids=ids, labels=ids, return_dict=False)
    assert torch.allclose(plain, given, atol=1e-6)
    assert torch.allclose(plain, embeds, atol=1e-6)
    assert torch.equal(tup[0], plain) and torch.equal(tup_loss[1], plain)


@pytest.mark.parametrize("name", FAMS)
def test_generate_equals_full_recompute(name):
    model = adapted(name)
    ids = ids_for(5, length=5)
    first = generate_matches_full_recompute(model, ids, 6)
    with torch.no_grad():
        base = build_builtin(name)(ids).logits[:, -1]
    assert not torch.allclose(first, base, atol=1e-4)


def test_generate_with_left_padding_matches_reference():
    model = adapted("tiny-llama")
    ids = ids_for(6, length=6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    layer = prompt_layer(model)
    base = build_builtin("tiny-llama")
    embeds = torch.cat([layer.prompt_embeddings.expand(2, -1, -1), layer.base_layer(ids)], 1)
    full_mask = torch.cat([torch.ones(2, 4, dtype=mask.dtype), mask], 1)
    pos = torch.cat([torch.arange(4).expand(2, 4), (mask.cumsum(-1) - 1).clamp(min=0) + 4], 1)
    with torch.no_grad():
        want = base(inputs_embeds=embeds, attention_mask=full_mask, position_ids=pos).logits[:, -1]
    assert torch.allclose(out.logits[0], want, atol=1e-5)


@pytest.mark.parametrize("spec", ["embed -> prompt(tokens=3)", "layers -> prefix(tokens=3)"])
def test_generate_from_inputs_embeds(spec):
    """inputs_embeds are the caller's tokens' embeddings: the same continuation as from their ids."""
    model = adapted("tiny-gpt2", spec)
    ids = ids_for(12, length=5)
    kw = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    from_ids = model.generate(ids, **kw)
    with torch.no_grad():
        embeds = model.transformer.wte.base_layer(ids) if "prompt" in spec else model.transformer.wte(ids)
    from_embeds = model.generate(inputs_embeds=embeds, **kw)
    assert torch.equal(from_ids.sequences[:, 5:], from_embeds.sequences)
    for a, b in zip(from_ids.logits, from_embeds.logits):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", FAMS)
def test_continuing_a_returned_cache(name):
    model = adapted(name)
    ids = ids_for(7, length=10)
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :6], use_cache=True)
        assert first.past_key_values.get_seq_length() == 4 + 6
        rest = model(ids[:, 6:], past_key_values=first.past_key_values).logits
    assert torch.allclose(rest, full[:, 6:], atol=1e-5)


# --------------------------------------------------------------------------- training and state


def test_training_updates_only_the_prompt():
    model = adapted("tiny-gpt2")  # GPT-2 ties lm_head to wte: the tie must stay frozen
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = ids_for(8)
    model(input_ids=ids, labels=ids).loss.backward()
    layer = prompt_layer(model)
    assert layer.prompt_embeddings.grad is not None and layer.prompt_embeddings.grad.abs().sum() > 0
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"transformer.wte.prompt_embeddings"}


def test_disabled_layer_gives_the_base_model():
    model = adapted("tiny-llama")
    prompt_layer(model).disabled = True
    ids = ids_for(9)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, build_builtin("tiny-llama")(ids).logits)


def test_plan_count():
    assert adapterhub.plan("tiny-llama", "embed -> prompt(tokens=8)").trainable == 8 * 64


def test_not_mergeable_message():
    layer = prompt_layer(adapted("tiny-llama"))
    with pytest.raises(adapterhub.AdapterhubError, match="prompt tuning cannot be merged"):
        layer.merge()


def test_only_the_token_embedding():
    with pytest.raises(adapterhub.AdapterhubError, match="token embedding"):
        adapterhub.apply(build_builtin("tiny-gpt2"), "wpe -> prompt(tokens=4)")


def test_encoder_models_are_refused():
    with pytest.raises(adapterhub.AdapterhubError, match="decoder"):
        adapterhub.apply(build_builtin("tiny-bert"), "embed -> prompt(tokens=4)")


def test_token_type_ids_are_refused():
    model = adapted("tiny-gpt2")
    ids = ids_for(10)
    with pytest.raises(adapterhub.AdapterhubError, match="token_type_ids"):
        model(ids, token_type_ids=torch.zeros_like(ids))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # from peft
@pytest.mark.parametrize("name", FAMS)
def test_same_outputs_as_peft_with_the_same_prompt(name):
    """PEFT keeps the p virtual positions in a causal LM's logits; we drop them."""
    peft = pytest.importorskip("peft")
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    theirs = peft.get_peft_model(build_builtin(name), cfg).eval()
    ours = adapted(name)
    with torch.no_grad():
        prompt_layer(ours).prompt_embeddings.copy_(theirs.prompt_encoder["default"].embedding.weight)
        ids = ids_for(11)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        want = theirs(input_ids=ids, attention_mask=mask, labels=ids)
        got = ours(input_ids=ids, attention_mask=mask, labels=ids)
    assert torch.allclose(got.logits[mask.bool()], want.logits[:, 4:][mask.bool()], atol=1e-6)
    assert torch.allclose(got.loss, want.loss, atol=1e-6)
