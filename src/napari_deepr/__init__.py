"""napari-deepr: Deep-R single-shot autofocusing for napari, the command line and Python.

The public API is ``refocus`` and ``load_model``; both are imported lazily so that importing the
package stays cheap and never pulls in Qt or torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["refocus", "load_model", "list_models", "__version__"]


def __getattr__(name):
    if name == "refocus":
        from .engine.refocus import refocus

        return refocus
    if name in ("load_model", "list_models"):
        from .engine import model

        return getattr(model, name)
    raise AttributeError(f"module 'napari_deepr' has no attribute {name!r}")
