"""QLoRA in full: measured NF4+DQ memory, bf16 base compute, prepare_kbit_training."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import adapterhub
from adapterhub.kbit import prepare_kbit_training, quant_memory
from adapterhub.registry import AdapterhubError, QuantizedLinear, bind, get_registry

QLORA_MLP = "mlp.* -> lora(r=4) on nf4"
BF16_QLORA = ("attn.* -> lora(r=4) on nf4(compute_dtype=bfloat16)\n"
              "mlp.* -> lora(r=4) on nf4(compute_dtype=bfloat16)\n")


def nf4(module: nn.Module, **params) -> QuantizedLinear:
    q = get_registry().quantizers["nf4"]
    return q.quantize(module, bind(q.Params, params, owner="nf4"))


def nf4_bytes(n: int, double_quant: bool = True, blocksize: int = 64) -> int:
    """Storage of ``n`` NF4 weights from the format: two codes per byte, one scale per block
    (uint8 + one fp32 per 256 blocks + fp32 offset under double quant, else fp32), and the code
    tables (16 fp32 NF4 values; 256 fp32 dynamic-code values under double quant)."""
    blocks = math.ceil(n / blocksize)
    if double_quant:
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 + 16 * 4 + 256 * 4
    return math.ceil(n / 2) + 4 * blocks + 16 * 4


def randomize_lora_b(model: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if "lora_" in n}


# --------------------------------------------------------------------------- measured memory


@pytest.mark.parametrize("double_quant", [True, False])
def test_measured_nf4_bits_per_param_on_a_llama_sized_layer(double_quant):
    torch.manual_seed(0)
    layer = nn.Sequential(nf4(nn.Linear(1024, 1024, bias=False), double_quant=double_quant))
    mem = quant_memory(layer)
    row = mem["quantizers"]["nf4"]
    n = 1024 * 1024
    assert row == {"layers": 1, "params": n, "bytes": nf4_bytes(n, double_quant),
                   "bits_per_param": pytest.approx(8 * nf4_bytes(n, double_quant) / n, abs=1e-6)}
    formula = 4 + 8 / 64 + 32 / (64 * 256) if double_quant else 4.5
    assert formula == pytest.approx(4.127 if double_quant else 4.5, abs=1e-3)
    # the measured value is the formula plus the code tables (1,092 bytes with DQ, 64 without)
    assert 0 < row["bits_per_param"] - formula < 0.009
    assert mem["weight_bytes"] == row["bytes"] and mem["adapter_bytes"] == 0


def test_plan_formula_is_within_a_quarter_percent_of_measured_at_realistic_width():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    spec = "attn.* -> lora(r=8) on nf4\nmlp.* -> lora(r=8) on nf4\n"
    planned = adapterhub.plan(model, spec).bytes_after
    adapterhub.apply(model, spec)
    mem = quant_memory(model)
    assert mem["quantizers"]["nf4"]["layers"] == 14
    # the plan's formula leaves out each layer's code tables (1,092 bytes; 0.2% of a 1024 x 1024 layer)
    assert abs(mem["weight_bytes"] - planned) / mem["weight_bytes"] < 0.0025
    assert mem["quantizers"]["nf4"]["bits_per_param"] == pytest.approx(4.127, abs=0.008)
    lora = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    assert mem["adapter_bytes"] == lora and mem["total_bytes"] == mem["weight_bytes"] + lora


def test_apply_cli_prints_and_jsons_the_measured_memory(tmp_path):
    from click.testing import CliRunner

    from adapterhub.cli import build_cli

    spec = tmp_path / "q.surgery"
    spec.write_text(QLORA_MLP + "\n")
    run = CliRunner().invoke
    res = run(build_cli(), ["apply", str(spec), "-m", "tiny-llama", "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "measured:" in res.output and "nf4:" in res.output and "bits/param over 12 layers" in res.output
    res = run(build_cli(), ["apply", str(spec), "-m", "tiny-llama", "-o", str(tmp_path / "b"), "--json"])
    data = json.loads(res.output)
    assert data["measured"]["quantizers"]["nf4"]["layers"] == 12
    assert data["measured"]["weight_bytes"] > data["weight_bytes_after"]  # + code tables


# --------------------------------------------------------------------------- bf16 compute


def test_bf16_compute_runs_the_base_matmul_in_bf16_with_fp32_lora(tiny_llama, ids):
    model = adapterhub.apply(tiny_llama, BF16_QLORA)
    randomize_lora_b(model)
    # the base matmul is bf16 arithmetic: its output equals bf16 math on the dequantized weight, not fp32 math
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, 64)
    w = layer.base_layer.dequantize()
    got = layer.base_layer(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, (x.bfloat16() @ w.bfloat16().t()).float())
    assert not torch.equal(got, x @ w.t())
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = lora_grads(model)
    assert len(grads) == 2 * 28
    for g in grads.values():
        assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0


# --------------------------------------------------------------------------- prepare for k-bit training


def _count_calls(module: nn.Module) -> list[int]:
    counter = [0]
    module.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter


def _step(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return lora_grads(model)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("order", ["prepare_first", "apply_first"])
def test_gradient_checkpointing_gives_the_same_lora_gradients(use_reentrant, order, ids):
    plain = adapterhub.apply(adapterhub.build_builtin("tiny-llama"), QLORA_MLP)
    randomize_lora_b(plain)
    expected = _step(plain, ids)

    model = adapterhub.build_builtin("tiny-llama")
    if order == "prepare_first":
        prepare_kbit_training(model, use_reentrant=use_reentrant)
        adapterhub.apply(model, QLORA_MLP)
    else:
        adapterhub.apply(model, QLORA_MLP)
        prepare_kbit_training(model, use_reentrant=use_reentrant)
    randomize_lora_b(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in plain.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    mlp_calls = _count_calls(model.model.layers[1].mlp)
    emb_out = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: emb_out.append(out.requires_grad))
    got = _step(model, ids)
    assert mlp_calls[0] == 2  # forward + recomputation in backward: checkpointing is on
    assert emb_out and all(emb_out)
    assert got.keys() == expected.keys()
    for name, g in got.items():
        assert g is not None, name
        torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("order", ["prepare_first", "apply_first"])
def test_prepare_upcasts_a_bf16_model_and_keeps_the_quantized_base(order, ids):
    model = adapterhub.build_builtin("tiny-llama").to(torch.bfloat16)
    spec = "mlp.* -> lora(r=4) on nf4(compute_dtype=bfloat16)\nlm_head -> train\n"
    if order == "prepare_first":
        prepare_kbit_training(model)
        adapterhub.apply(model, spec)
    else:
        adapterhub.apply(model, spec)
        prepare_kbit_training(model)
    norms = [m for m in model.modules() if "Norm" in type(m).__name__]
    assert len(norms) == 2 * 4 + 1
    assert all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 12 and all(q.qweight.dtype == torch.uint8 and q.absmax.dtype == torch.uint8
                                        for q in quantized)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if "lora_" in n or n.startswith("lm_head.")}
    assert "lm_head.weight" in trainable and len(trainable) == 2 * 12 + 1
    randomize_lora_b(model)
    grads = _step(model, ids)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


def test_prepare_on_a_plain_torch_model():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 4)).to(torch.bfloat16)
    prepare_kbit_training(model, gradient_checkpointing=False, input_grads=True)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    out = model[0](torch.tensor([[1, 2, 3]]))
    assert out.requires_grad
    with pytest.raises(AdapterhubError, match="gradient_checkpointing=False"):
        prepare_kbit_training(model)
    with pytest.raises(AdapterhubError, match="no input embeddings"):
        prepare_kbit_training(nn.Linear(2, 2), gradient_checkpointing=False, input_grads=True)
