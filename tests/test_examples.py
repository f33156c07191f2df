"""Every example spec in examples/ plans on the built-in model its `# try:` line names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import adapterhub

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.surgery"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_plans(path):
    m = re.search(r"--model (\S+)", path.read_text())
    assert m, f"{path.name} must say which model to try it on"
    p = adapterhub.plan(m.group(1), path)
    assert p.trainable > 0 and not p.warnings
