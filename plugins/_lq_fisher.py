"""Fisher information for LQ-LoRA's weighted decomposition, and ``adapterhub lq-fisher``.

``F[m] = sum_s (dL_s / dW_m)^2``: the empirical Fisher diagonal of every Linear/Conv1D weight
``W_m`` (stored ``out x in``), summed over calibration samples ``s`` (windows of ``seq_len``
tokens; ``L_s`` is the mean next-token loss of window ``s`` -- one backward per sample, so the
squares are of per-sample gradients). The built-in models read bytes as tokens; other models use
their tokenizer. The file is a safetensors map ``module name -> F`` that ``lq(fisher=...)`` reads
at planning and at apply time.
"""

from __future__ import annotations

from pathlib import Path

import click
import torch
from torch import nn

from adapterhub.registry import AdapterhubError, ParamError, QuantizedLinear, module_kind

FORMAT = "adapterhub.lq-fisher"
BUILTIN_CALIBRATION = (
    "The quick brown fox jumps over the lazy dog. A language model predicts the next token from the ones "
    "before it; quantizing its weights saves memory, and a low-rank adapter recovers what rounding lost. "
    "Matrices that matter more to the loss deserve more bits, so the Fisher information measures how "
    "sensitive the loss is to each weight. Calibration text only needs to look like the data the model "
    "will see: a few paragraphs of ordinary prose, some numbers like 3.14159 and 2048, and punctuation!"
) * 4


def calibration_text(source: str) -> str:
    """``builtin`` (a short English text) or the contents of a text file."""
    if source == "builtin":
        return BUILTIN_CALIBRATION
    path = Path(source)
    if not path.is_file():
        raise AdapterhubError(f"calibration '{source}' is neither 'builtin' nor a text file")
    return path.read_text(encoding="utf-8")


def token_ids(model: nn.Module, text: str) -> list[int]:
    """Bytes for the built-in models, else the model's (locally cached) tokenizer."""
    from adapterhub.models import BUILTIN_MODELS

    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if name in BUILTIN_MODELS:
        return list(text.encode("utf-8"))
    try:
        from transformers import AutoTokenizer

        return list(AutoTokenizer.from_pretrained(name, local_files_only=True)(text)["input_ids"])
    except Exception as exc:
        raise AdapterhubError(f"lq-fisher: no tokenizer for '{name or type(model).__name__}': {exc}") from None


def calibration_windows(ids: list[int], samples: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """``samples`` windows of ``seq_len`` tokens at seeded random offsets of ``ids``."""
    if len(ids) <= seq_len:
        raise AdapterhubError(f"the calibration text has {len(ids)} tokens; need more than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (samples,), generator=g).tolist()
    return [torch.tensor(ids[s:s + seq_len], dtype=torch.long)[None] for s in starts]


def fisher_information(model: nn.Module, windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module name: sum over windows of (dLoss/dW)^2}`` (fp32, ``out x in``) for every Linear and
    Conv1D of ``model``; the model's ``requires_grad`` flags are restored afterwards."""
    targets = {name: mod for name, mod in model.named_modules()
               if module_kind(mod) in ("linear", "conv1d") and not isinstance(mod, QuantizedLinear)}
    if not targets:
        raise AdapterhubError("lq-fisher: the model has no Linear or Conv1D layers")
    flags = {p: p.requires_grad for p in model.parameters()}
    weights = [mod.weight for mod in targets.values()]
    fisher = {name: torch.zeros(mod.weight.shape, dtype=torch.float32, device=mod.weight.device)
              for name, mod in targets.items()}
    device = weights[0].device
    was_training = model.training
    model.eval()
    try:
        for w in weights:
            w.requires_grad_(True)
        for ids in windows:
            ids = ids.to(device)
            out = model(input_ids=ids, labels=ids)
            if getattr(out, "loss", None) is None:
                raise AdapterhubError(f"lq-fisher needs a language model with a next-token loss; "
                                      f"{type(model).__name__} returned none")
            grads = torch.autograd.grad(out.loss, weights, allow_unused=True)
            for (name, _), g in zip(targets.items(), grads):
                if g is not None:
                    fisher[name] += g.detach().float().square()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {name: (f.t() if module_kind(targets[name]) == "conv1d" else f).contiguous().cpu()
            for name, f in fisher.items()}


def save_fisher(fisher: dict[str, torch.Tensor], path: str | Path, **metadata: str) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in fisher.items()}, str(path), metadata={"format": FORMAT, **metadata})
    return path


class FisherFile:
    """Reads one module's Fisher matrix at a time from a file made by :func:`save_fisher`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ParamError(f"lq: fisher file '{path}' does not exist (make one with `adapterhub lq-fisher`)",
                             param="fisher")

    def get(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        """``F`` of module ``name`` as ``out x in`` (``shape``)."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            if name not in f.keys():
                raise AdapterhubError(f"lq: the fisher file '{self.path}' has no entry for module '{name}' "
                                      "(was it made for another model?)")
            t = f.get_tensor(name).float()
        if tuple(t.shape) != tuple(shape):
            raise AdapterhubError(f"lq: fisher '{self.path}' gives module '{name}' shape {tuple(t.shape)}, "
                                  f"the weight is {tuple(shape)}")
        return t


@click.command("lq-fisher", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "-m", default="tiny-llama", show_default=True, help="built-in model or model directory")
@click.option("--calibration", "-c", default="builtin", show_default=True,
              help="a text file, or 'builtin' (a short English text)")
@click.option("--samples", default=16, show_default=True, type=click.IntRange(1),
              help="calibration windows (one per-sample gradient each)")
@click.option("--seq-len", default=64, show_default=True, type=click.IntRange(2))
@click.option("--seed", default=0, show_default=True)
@click.option("--out", "-o", default="fisher.safetensors", show_default=True, type=click.Path(path_type=Path))
def lq_fisher_cmd(model: str, calibration: str, samples: int, seq_len: int, seed: int, out: Path) -> None:
    """Write the Fisher information of every linear weight for lq(budget=..., fisher=OUT)."""
    from adapterhub.models import load_model

    live = load_model(model, seed=0)
    ids = token_ids(live, calibration_text(calibration))
    fisher = fisher_information(live, calibration_windows(ids, samples, seq_len, seed))
    save_fisher(fisher, out, model=model, samples=str(samples), seq_len=str(seq_len))
    click.echo(f"wrote {out}: Fisher information of {len(fisher)} matrices from {samples} windows of "
               f"{seq_len} tokens")
