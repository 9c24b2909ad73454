"""napari sample data: physically simulated defocused fluorescence fields, made on the fly.

Every sample is generated deterministically (fixed seed) from a procedural specimen with the
psfmodels vectorial PSF of a 20x/0.75 dry objective at 550 nm and 0.325 µm pixels, the Deep-R
paper's breast-tissue setting; nothing is downloaded. Layers carry their scale in micrometres.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .optics.psf import OPTICS_20X_075
from .optics.simulate import defocus, defocus_map, simulate_stack, tilt_dpm
from .optics.specimens import make_specimen

__all__ = ["sample_defocused", "sample_tilted", "sample_zstack"]

_SIZE = 512
_SEED = 20210
_SPECIMEN = "mixed"
_PHOTONS = 500.0


def _meta(**extra: Any) -> dict[str, Any]:
    return {
        "simulated": True,
        "specimen": _SPECIMEN,
        "seed": _SEED,
        "photons": _PHOTONS,
        "pixel_size_um": OPTICS_20X_075.pixel_size_um,
        "optics": OPTICS_20X_075.to_dict(),
        **extra,
    }


def _object() -> np.ndarray:
    return make_specimen(_SPECIMEN, (_SIZE, _SIZE), OPTICS_20X_075.pixel_size_um, _SEED)


def _yx(name: str, data: np.ndarray, meta: dict, **kw: Any) -> tuple:
    px = OPTICS_20X_075.pixel_size_um
    attrs = {"name": name, "scale": (px, px), "units": ("µm", "µm"), "metadata": meta, **kw}
    return (data, attrs, "image")


def sample_defocused() -> list[tuple]:
    """A 512² fluorescence field uniformly defocused by +3 µm, and its in-focus ground truth."""
    obj = _object()
    z = 3.0
    rng = np.random.default_rng(_SEED)
    img = defocus(obj, z, OPTICS_20X_075, photons=_PHOTONS, rng=rng)
    gt = defocus(obj, 0.0, OPTICS_20X_075, photons=_PHOTONS, noise=False)
    return [
        _yx("ground truth (in focus, noiseless)", gt, _meta(defocus_um=0.0), visible=False),
        _yx("defocused +3 µm (simulated)", img, _meta(defocus_um=z)),
    ]


def sample_tilted() -> list[tuple]:
    """A 512² field tilted by 1.5° along the rows (δz ≈ 4.36 µm), its DPM and ground truth.

    The field lies on one side of focus (0.3 … 4.7 µm, centred at +2.5 µm), inside the bundled model's
    range; a |defocus| DPM would fold a field that crosses focus and under-read its tilt.
    """
    obj = _object()
    px = OPTICS_20X_075.pixel_size_um
    dpm = tilt_dpm((_SIZE, _SIZE), px, 1.5, direction_deg=90.0, center_um=2.5)
    rng = np.random.default_rng(_SEED + 1)
    img = defocus_map(obj, dpm, OPTICS_20X_075, photons=_PHOTONS, rng=rng)
    gt = defocus(obj, 0.0, OPTICS_20X_075, photons=_PHOTONS, noise=False)
    lim = float(np.abs(dpm).max())
    meta = _meta(tilt_deg=1.5, direction_deg=90.0, delta_z_um=float(dpm.max() - dpm.min()))
    return [
        _yx("ground truth (in focus, noiseless)", gt, _meta(defocus_um=0.0), visible=False),
        _yx("true defocus map (µm)", dpm, dict(meta, units="um"), colormap="PiYG",
            contrast_limits=(-lim, lim), visible=False),
        _yx("tilted 1.5° (simulated)", img, meta),
    ]


def sample_zstack() -> list[tuple]:
    """A 25-plane z-stack from -6 to +6 µm in 0.5 µm steps with slight lateral drift."""
    obj = _object()
    z = np.round(np.arange(-6.0, 6.0 + 0.25, 0.5), 6)
    stack, gt, _ = simulate_stack(
        obj, z, OPTICS_20X_075, drift_px=0.15, rng=_SEED + 2, photons=_PHOTONS
    )
    px = OPTICS_20X_075.pixel_size_um
    meta = _meta(z_um=z.tolist(), z_step_um=0.5, in_focus_index=int(np.argmin(np.abs(z))),
                 drift_px_per_plane=0.15)
    return [
        _yx("ground truth (in focus, noiseless)", gt, _meta(defocus_um=0.0), visible=False),
        (
            stack,
            {"name": "z-stack ±6 µm (simulated)", "scale": (0.5, px, px),
             "units": ("µm", "µm", "µm"), "metadata": meta},
            "image",
        ),
    ]
