"""The trust map predicts where the refocused image is wrong, checked against the true in-focus image.

The error is measured independently: each field is simulated from a physical PSF, so its in-focus
plane is known, and the refocused output's per-pixel |error| (both z-scored) is compared with the map.
The fields are from families the bundled model trained on (the families the map was tuned on; the
held-out measurement is ``scripts/trust_eval.py``, docs/TRUST.md).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from napari_deepr.engine import trust as T
from napari_deepr.engine.model import load_model
from napari_deepr.engine.refocus import RefocusJob
from napari_deepr.optics.psf import Optics
from napari_deepr.optics.simulate import defocus
from napari_deepr.optics.specimens import make_specimen

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _z(a):
    a = np.asarray(a, np.float64)
    return (a - a.mean()) / a.std()


def test_doubt_is_high_where_the_error_is_high():
    """Measured when written (128², 8 passes): per-field ρ 0.63 / 0.71 / 0.60, pooled 0.75, median
    |error| ÷ doubt 1.49 / 0.75 / 0.77. The recipe before issue 16's tuning (spread σ 4 px ⊕ forward-model
    residual) gave per-field ρ 0.09 / 0.09 / 0.26 on the same fields. With the pixel size given, the
    shipped "by-scale" recipe makes this retuned map; v1 only where the scale was assumed."""
    model = load_model("default")
    card = model.card
    optics = Optics(na=card.na, wavelength_um=card.wavelength_um, pixel_size_um=card.pixel_size_um)
    errs, doubts = [], []
    c = (slice(8, -8),) * 2
    for kind, seed, z in (("tissue", 42, -3.0), ("texture", 43, 4.0), ("nuclei", 42, -3.0)):
        obj = make_specimen(kind, (128, 128), card.pixel_size_um, np.random.default_rng(seed))
        truth = _z(defocus(obj, 0.0, optics, noise=False))
        x = defocus(obj, z, optics, photons=800, rng=np.random.default_rng(seed + 1)).astype(np.float32)
        job = RefocusJob(x, model, trust=8, pixel_size_um=card.pixel_size_um)
        out, trust = job.run()
        assert job.trust_parts["recipe"] == "spread"
        err = np.abs(_z(out) - truth)[c].ravel()
        doubt = (1 - trust)[c].ravel()
        rho = spearmanr(err, doubt).statistic
        assert rho > 0.45, (kind, rho)
        # The doubt is an estimate of the |error| itself (z-units), not only its order.
        ratio = np.median(err / np.maximum(job.trust_parts["doubt"][c].ravel(), 1e-6))
        assert 1 / 3 < ratio < 3, (kind, ratio)
        errs.append(err)
        doubts.append(doubt)
    assert spearmanr(np.concatenate(errs), np.concatenate(doubts)).statistic > 0.6


def test_trust_is_half_where_the_predicted_error_is_the_scale():
    card = load_model("default").card
    d = np.array([0.0, T.DEFAULT_SCALE, 10 * T.DEFAULT_SCALE, 1e3], np.float32)
    t = T.trust_of(d, card)
    np.testing.assert_allclose(t[:2], [1.0, 0.5], rtol=1e-6)
    assert 0 < t[3] < t[2] < 0.01  # heavy tail: very doubtful pixels keep their order, none rounds to 0
    assert T.trust_of(d, card, cap=0.25).max() == pytest.approx(0.25)
    # A featureless background flagged by the range test is not doubted; the same flag on signal is.
    x = np.zeros((64, 64), np.float32)
    x[16:48, 16:48] = 2.0
    doubt = T.doubt_from(None, x, np.ones_like(x))
    assert doubt[32, 32] > 1.5 and doubt[2, 2] < 0.05


def _explained_and_unexplained(card):
    """A defocused field, its true in-focus plane and an output no in-range blur can turn into it."""
    optics = T.card_optics(card)
    rng = np.random.default_rng(5)
    obj = make_specimen("nuclei", (96, 96), card.pixel_size_um, rng)
    raw = defocus(obj, 2.0, optics, noise=False)
    m, sd = raw.mean(), raw.std()  # the engine z-scores input and output with the input's mean and std
    x = ((raw - m) / sd).astype(np.float32)
    y_right = ((defocus(obj, 0.0, optics, noise=False) - m) / sd).astype(np.float32)
    y_wrong = _z(rng.standard_normal(x.shape)).astype(np.float32) * 3
    return x, y_right, y_wrong


def test_v1_map_flags_an_output_the_optics_cannot_explain():
    """Where the pixel size was assumed the shipped recipe makes the v1 map: an output that an in-range
    blur turns back into the input is trusted; one with structure no in-range blur of it can match (what
    an uncalibrated real image read at the wrong scale gets: DSB 2018 at 0.325 µm, 73 % untrusted) is
    not, even with a zero spread. Where the pixel size is known the retuned map does not look at that."""
    assert T.RECIPE == "by-scale"
    assert T.recipe_for(False) == T.recipe_for(None) == "v1" and T.recipe_for(True) == "spread"
    card = load_model("default").card
    x, y_right, y_wrong = _explained_and_unexplained(card)
    spread = np.zeros_like(x)
    t_right, p = T.trust_map(x, spread, None, card, y=y_right)
    assert p["recipe"] == "v1"
    assert T.trusted_fraction(t_right) > 0.95 and np.median(p["residual"]) < 0.05
    t_known, p = T.trust_map(x, spread, None, card, y=y_wrong, scale_known=True)
    assert p["recipe"] == "spread" and p["residual"] is None and T.trusted_fraction(t_known) > 0.95
    t_wrong, p = T.trust_map(x, spread, None, card, y=y_wrong)
    assert T.trusted_fraction(t_wrong) < 0.2
    np.testing.assert_allclose(t_wrong, np.exp(-(p["residual"] / T.V1_SCALE) ** 2), rtol=1e-4, atol=1e-6)
    assert T.trust_map(x, spread, None, card, y=y_wrong, cap=0.25)[0].max() <= 0.25


def test_residual_caps_trust_only_where_the_optics_cannot_explain_the_input(monkeypatch):
    """The forward-model residual is a ceiling (doubt ≥ RESIDUAL_WEIGHT · residual), not a term: an
    output whose in-range blur reproduces the input is left alone; one that no in-range blur can turn
    into the input (fine structure the input does not have, as when a real image is read at the wrong
    pixel size) is doubted, whatever the spread says. (RECIPE "hybrid", kept for measurements.)"""
    monkeypatch.setattr(T, "RECIPE", "hybrid")
    card = load_model("default").card
    x, y_right, y_wrong = _explained_and_unexplained(card)
    spread = np.zeros_like(x)
    t0, p0 = T.trust_map(x, spread, None, card)
    t1, p1 = T.trust_map(x, spread, None, card, y=y_right)
    assert p0["residual"] is None and p1["residual"] is not None
    assert np.all(p1["doubt"] >= p0["doubt"]) and np.all(t1 <= t0)
    assert np.median(p1["residual"]) < 0.05  # explained: the ceiling leaves the map as it was
    assert T.trusted_fraction(t1) > 0.95
    # An output with structure no in-range blur of it can match: a strong residual, and trust capped.
    t2, p2 = T.trust_map(x, spread, None, card, y=y_wrong)
    assert np.median(p2["residual"]) > 0.5
    cap = 1 / (1 + (T.RESIDUAL_WEIGHT * p2["residual"] / T.DEFAULT_SCALE) ** 2)
    np.testing.assert_allclose(t2, np.minimum(t0, cap), rtol=1e-4, atol=1e-6)


def test_engine_picks_the_map_by_what_it_knows_of_the_pixel_size():
    """The same field: with its pixel size given the engine makes the retuned map, without it (the
    model's sampling assumed) the stricter v1 map, and the sentence the CLI and the panel print says why."""
    card = load_model("default").card
    optics = Optics(na=card.na, wavelength_um=card.wavelength_um, pixel_size_um=card.pixel_size_um)
    obj = make_specimen("nuclei", (96, 96), card.pixel_size_um, np.random.default_rng(3))
    x = defocus(obj, 2.0, optics, photons=800, rng=np.random.default_rng(4)).astype(np.float32)
    model = load_model("default")
    known = RefocusJob(x, model, trust=2, pixel_size_um=card.pixel_size_um)
    known.run()
    assumed = RefocusJob(x, model, trust=2)
    assumed.run()
    assert known.trust_parts["recipe"] == "spread" and assumed.trust_parts["recipe"] == "v1"
    assert assumed.trust_parts["residual"] is not None and known.trust_parts["residual"] is None
    assert "pixel size is unknown" in T.trust_sentence(0.9, 2, assumed.sampling.image_um is not None)
    assert T.trust_sentence(0.9, 2, True) == "90% of the field is trustworthy (trust ≥ 0.5, 2 passes)."
