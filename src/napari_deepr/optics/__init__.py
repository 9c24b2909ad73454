"""Optics: physical defocus PSFs, fluorescence/brightfield defocus simulation, specimens.

Qt-free and torch-free; see ``docs/ARCHITECTURE.md``.
"""

from .brightfield import random_brightfield_pair, stained_section
from .psf import (
    OPTICS_20X_075,
    OPTICS_40X_095,
    Optics,
    best_focus_offset,
    defocus_psf,
    psf_size,
    write_psf_bank,
)
from .simulate import (
    brightfield,
    cylinder_dpm,
    defocus,
    defocus_map,
    random_surface_dpm,
    random_training_pair,
    simulate_stack,
    sphere_dpm,
    tilt_dpm,
    write_sample_set,
)
from .specimens import SPECIMEN_KINDS, make_specimen

__all__ = [
    "OPTICS_20X_075",
    "OPTICS_40X_095",
    "SPECIMEN_KINDS",
    "Optics",
    "best_focus_offset",
    "brightfield",
    "cylinder_dpm",
    "defocus",
    "defocus_map",
    "defocus_psf",
    "make_specimen",
    "psf_size",
    "random_brightfield_pair",
    "random_surface_dpm",
    "random_training_pair",
    "simulate_stack",
    "sphere_dpm",
    "stained_section",
    "tilt_dpm",
    "write_psf_bank",
    "write_sample_set",
]
