"""The README's main job: refocus the bundled 1.5°-tilted sample and show what Deep-R did.

Writes the defocused input, the refocused image, the DPM (µm), the ground truth and a comparison PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import _safety, io
from .engine.dpm import fit_plane, out_of_range_mask, row_profile
from .engine.model import load_model
from .engine.normalization import zscore
from .engine.refocus import RefocusJob


def tilted_sample(size: int = 512, seed: int = 2021, tilt_deg: float = 1.5, center_um: float = 2.5, optics=None):
    """A physically simulated tilted fluorescence field (tissue-like), its DPM and in-focus truth.

    The defocus rises along +y by ``tan(tilt)·pixel_size`` per row (δz ≈ 4.36 µm over 512 px at
    0.325 µm, as in the Deep-R paper), centred on ``center_um``.

    Returns
    -------
    image : uint16 ndarray, dpm_um : float32 ndarray, truth : float32 ndarray, optics : Optics
    """
    from .optics.psf import Optics
    from .optics.simulate import defocus_map, tilt_dpm
    from .optics.specimens import make_specimen

    optics = optics or Optics(na=0.75, wavelength_um=0.55, pixel_size_um=0.325)
    rng = np.random.default_rng(seed)
    obj = make_specimen("tissue", (size, size), optics.pixel_size_um, rng)
    dpm = tilt_dpm((size, size), optics.pixel_size_um, tilt_deg, 90.0, center_um).astype(np.float32)
    image = defocus_map(obj, dpm, optics, photons=800.0, rng=rng)
    truth = defocus_map(obj, np.zeros_like(dpm), optics, noise=False).astype(np.float32)
    return image, dpm, truth, optics


def model_optics(m):
    """The optics a model was trained for (from its card's provenance), defaulting to 20×/0.75."""
    from .optics.psf import Optics

    fields = dict(m.card.provenance.get("optics") or m.card.extra.get("optics") or {})
    base = Optics.from_dict(fields) if fields else Optics()
    return base.replace(
        na=m.card.na or base.na,
        wavelength_um=m.card.wavelength_um or base.wavelength_um,
        pixel_size_um=m.card.pixel_size_um or base.pixel_size_um,
    )


def comparison_figure(path, image, output, truth, dpm, dpm_true, pixel_size_um, defocus_range_um, title="",
                      magnitude=False):
    """Input | refocused | ground truth | DPM with its row profile, saved as PNG (``magnitude``: |defocus| DPM)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def z(a):
        return zscore(a, dtype=np.float64)

    fig, ax = plt.subplots(1, 5 if dpm is not None else 3, figsize=(19 if dpm is not None else 12, 4.2))
    panels = [("defocused input", image), ("Deep-R output", output), ("in-focus ground truth", truth)]
    for a, (name, im) in zip(ax, panels, strict=False):
        zi = z(im)
        a.imshow(zi, cmap="magma", vmin=-1.5, vmax=np.percentile(zi, 99.7))
        a.set_title(name)
        a.axis("off")
    if dpm is not None:
        lim = max(abs(defocus_range_um[0]), abs(defocus_range_um[1]))
        # |defocus| maps are sequential from 0 (no sign to show); signed maps diverge around focus.
        h = (ax[3].imshow(dpm, cmap="magma", vmin=0, vmax=lim) if magnitude
             else ax[3].imshow(dpm, cmap="RdBu_r", vmin=-lim, vmax=lim))
        oor = out_of_range_mask(dpm, defocus_range_um)
        if oor.any():
            ax[3].contour(oor, levels=[0.5], colors="k", linewidths=0.8)
        ax[3].set_title("DPM |defocus| (µm)" if magnitude else "DPM (µm)")
        ax[3].axis("off")
        fig.colorbar(h, ax=ax[3], fraction=0.046)
        y_um = np.arange(dpm.shape[0]) * pixel_size_um
        ax[4].plot(y_um, row_profile(dpm), label="DPM row mean")
        if dpm_true is not None:
            ax[4].plot(y_um, row_profile(dpm_true), "k--", label="true defocus")
        fit = fit_plane(dpm, pixel_size_um, image=output, magnitude=magnitude)
        ax[4].set_title(f"fitted tilt {fit.tilt_deg:.2f}°")
        ax[4].set_xlabel("y (µm)")
        ax[4].set_ylabel("defocus (µm)")
        ax[4].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _safety.save_figure(fig, path, dpi=90)
    plt.close(fig)
    return Path(path)


def run_demo(out_dir="deepr_quickstart", model="default", provider=None) -> dict:
    """Refocus the tilted sample with ``model`` and write images, DPM and a comparison PNG.

    Returns
    -------
    dict
        Paths written and the headline numbers (SSIM of input and output, fitted tilt).
    """
    from .science.metrics import ssim

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _safety.check_own_outputs(out, ["tilted_input.tif", "tilted_refocused.tif", "tilted_ground_truth.tif",
                                    "tilted_dpm_um.tif", "tilted_comparison.png"])  # a user's files are kept
    m = load_model(model)
    image, dpm_true, truth, optics = tilted_sample(optics=model_optics(m))
    job = RefocusJob(image, m, dpm=m.has_dpm, providers=provider)
    job.run()
    px = optics.pixel_size_um
    meta = {"model": m.card.name, "provider": job.provider, "sample": "simulated 1.5° tilted tissue field"}
    paths = {
        "input": io.write_image(out / "tilted_input.tif", image, axes="YX", pixel_size_um=px, metadata=meta),
        "refocused": io.write_image(out / "tilted_refocused.tif", job.output, axes="YX", pixel_size_um=px, metadata=meta),
        "truth": io.write_image(out / "tilted_ground_truth.tif", truth, axes="YX", pixel_size_um=px, metadata=meta),
    }
    result = {k: str(v) for k, v in paths.items()}
    s_in, s_out = ssim(image, truth), ssim(job.output, truth)
    title = f"{m.card.name}: SSIM to ground truth {s_in:.3f} (input) → {s_out:.3f} (Deep-R)"
    if job.dpm is not None:
        fit = fit_plane(job.dpm, px, defocus_range_um=m.card.defocus_range_um, image=job.output, magnitude=m.card.dpm_magnitude)
        result["dpm"] = str(io.write_image(out / "tilted_dpm_um.tif", job.dpm, axes="YX", pixel_size_um=px, metadata=dict(meta, units="µm", plane_fit=fit.to_dict())))
        result["tilt"] = f"{fit.tilt_deg:.2f}° fitted (true 1.50°), mean defocus {fit.mean_um:+.2f} µm (true {float(dpm_true.mean()):+.2f})"
    result["comparison"] = str(
        comparison_figure(out / "tilted_comparison.png", image, job.output, truth, job.dpm, dpm_true, px, m.card.defocus_range_um, title,
                          magnitude=m.card.dpm_magnitude)
    )
    result["ssim"] = f"input {s_in:.3f} -> refocused {s_out:.3f}"
    result["provider"] = job.provider
    return result


# -- brightfield (RGB) case: runs only when a brightfield RGB model is installed ---------------------
NO_BRIGHTFIELD_MODEL = (
    "No brightfield (RGB) model is installed, so the brightfield case was skipped "
    "(docs/BRIGHTFIELD.md says how to train deepr-bf-he-20x)."
)


def find_brightfield_model():
    """The first installed model whose card says brightfield RGB, or None."""
    import warnings

    from .engine.domain import model_for_image, model_modality
    from .engine.model import list_models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = model_for_image("rgb", list_models())
    return m if m is not None and model_modality(m.card) == ("brightfield", "rgb") else None


def brightfield_sample(size: int = 512, seed: int = 2021, z_um: float = 6.0, optics=None, photons: float = 2000.0):
    """A simulated H&E-like section defocused by ``z_um`` (8-bit RGB) and its in-focus truth.

    Procedural hematoxylin/eosin stain amounts (:func:`napari_deepr.optics.brightfield.procedural_he`)
    imaged per colour channel at 0.61/0.54/0.47 µm by the Abbe model with a condenser at 0.6 × NA,
    white balanced to 235 DN, with shot noise (``photons`` per clear-glass pixel).

    Returns
    -------
    image : uint8 ndarray (Y, X, 3), truth : float32 ndarray (Y, X, 3), optics : Optics
    """
    from .optics.brightfield import blur_half_width, procedural_he, stained_section
    from .optics.psf import Optics

    optics = optics or Optics(na=0.75, wavelength_um=0.55, pixel_size_um=0.325)
    rng = np.random.default_rng(seed)
    na_c = 0.6 * optics.na
    half = blur_half_width(abs(z_um), optics, na_c)
    amounts = procedural_he(size + 2 * half, optics.pixel_size_um, rng)
    opd = 0.05 * amounts.sum(axis=0) / max(float(amounts.sum(axis=0).max()), 1e-9)
    planes = stained_section(amounts, [z_um, 0.0], optics, phase_opd_um=opd, condenser_na=na_c, pad=0)
    planes = planes[:, :, half:-half, half:-half]
    white = 235.0
    noisy = rng.poisson(np.clip(planes[0], 0, None) * photons) / photons * white
    image = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    truth = (planes[1] * white).astype(np.float32)
    return np.moveaxis(image, 0, -1), np.moveaxis(truth, 0, -1), optics


def run_brightfield_demo(out_dir, model, provider=None, z_um: float = 6.0, size: int = 512) -> dict:
    """Refocus a simulated defocused H&E field with a brightfield RGB ``model``; write TIFFs and a PNG.

    Returns
    -------
    dict
        Paths written and the SSIM (mean over colour channels) of input and output to the truth.
    """
    from .engine.domain import to_input_range
    from .science.metrics import ssim

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _safety.check_own_outputs(out, ["he_input.tif", "he_refocused.tif", "he_ground_truth.tif", "he_comparison.png"])
    m = load_model(model)
    image, truth, optics = brightfield_sample(size=size, z_um=z_um, optics=model_optics(m))
    job = RefocusJob(image, m, providers=provider, axes="YXS")
    job.run()
    output = to_input_range(job.output, image.dtype)  # RGB back in the input's dtype, clipped
    px = optics.pixel_size_um
    meta = {"model": m.card.name, "provider": job.provider, "sample": f"simulated H&E field, {z_um:+.1f} µm"}
    paths = {
        "input": io.write_image(out / "he_input.tif", image, axes="YXS", pixel_size_um=px, metadata=meta),
        "refocused": io.write_image(out / "he_refocused.tif", output, axes="YXS", pixel_size_um=px, metadata=meta),
        "truth": io.write_image(out / "he_ground_truth.tif", truth, axes="YXS", pixel_size_um=px, metadata=meta),
    }
    s_in = float(np.mean([ssim(image[..., c].astype(np.float32), truth[..., c]) for c in range(3)]))
    s_out = float(np.mean([ssim(output[..., c].astype(np.float32), truth[..., c]) for c in range(3)]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(12, 4.3))
    for a, (name, im) in zip(ax, (("defocused input", image), ("Deep-R output", output),
                                  ("in-focus ground truth", np.clip(truth, 0, 255).astype(np.uint8))), strict=True):
        a.imshow(im)
        a.set_title(name)
        a.axis("off")
    fig.suptitle(f"{m.card.name}: SSIM (mean of R, G, B) {s_in:.3f} (input) → {s_out:.3f} (Deep-R)")
    fig.tight_layout()
    _safety.save_figure(fig, out / "he_comparison.png", dpi=90)
    plt.close(fig)
    result = {k: str(v) for k, v in paths.items()}
    result["comparison"] = str(out / "he_comparison.png")
    result["ssim"] = f"input {s_in:.3f} -> refocused {s_out:.3f} (mean of R, G, B)"
    result["provider"] = job.provider
    return result
