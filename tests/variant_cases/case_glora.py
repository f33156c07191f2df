"""GLoRA (Chavan et al. 2023): y = x (W0 + W0 ⊙ A + B)^T + b0 + b0 ⊙ D + E + W0 C.

The reference rebuilds every support from the layer's tensors (lora ``Xd @ Xu``, a vector broadcast
over rows, a scalar) and applies the formula with a dense ``W'``; without a base bias the bias is
``E + W0 C`` (official code), and no D exists.
"""

from __future__ import annotations

import torch

from . import VariantCase, base_bias, base_weight_out_in


def _matrix(p, rows: int) -> torch.Tensor:
    """A/B/C as a (broadcastable) matrix with ``rows`` rows from its tensors; zero when absent."""
    if "Xd" in p:
        return p["Xd"] @ p["Xu"]
    if "X" in p:
        return p["X"]
    return torch.zeros(rows, 1)


def _vector(p) -> torch.Tensor:
    return p["X"] if "X" in p else torch.zeros(1)


def reference(layer, x):
    w0, b0 = base_weight_out_in(layer), base_bias(layer)
    out_f, in_f = w0.shape
    w = w0 + w0 * _matrix(layer.glora_A, out_f) + _matrix(layer.glora_B, out_f)
    c = _matrix(layer.glora_C, in_f)  # in x 1
    bias = _vector(layer.glora_E) + (w0 @ c)[:, 0]
    if b0 is not None:
        bias = bias + b0 + b0 * _vector(layer.glora_D)
    return x @ w.t() + bias


def _names(config: dict[str, str], has_bias: bool) -> set[str]:
    names = set()
    for s, opt in config.items():
        if opt == "none" or (s == "d" and not has_bias):
            continue
        names |= {f"glora_{s.upper()}.Xd", f"glora_{s.upper()}.Xu"} if opt == "lora" else {f"glora_{s.upper()}.X"}
    return names


def _count(config: dict[str, str], r: int, in_f: int, out_f: int, has_bias: bool) -> int:
    size = {"lora": r * (out_f + in_f), "vector": out_f, "scalar": 1, "none": 0}
    n = size[config["a"]] + size[config["b"]]
    n += {"lora": r * (in_f + 1), "vector": in_f, "none": 0}[config["c"]]
    n += size[config["e"]] + (size[config["d"]] if has_bias else 0)
    return n


def case(case_id: str, config: dict[str, str], r: int, specs: dict[str, str], **kw) -> VariantCase:
    def trainable(layer):
        return _names(config, base_bias(layer) is not None)

    def count(layer):
        return _count(config, r, layer.in_features, layer.out_features, base_bias(layer) is not None)

    return VariantCase(variant="glora", id=case_id, specs=specs, reference=reference, trainable=trainable,
                       count=count, **kw)


ALL_LORA = {"a": "lora", "b": "lora", "c": "lora", "d": "vector", "e": "vector"}  # the defaults
MIX = {"a": "vector", "b": "scalar", "c": "vector", "d": "scalar", "e": "scalar"}
MIX2 = {"a": "scalar", "b": "vector", "c": "none", "d": "vector", "e": "none"}
ONLY_E = {"a": "lora", "b": "none", "c": "none", "d": "none", "e": "scalar"}

CASES = [
    case("glora", ALL_LORA, 4,
         {"llama": "attn.* -> glora", "gpt2": "attn.* -> glora", "bert": "attn.* -> glora"},
         unsupported={"llama": "model.norm -> glora", "gpt2": "ln_f -> glora",
                      "bert": "embeddings.word_embeddings -> glora"}),
    case("glora-mix", MIX, 4,
         {f: "mlp.* -> glora(a=vector, b=scalar, c=vector, d=scalar, e=scalar)" for f in ("llama", "gpt2", "bert")}),
    case("glora-mix2", MIX2, 2,
         {"llama": "attn.* -> glora(a=scalar, b=vector, c=none, d=vector, e=none, r=2)",
          "gpt2": "attn.c_attn -> glora(a=scalar, b=vector, c=none, d=vector, e=none, r=2)"}),
    case("glora-lora-a-e", ONLY_E, 3,
         {"llama": "mlp.* -> glora(a=lora, b=none, c=none, d=none, e=scalar, r=3)",
          "bert": "attn.* -> glora(a=lora, b=none, c=none, d=none, e=scalar, r=3)"}),
]
