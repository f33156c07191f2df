"""Training under torchrun (2 processes, gloo on CPU) equals one process with the doubled batch.

Each torchrun test starts real processes (``python -m torch.distributed.run --nproc_per_node 2``) and
compares what they saved with an in-process one-process run of the same data with ``--batch-size 2B``.
Tolerance: fp32, rtol 1e-4 / atol 1e-5 on the adapter tensors (measured max abs difference: ~1e-7 --
only the order of the gradient sums differs), rel 1e-5 on logged losses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from adapterhub.bundle import adapter_state, read_manifest
from adapterhub.train_data import IGNORE, build_dataset, byte_tokenizer
from adapterhub.train_dist import DistContext, is_main_process, torchrun_env
from adapterhub.training import train

LORA = "attn.* -> lora(r=4, alpha=8)\n"
TIED = "attn.* -> tied_lora(r=4, alpha=8)\n"
TEXT = ("the quick brown fox jumps over the lazy dog. " * 30 + "pack my box with five dozen liquor jugs. " * 30)
RTOL, ATOL = 1e-4, 1e-5
B = 2  # per process; the one-process reference runs with 2 * B


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, *args: str) -> str:
    """Run ``args`` (after ``python``) in 2 processes; returns stdout (the test fails with the output if rc != 0)."""
    env = dict(os.environ, ADAPTERHUB_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *args]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}"
    return p.stdout


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def _assert_close_states(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")
    # the runs really trained: the adapters moved away from their init (B = 0 for LoRA)
    assert any(float(t.abs().max()) > 1e-3 for k, t in want.items() if "lora_B" in k)


# --------------------------------------------------------------------------- no processes needed


def test_shard_weights_give_the_global_token_mean():
    """Σ_k w_k · mean_k / W over the ranks equals the token mean of the whole batch (unequal counts too)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (6, 9), generator=g)
    labels = ids.clone()
    labels[torch.rand(6, 9, generator=g) < 0.4] = IGNORE
    labels[2:4] = IGNORE  # rank 1 of 3 has no label at all
    per_token = torch.rand(6, 8, generator=g, dtype=torch.float64)  # a stand-in loss of token t -> label t+1
    valid = labels[:, 1:] != IGNORE
    global_mean = float(per_token[valid].mean())
    combined = 0.0
    for k in range(3):
        ctx = DistContext(rank=k, world=3)
        ids_k, labels_k, w = ctx.shard(ids, labels)
        assert torch.equal(ids_k, ids[2 * k:2 * k + 2])
        if k == 1:
            assert w == 0.0 and (labels_k != IGNORE).all()  # a finite dummy loss that counts for nothing
            continue
        assert torch.equal(labels_k, labels[2 * k:2 * k + 2])
        v = labels_k[:, 1:] != IGNORE
        combined += w * float(per_token[2 * k:2 * k + 2][v].mean()) / 3
    assert combined == pytest.approx(global_mean, rel=1e-12)
    one = DistContext()
    assert one.shard(ids, labels)[2] == 1.0 and one.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]


def test_seed_step_differs_per_rank_and_repeats_per_step():
    """Dropout masks: each rank its own stream, the same one again for the same (seed, step); one process: untouched."""
    def draw(rank: int, step: int) -> torch.Tensor:
        DistContext(rank=rank, world=2).seed_step(7, step)
        return torch.rand(8)

    assert torch.equal(draw(1, 3), draw(1, 3))
    assert not torch.equal(draw(0, 3), draw(1, 3)) and not torch.equal(draw(1, 3), draw(1, 4))
    torch.manual_seed(5)
    expected = torch.rand(8)
    torch.manual_seed(5)
    DistContext().seed_step(7, 3)
    assert torch.equal(torch.rand(8), expected)


