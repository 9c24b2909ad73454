"""Physical defocus point-spread functions from :mod:`psfmodels`.

The in-plane PSF of a thin fluorescent sample seen with the focal plane ``z`` micrometres away
is a lateral slice of the 3-D widefield emission PSF. It is computed with the Aguet vectorial
model (or the Gibson-Lanni scalar model) of ``psfmodels``, which includes the objective NA, the
immersion, coverslip and sample refractive indices, the emission wavelength and pixel
integration. No Gaussian approximation is used anywhere in this module.

Conventions
-----------
* ``z = 0`` is the plane of best focus, found numerically as the stage position with the highest
  on-axis PSF intensity. ``psfmodels`` positions are absolute (micrometres from the coverslip),
  and index mismatch at a sample depth shifts the best focus away from the nominal position, so
  the offset is searched rather than assumed.
* Positive ``z`` means the focal plane lies further from the objective than the emitter (on an
  inverted stand: the focal plane is *above* the sample, the stage too high). This is the sign of
  the defocus maps (DPMs) everywhere in napari-deepr.
* Every returned plane sums to 1 (energy conservation), because ``psfmodels`` with
  ``normalize=True`` scales the *peak* to 1, not the sum.

PSF banks: :func:`write_psf_bank` stores computed planes in one ``.npz``; with the environment
variable ``DEEPR_PSF_BANK`` naming such a file, :func:`defocus_psf` serves every plane it holds
from it and calls ``psfmodels`` only for the others. This lets the trainer simulate on machines
where ``psfmodels`` cannot be installed (GPU nodes without a build toolchain), with the planes
``psfmodels`` computed here (stored in float32, renormalised on load).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

__all__ = [
    "OPTICS_20X_075",
    "OPTICS_40X_095",
    "Optics",
    "best_focus_offset",
    "blur_radius_um",
    "defocus_psf",
    "psf_fwhm_um",
    "psf_size",
]

_MODELS = ("vectorial", "scalar")


@dataclass(frozen=True)
class Optics:
    """Imaging optics of a widefield microscope, in sample-space units.

    The dataclass is frozen (hashable) so that PSFs can be cached per optics.

    Parameters
    ----------
    na : float
        Numerical aperture of the objective. Must be below ``immersion_index``.
    wavelength_um : float
        Emission wavelength in micrometres.
    pixel_size_um : float
        Camera pixel size divided by the magnification (sample-space pixel), micrometres.
    immersion_index : float
        Refractive index of the immersion medium (1.0 for a dry objective).
    sample_index : float
        Refractive index of the medium the emitters sit in (1.33 water, ~1.45-1.52 mountants).
    sample_depth_um : float
        Depth of the emitters below the coverslip, micrometres. With ``sample_index`` different
        from ``immersion_index`` this adds depth-dependent spherical aberration, which makes the
        PSF at ``+z`` and ``-z`` differ (as real microscopes do).
    coverslip_mismatch : float
        Actual minus design coverslip thickness, micrometres (e.g. 20 for a #1.5 objective used
        with a 190 µm coverslip). Non-zero values add spherical aberration.
    model : {"vectorial", "scalar"}
        ``psfmodels`` model: Aguet vectorial (default) or Gibson-Lanni scalar.
    coverslip_index : float
        Refractive index of the coverslip (design and actual).
    coverslip_um : float
        Design coverslip thickness, micrometres.
    working_distance_um : float
        Design working distance (immersion layer thickness) in micrometres; ``psfmodels``'s
        ``ti0``. Only matters together with an aberration.
    oversample : int
        Sub-pixel oversampling used by ``psfmodels`` to integrate each camera pixel.
    """

    na: float = 0.75
    wavelength_um: float = 0.55
    pixel_size_um: float = 0.325
    immersion_index: float = 1.0
    sample_index: float = 1.33
    sample_depth_um: float = 0.0
    coverslip_mismatch: float = 0.0
    model: str = "vectorial"
    coverslip_index: float = 1.515
    coverslip_um: float = 170.0
    working_distance_um: float = 650.0
    oversample: int = 3

    def __post_init__(self) -> None:
        if self.model not in _MODELS:
            raise ValueError(f"PSF model must be one of {_MODELS}, got {self.model!r}.")
        if not 0 < self.na < self.immersion_index:
            raise ValueError(
                f"NA ({self.na}) must be positive and below the immersion index "
                f"({self.immersion_index})."
            )
        for name in ("wavelength_um", "pixel_size_um", "immersion_index", "sample_index"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if int(self.oversample) < 1:
            # psfmodels 0.3.3 corrupts memory with oversample_factor=0
            raise ValueError("oversample must be >= 1.")
        if self.sample_depth_um < 0:
            raise ValueError("sample_depth_um must be >= 0 (depth below the coverslip).")

    def replace(self, **changes: Any) -> Optics:
        """Return a copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of all fields, for JSON sidecars and model cards."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Optics:
        """Build from a dict, ignoring unknown keys (forward compatible)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def aberrated(self) -> bool:
        """True when the optics make ``PSF(+z)`` differ from ``PSF(-z)``."""
        index_mismatch = self.sample_depth_um > 0 and self.sample_index != self.immersion_index
        return bool(index_mismatch or self.coverslip_mismatch != 0)

    @property
    def airy_radius_um(self) -> float:
        """Rayleigh radius ``0.61 λ / NA`` in micrometres."""
        return 0.61 * self.wavelength_um / self.na

    @property
    def depth_of_field_um(self) -> float:
        """Diffraction-limited depth of field ``n λ / NA²`` in micrometres."""
        return self.immersion_index * self.wavelength_um / self.na**2


#: 20x/0.75 dry objective, sCMOS with 6.5 µm pixels (Deep-R breast/DAPI setting).
OPTICS_20X_075 = Optics()
#: 40x/0.95 dry objective, 0.1625 µm pixels (Deep-R ovary and bead settings).
OPTICS_40X_095 = Optics(na=0.95, wavelength_um=0.6, pixel_size_um=0.1625)


def _psfmodels() -> Any:
    # Imported on first use so that a machine with only a PSF bank can still simulate.
    try:
        import psfmodels
    except ImportError as exc:
        raise ImportError(
            "Computing a PSF needs the psfmodels package (pip install psfmodels), or a PSF bank "
            "holding this plane named by DEEPR_PSF_BANK."
        ) from exc
    return psfmodels


def _pm_kwargs(optics: Optics) -> dict[str, Any]:
    """Translate :class:`Optics` into ``psfmodels.make_psf`` keyword arguments."""
    return {
        "NA": optics.na,
        "wvl": optics.wavelength_um,
        "ni": optics.immersion_index,
        "ni0": optics.immersion_index,
        "ns": optics.sample_index,
        "ng": optics.coverslip_index,
        "ng0": optics.coverslip_index,
        "tg": optics.coverslip_um + optics.coverslip_mismatch,
        "tg0": optics.coverslip_um,
        "ti0": optics.working_distance_um,
        "pz": optics.sample_depth_um,
        "model": optics.model,
    }


def _on_axis_intensity(z_abs: float, optics: Optics) -> float:
    # Unnormalised psfmodels output keeps the model's absolute scale, so the on-axis value is
    # comparable across z (the in-plane energy is conserved by the model). A fine grid makes the
    # criterion independent of the camera pixel size.
    # oversample_factor=0 corrupts the heap in psfmodels 0.3.3 (free(): invalid next size), so
    # the smallest safe setting (1) is used.
    dxy = 0.05 * optics.wavelength_um / optics.na
    p = _psfmodels().make_psf(
        [z_abs], 5, dxy=dxy, oversample_factor=1, normalize=False, **_pm_kwargs(optics)
    )
    return float(p[0, 2, 2])


@lru_cache(maxsize=256)
def best_focus_offset(optics: Optics) -> float:
    """Absolute ``psfmodels`` z (µm from the coverslip) of the plane of best focus.

    Best focus is the stage position with the highest on-axis intensity (maximum Strehl
    ratio). A coarse scan brackets the maximum, then Brent's bounded method refines it to
    1 nm, because aberrated PSFs can have secondary maxima a coarse optimiser would land on.

    Parameters
    ----------
    optics : Optics
        The optics.

    Returns
    -------
    float
        Offset to add to a relative defocus to get the ``psfmodels`` coordinate.
    """
    if not optics.aberrated:
        # Without aberration the model is symmetric about the emitter plane.
        return float(optics.sample_depth_um)
    depth = optics.sample_depth_um
    # generous bracket: focal shifts from index mismatch stay below the depth itself, and a
    # coverslip error t shifts focus by less than t (1 - 1/n_glass)
    span = 3.0 + depth + 0.5 * abs(optics.coverslip_mismatch)
    step = max(0.05, optics.depth_of_field_um / 4)
    grid = np.arange(depth - span, depth + span + step / 2, step)
    values = np.array([_on_axis_intensity(z, optics) for z in grid])
    i = int(np.argmax(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = minimize_scalar(
        lambda z: -_on_axis_intensity(z, optics),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-3},
    )
    return float(res.x)


def blur_radius_um(z_um: float | np.ndarray, optics: Optics) -> float | np.ndarray:
    """Geometric blur radius plus the Airy radius, micrometres.

    The geometric radius ``|z| tan(asin(NA / n_immersion))`` is that of the marginal-ray cone in
    the immersion medium; it bounds the blur of emitters in any sample index >= the immersion
    index, so it is a safe size for PSF windows and tile overlaps.
    """
    theta = math.asin(optics.na / optics.immersion_index)
    return np.abs(z_um) * math.tan(theta) + optics.airy_radius_um


def psf_size(z_max_um: float, optics: Optics) -> int:
    """Odd window side (pixels) that holds the PSF at defocus ``z_max_um``.

    The window's half side is 1.3 × the geometric radius plus three Airy radii (the outer
    diffraction rings), at least 7 pixels; it holds >= 98 % of the energy (tested).
    """
    r_um = 1.3 * (blur_radius_um(z_max_um, optics) - optics.airy_radius_um)
    r_um += 3 * optics.airy_radius_um
    half = max(7, math.ceil(r_um / optics.pixel_size_um))
    return 2 * half + 1


def _quantize(z: float) -> float:
    # Keys of the cache: 1e-6 µm is far below any physical meaning but makes 0.1 + 0.2 and 0.3
    # hit the same entry. ``+ 0.0`` turns -0.0 into 0.0: they hash alike in the lru_cache but
    # json.dumps writes "-0.0", which would miss the plane 0.0 in a PSF bank.
    return round(float(z), 6) + 0.0


def _bank_key(optics: Optics, size: int, z: float) -> str:
    # numbers as floats: Optics(immersion_index=1) equals Optics(immersion_index=1.0) and must find
    # the same planes (and numpy scalars must serialize)
    d = {k: float(v) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else v
         for k, v in optics.to_dict().items()}
    return json.dumps([d, int(size), _quantize(z)], sort_keys=True)


@lru_cache(maxsize=4)
def _load_bank(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        keys = json.loads(str(f["keys"]))
        offsets = f["offsets"]
        sizes = f["sizes"]
        flat = f["planes"]
    bank = {}
    for key, off, n in zip(keys, offsets, sizes):
        bank[key] = flat[int(off): int(off) + int(n) * int(n)].reshape(int(n), int(n))
    return bank


def _from_bank(z_key: tuple[float, ...], optics: Optics, size: int) -> np.ndarray | None:
    path = os.environ.get("DEEPR_PSF_BANK")
    if not path:
        return None
    bank = _load_bank(path)
    planes = [bank.get(_bank_key(optics, size, z)) for z in z_key]
    if any(p is None for p in planes):
        return None
    return np.stack(planes).astype(np.float64)


def write_psf_bank(path: str | os.PathLike, optics: list[Optics], z_um: np.ndarray | list[float]) -> int:
    """Compute defocus PSFs with ``psfmodels`` and store them for machines without it.

    Each plane is stored at the window :func:`defocus_psf` uses by default for its own ``|z|``
    (what the simulator asks for). Point ``DEEPR_PSF_BANK`` at the file to use it.

    Parameters
    ----------
    path : path-like
        ``.npz`` file to write.
    optics : list of Optics
        Every optics to store (for example one per emission wavelength).
    z_um : sequence of float
        Defocus values (µm from best focus); stored quantized to 1e-6 µm.

    Returns
    -------
    int
        Number of planes written.
    """
    keys, chunks, offsets, sizes = [], [], [], []
    off = 0
    for opt in optics:
        for z in np.asarray(z_um, dtype=float):
            size = psf_size(abs(float(z)), opt) | 1
            plane = defocus_psf(float(z), opt, size=size).astype(np.float32)
            keys.append(_bank_key(opt, size, float(z)))
            chunks.append(plane.ravel())
            offsets.append(off)
            sizes.append(size)
            off += plane.size
    if not keys:
        raise ValueError("A PSF bank needs at least one optics and one defocus value.")
    with open(path, "wb") as f:  # a file object: numpy would append ".npz" to a bare path
        np.savez_compressed(f, keys=np.array(json.dumps(keys)), offsets=np.array(offsets, np.int64),
                            sizes=np.array(sizes, np.int32), planes=np.concatenate(chunks))
    return len(keys)


@lru_cache(maxsize=4096)
def _psf_stack_cached(z_key: tuple[float, ...], optics: Optics, size: int) -> np.ndarray:
    banked = _from_bank(z_key, optics, size)
    if banked is not None:
        p = np.clip(banked, 0.0, None)
        p /= p.sum(axis=(1, 2), keepdims=True)
        p.setflags(write=False)
        return p
    z_abs = np.asarray(z_key, dtype=float) + best_focus_offset(optics)
    p = _psfmodels().make_psf(
        z_abs,
        size,
        dxy=optics.pixel_size_um,
        oversample_factor=optics.oversample,
        normalize=False,
        **_pm_kwargs(optics),
    ).astype(np.float64)
    p = np.clip(p, 0.0, None)
    p /= p.sum(axis=(1, 2), keepdims=True)
    p.setflags(write=False)  # shared by the cache: never let a caller mutate it
    return p


def defocus_psf(
    z_um: float | np.ndarray | list[float] | tuple[float, ...],
    optics: Optics | None = None,
    *,
    size: int | None = None,
    copy: bool = True,
) -> np.ndarray:
    """In-plane PSF(s) of a thin sample at defocus ``z_um`` from best focus.

    Parameters
    ----------
    z_um : float or sequence of float
        Defocus in micrometres, relative to the plane of best focus (see module conventions
        for the sign).
    optics : Optics, optional
        Optics; defaults to :data:`OPTICS_20X_075`.
    size : int, optional
        Window side in pixels (odd; an even value is increased by one). By default sized by
        :func:`psf_size` for the largest ``|z|``.
    copy : bool
        Return a writable copy (default). ``False`` returns the cached read-only array, which
        hot loops (the trainer's data generator) use to avoid the copy.

    Returns
    -------
    numpy.ndarray
        float64, shape ``(len(z), size, size)`` for a sequence or ``(size, size)`` for a scalar;
        every plane sums to 1 and is centred on pixel ``size // 2``.
    """
    optics = OPTICS_20X_075 if optics is None else optics
    scalar = np.ndim(z_um) == 0
    z = np.atleast_1d(np.asarray(z_um, dtype=float))
    if z.ndim != 1 or z.size == 0:
        raise ValueError("z_um must be a number or a 1-D sequence of numbers.")
    if not np.all(np.isfinite(z)):
        raise ValueError("z_um must be finite.")
    if size is None:
        size = psf_size(float(np.max(np.abs(z))), optics)
    size = int(size) | 1  # odd, so the PSF centre is a pixel centre
    p = _psf_stack_cached(tuple(_quantize(v) for v in z), optics, size)
    if scalar:
        p = p[0]
    return p.copy() if copy else p


def psf_fwhm_um(psf_plane: np.ndarray, pixel_size_um: float) -> float:
    """Full width at half maximum of a centred PSF plane from its radial profile.

    Measured by linear interpolation of the half-maximum crossing along the x and y axes
    through the centre pixel (no model fitted), averaged over the four half-axes.

    Parameters
    ----------
    psf_plane : numpy.ndarray
        2-D PSF with its maximum at the centre pixel.
    pixel_size_um : float
        Pixel size in micrometres.

    Returns
    -------
    float
        FWHM in micrometres.
    """
    p = np.asarray(psf_plane, dtype=float)
    c = p.shape[0] // 2
    half = p[c, c] / 2
    radii = []
    for profile in (p[c, c:], p[c, c::-1], p[c:, c], p[c::-1, c]):
        below = np.nonzero(profile < half)[0]
        if below.size == 0:
            raise ValueError("PSF window too small to contain the half maximum.")
        j = below[0]
        # linear interpolation between samples j-1 (>= half) and j (< half)
        frac = (profile[j - 1] - half) / (profile[j - 1] - profile[j])
        radii.append(j - 1 + frac)
    return float(2 * np.mean(radii) * pixel_size_um)
