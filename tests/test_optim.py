"""make_optimizer: torch AdamW, bitsandbytes 8-bit AdamW on CPU, paged names off CUDA, bad names."""

from __future__ import annotations

import pytest
import torch

import adapterhub
from adapterhub.optim import make_optimizer
from adapterhub.registry import ParamError


def lora_model():
    model = adapterhub.apply(adapterhub.build_builtin("tiny-llama"), "mlp.* -> lora(r=8)")
    model.train()
    return model


def train(model, opt, ids, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_adamw_is_torchs():
    model = lora_model()
    opt = make_optimizer(model, "adamw", lr=1e-3, weight_decay=0.0)
    assert type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == 2 * 12  # only what requires grad


def test_adamw_8bit_trains_a_lora_with_uint8_state(ids):
    model = lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    # bitsandbytes keeps tensors under min_8bit_size (4096 elements) in fp32; the tiny LoRA's are 512-1024
    opt = make_optimizer(params, "adamw_8bit", lr=5e-3, min_8bit_size=256)
    assert type(opt).__name__ == "AdamW8bit"
    losses = train(model, opt, ids, 12)
    assert losses[-1] < losses[0] - 0.1
    for p in params:
        state = opt.state[p]
        assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
        assert state["state1"].shape == p.shape
        assert state["absmax1"].dtype == torch.float32


def test_adamw_8bit_keeps_small_tensors_in_fp32_by_default(ids):
    model = lora_model()
    opt = make_optimizer(model, "adamw_8bit")
    train(model, opt, ids, 1)
    assert all(s["state1"].dtype == torch.float32 for s in opt.state.values())


@pytest.mark.parametrize(("name", "unpaged", "state_dtype"),
                         [("paged_adamw_8bit", "AdamW8bit", torch.uint8),
                          ("paged_adamw_32bit", "AdamW32bit", torch.float32)])
def test_paged_names_need_cuda_and_fall_back_clearly_on_cpu(name, unpaged, state_dtype, ids):
    model = lora_model()
    with pytest.warns(UserWarning, match="paged optimizers need a CUDA device") as record:
        opt = make_optimizer(model, name, lr=5e-3, min_8bit_size=256)
    assert unpaged in str(record[0].message) and "cpu" in str(record[0].message)
    assert type(opt).__name__ == unpaged and not opt.is_paged
    losses = train(model, opt, ids, 6)
    assert losses[-1] < losses[0]
    assert all(s["state1"].dtype == state_dtype for s in opt.state.values())


def test_unknown_name_and_no_params():
    model = lora_model()
    with pytest.raises(ParamError, match="did you mean 'adamw_8bit'") as err:
        make_optimizer(model, "adamw8bit")
    assert err.value.param == "name" and "paged_adamw_32bit" in str(err.value)
    with pytest.raises(ParamError, match="unknown optimizer 'sgd'"):
        make_optimizer(model, "sgd")
    frozen = adapterhub.build_builtin("tiny-llama").requires_grad_(False)
    with pytest.raises(ParamError, match="no parameters"):
        make_optimizer(frozen, "adamw")