def test_torchrun_environment_detection(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert torchrun_env() is None and is_main_process()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_env() == (1, 2, 1) and not is_main_process()
    monkeypatch.setenv("RANK", "2")
    from adapterhub.registry import AdapterhubError

    with pytest.raises(AdapterhubError, match="inconsistent torchrun environment"):
        torchrun_env()


# --------------------------------------------------------------------------- real processes


def test_cli_under_torchrun_equals_one_process_with_double_batch(tmp_path, corpus):
    opts = ["--seq-len", "16", "--lr", "3e-3", "--warmup-steps", "1", "--steps", "4", "--eval-split", "0.1",
            "--eval-every", "2", "--save-every", "2"]
    spec = tmp_path / "lora.surgery"
    spec.write_text(LORA)
    stdout = _torchrun(tmp_path, "-m", "adapterhub", "train", str(spec), "--model", "tiny-llama", "--data",
                       str(corpus), "--out", "ddp", "--name", "demo", "--batch-size", str(B), *opts)
    assert stdout.count("trained 4 steps") == 1, stdout  # printed by rank 0 only
    assert stdout.count("stored demo@v1") == 1, stdout
    from adapterhub.store import Store

    assert [v.ref for v in Store(tmp_path / "home").versions("demo")] == ["demo@v1"]  # stored once
    one = train("tiny-llama", LORA, corpus, out=tmp_path / "one", batch_size=2 * B, seq_len=16, lr=3e-3,
                warmup_steps=1, steps=4, eval_split=0.1, eval_every=2, save_every=2)
    got = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    _assert_close_states(got, want)
    m_got, m_want = read_manifest(tmp_path / "ddp")["metrics"], read_manifest(tmp_path / "one")["metrics"]
    assert m_got["tokens"] == m_want["tokens"] == 4 * 2 * B * 16  # tokens of both processes
    assert m_got["train_loss"] == pytest.approx(m_want["train_loss"], rel=1e-5)
    assert m_got["eval_loss"] == pytest.approx(m_want["eval_loss"], rel=1e-5)
    state = json.loads((tmp_path / "ddp" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and state["losses"] == pytest.approx(one.losses, rel=1e-5)
    assert [s for s, _ in state["eval_losses"]] == [s for s, _ in one.eval_losses] == [2, 4]
    assert [v for _, v in state["eval_losses"]] == pytest.approx([v for _, v in one.eval_losses], rel=1e-5)


SCRIPT = """
import json, os, sys
from safetensors.torch import save_file
from adapterhub.bundle import adapter_state
from adapterhub.surgery import adapter_layers
from adapterhub.training import train

corpus, pairs, tied, lora = sys.argv[1:5]
rank = os.environ["RANK"]
opts = dict(seq_len=16, batch_size=2, grad_accum=2, lr=3e-3, schedule="constant")
train("tiny-llama", tied, corpus, out="tied", steps=2, save_every=1, **opts)
r = train("tiny-llama", tied, corpus, out="tied", steps=4, save_every=1, resume=True, **opts)
ties = {name: [id(layer.tied_lora_A), id(layer.tied_lora_B)] for name, layer in adapter_layers(r.model)}
m = train("tiny-llama", lora, pairs, steps=3, seq_len=16, batch_size=2, lr=3e-3)
state = {"tied/" + k: v.detach().clone() for k, v in adapter_state(r.model).items()}
state.update({"masked/" + k: v.detach().clone() for k, v in adapter_state(m.model).items()})
save_file(state, f"rank{rank}.safetensors")
with open(f"rank{rank}.json", "w") as f:
    json.dump({"ties": ties, "tied_losses": r.losses, "masked_losses": m.losses}, f)
"""


def _tie_groups(ties: dict[str, list[int]]) -> list[list[str]]:
    """Layer names grouped by the identity of their tied (A, B) tensors."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, key in ties.items():
        groups.setdefault(tuple(key), []).append(name)
    return sorted(sorted(g) for g in groups.values())


def _pairs(tmp_path):
    """Prompt/response data: the prompt tokens carry no label, so the two halves of a batch count differently."""
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Q" * (3 + 7 * (i % 4)) + ": ", "response": f"answer {i} is {'yes' if i % 3 else 'no'}.\n"}
            for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_api_under_torchrun_tied_lora_accum_resume_and_masking(tmp_path, corpus):
    from adapterhub.bundle import load
    from adapterhub.models import build_builtin
    from adapterhub.surgery import adapter_layers

    pairs = _pairs(tmp_path)
    (tmp_path / "ddp_api.py").write_text(textwrap.dedent(SCRIPT))
    _torchrun(tmp_path, "ddp_api.py", str(corpus), str(pairs), TIED, LORA)
    ranks = [load_file(str(tmp_path / f"rank{k}.safetensors")) for k in (0, 1)]
    info = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # the ranks agree bit for bit

    # Tied-LoRA with grad accumulation 2, trained 2 steps, then resumed to 4 (all ranks load the checkpoint)
    one = train("tiny-llama", TIED, corpus, steps=4, seq_len=16, batch_size=2 * B, grad_accum=2, lr=3e-3,
                schedule="constant")
    want = {"tied/" + k: v.detach() for k, v in adapter_state(one.model).items()}
    _assert_close_states({k: v for k, v in ranks[0].items() if k.startswith("tied/")}, want)
    assert info[0]["tied_losses"] == pytest.approx(one.losses, rel=1e-5)
    groups = _tie_groups({n: [id(layer.tied_lora_A), id(layer.tied_lora_B)] for n, layer in adapter_layers(one.model)})
    assert any(len(g) > 1 for g in groups)
    for k in (0, 1):  # after DDP training, each process's layers still share one A and one B per group
        assert _tie_groups(info[k]["ties"]) == groups
    saved = load(build_builtin("tiny-llama"), tmp_path / "tied")  # the bundle rank 0 wrote, onto a fresh model
    layers = dict(adapter_layers(saved))
    assert _tie_groups({n: [id(ly.tied_lora_A), id(ly.tied_lora_B)] for n, ly in layers.items()}) == groups
    for name, layer in adapter_layers(one.model):
        for attr in ("tied_lora_A", "tied_lora_B", "tied_lora_u", "tied_lora_v"):
            torch.testing.assert_close(getattr(layers[name], attr).detach(), getattr(layer, attr).detach(),
                                       rtol=RTOL, atol=ATOL)

    # prompt masking: the halves hold different numbers of label tokens, the result is still the 1-process one
    ds = build_dataset(pairs, byte_tokenizer(), seq_len=16, batch_size=2 * B, eval_split=0, seed=0)
    counts = [[int((ds.batch(i)[1][h:h + B, 1:] != IGNORE).sum()) for h in (0, B)] for i in range(3)]
    assert any(a != b for a, b in counts), counts
    masked = train("tiny-llama", LORA, pairs, steps=3, seq_len=16, batch_size=2 * B, lr=3e-3)
    want = {"masked/" + k: v.detach() for k, v in adapter_state(masked.model).items()}
    _assert_close_states({k: v for k, v in ranks[0].items() if k.startswith("masked/")}, want)
    assert info[0]["masked_losses"] == pytest.approx(masked.losses, rel=1e-5)
