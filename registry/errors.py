"""The error types adapterhub reports to users. Every user-facing failure is one of these."""

from __future__ import annotations


class AdapterhubError(Exception):
    """Base class: a problem the user can fix, with a message that says what and where."""


class PluginError(AdapterhubError):
    """A plugin is broken or two plugins register the same name."""


class ParamError(AdapterhubError):
    """A variant or quantizer parameter has a bad name, type or value.

    ``param`` names the offending parameter (None when the problem is the combination).
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModuleTypeError(AdapterhubError):
    """A variant or quantizer was asked to wrap a module type it does not support."""


class NotMergeableError(AdapterhubError):
    """The adapter has no exact weight-space form (prefix tuning, bottleneck adapters, ...)."""
