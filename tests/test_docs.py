"""The docs stay true: every rule in the DSL reference's variant table plans on a built-in model,
every built-in variant is in that table, and every hook is documented in the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import adapterhub
from adapterhub.registry import hookspecs

ROOT = Path(__file__).resolve().parent.parent
SURGERY_MD = (ROOT / "docs" / "surgery.md").read_text()
TABLE = [line for line in SURGERY_MD.split("## Variants", 1)[1].split("\n## ", 1)[0].splitlines()
         if line.startswith("| `")]
RULES = [(m.group(1), rule) for line in TABLE for m in [re.match(r"\| `(\w+)` \|", line)]
         for rule in re.findall(r"`([^`]*->[^`]*)`", line)]


@pytest.mark.parametrize("variant, rule", RULES, ids=[r for _, r in RULES])
def test_documented_rules_plan(variant, rule):
    p = adapterhub.plan("tiny-llama", rule)
    assert p.entries and all(e.variant == variant for e in p.entries if e.action == "variant")


def test_every_builtin_variant_is_documented():
    builtin = {n for n, _ in adapterhub.get_registry().variants.items()
               if adapterhub.get_registry().owner("variant", n).startswith("adapterhub.plugins.")}
    assert builtin == {v for v, _ in RULES}


@pytest.mark.parametrize("hook", [n for n in dir(hookspecs) if n.startswith("register_")])
def test_hooks_are_documented(hook):
    assert f"`{hook}`" in (ROOT / "README.md").read_text()


def test_every_command_in_the_readme_exists():
    from adapterhub.cli import build_cli

    commands = set(build_cli().commands)
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", readme, flags=re.S)
    used = {m for block in blocks for m in re.findall(r"^adapterhub ([a-z][a-z0-9-]*)", block, flags=re.M)}
    used |= {m for block in blocks for m in re.findall(r"&& adapterhub ([a-z][a-z0-9-]*)", block)}
    assert used and used <= commands, used - commands
