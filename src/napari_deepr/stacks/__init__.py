"""Stack tools: registration, extended depth of field and in-focus plane selection.

Qt-free and torch-free; see ``docs/ARCHITECTURE.md``.
"""

from .edof import edof_wavelet
from .infocus import FOCUS_METHODS, crop_grid, select_in_focus
from .register import estimate_shift, register_stack

__all__ = [
    "FOCUS_METHODS",
    "crop_grid",
    "edof_wavelet",
    "estimate_shift",
    "register_stack",
    "select_in_focus",
]
