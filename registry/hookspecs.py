"""The hooks a plugin implements. Each receives a ``register`` callback (or the CLI group).

A plugin module or object decorates functions with ``adapterhub.hookimpl``; built-ins use the
same hooks as third-party packages (entry-point group ``adapterhub``).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("adapterhub")
hookimpl = pluggy.HookimplMarker("adapterhub")


@hookspec
def register_variants(register):
    """Register adapter variants: ``register(VariantSubclass)``."""


@hookspec
def register_quantizers(register):
    """Register base-weight quantizers: ``register(QuantizerSubclass)``."""


@hookspec
def register_merge_methods(register):
    """Register adapter merge (compose) methods: ``register(MergeMethodSubclass)``."""


@hookspec
def register_aliases(register):
    """Register role aliases: ``register(role, names, family=...)``.

    ``names`` are pattern fragments (``"self_attn"``, ``"layer.*.output"``) that the role word
    also matches wherever it appears as a plain segment of a ``.surgery`` pattern.
    """


@hookspec
def register_commands(cli):
    """Add click commands to the ``adapterhub`` CLI group."""
