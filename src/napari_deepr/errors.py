"""Errors a user can cause: each carries one clear sentence.

Every error a user can cause, from the ``deepr`` command and from the Python API, is a
:class:`DeepRError`. Subclasses also derive from the built-in type a caller would expect
(``ValueError`` for bad values, ``TypeError`` for wrong argument types, ``OSError`` for paths that
cannot be read or written), so ``except ValueError`` keeps working where it always did.
"""

from __future__ import annotations


class DeepRError(ValueError):
    """A problem with the user's input, model or settings, explained in one sentence."""


class ModelError(DeepRError):
    """A model file, folder or card that cannot be used."""


class InputError(DeepRError):
    """An image or file that cannot be refocused as given."""


class SettingsError(DeepRError):
    """An option or argument outside its allowed range (tile 0, negative threads, ...)."""


class ArgumentTypeError(DeepRError, TypeError):
    """An API argument of the wrong type (a string where a number is needed, ...)."""


class OutputError(DeepRError, OSError):
    """An output that cannot be written where asked (not writable, a user's folder, inside an input)."""

    def __str__(self) -> str:  # OSError would print its errno tuple; ours is one sentence
        return str(self.args[0]) if self.args else ""


class NoSpaceError(OutputError):
    """Outputs that would not fit in the free space of their disk (refused before any computing)."""


class Cancelled(RuntimeError):
    """Raised inside long work when the caller asked it to stop."""
