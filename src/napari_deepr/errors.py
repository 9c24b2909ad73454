"""Errors a user can cause: each carries one clear sentence."""

from __future__ import annotations


class DeepRError(ValueError):
    """A problem with the user's input, model or settings, explained in one sentence."""


class ModelError(DeepRError):
    """A model file or folder that cannot be used."""


class InputError(DeepRError):
    """An image or file that cannot be refocused as given."""


class Cancelled(RuntimeError):
    """Raised inside long work when the caller asked it to stop."""
