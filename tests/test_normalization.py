"""One normalization for the trainer, the engine, the metrics and the figures, as the model card names it.

Issue 21 replaced five hand-written z-scores (trainer float32 with ``std > 1e-6``, metrics float64 with
``std > 0``, engine blockwise float64 with a relative flat test, figures with ``std + 1e-12``) by
``engine.normalization``. These tests pin that no number moved: the former formulas are written out
here and compared with the unified function on real and simulated images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_deepr.engine.normalization import (
    FLAT_RTOL,
    NORMALIZATIONS,
    ZSCORE_PER_PLANE,
    ZSCORE_PER_PLANE_PER_CHANNEL,
    card_normalization,
    flat_planes,
    plane_stats,
    zscore,
)
from napari_deepr.errors import ModelError


def _trainer_zscore_before(image):
    """train.data.zscore before issue 21 (float32 statistics, divide by 1 when std <= 1e-6)."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3:
        return np.stack([_trainer_zscore_before(c) for c in a])
    m = float(a.mean())
    s = float(a.std())
    return ((a - m) / (s if s > 1e-6 else 1.0)).astype(np.float32, copy=False)


def _metrics_zscore_before(img):
    """science.metrics.zscore before issue 21 (float64, zeros for a constant image)."""
    a = np.asarray(img, dtype=np.float64)
    sd = a.std()
    return (a - a.mean()) / sd if sd > 0 else np.zeros_like(a)


def _figure_zscore_before(a):
    """demo.py / evaluate.py figures before issue 21."""
    a = np.asarray(a, np.float64)
    return (a - a.mean()) / (a.std() + 1e-12)


def _real_planes(real_data_dir):
    """Every 2-D plane of the shared real images: 2-D fields, each z plane of the stacks, RGB as (3, Y, X)."""
    tifffile = pytest.importorskip("tifffile")
    planes = []
    for f in sorted(real_data_dir.glob("*.tif")):
        a = np.asarray(tifffile.imread(f))
        if a.ndim == 3 and a.shape[-1] == 3:
            planes.append(("rgb", f.name, np.moveaxis(a, -1, 0)))
        elif a.ndim == 3:
            planes += [("plane", f"{f.name}[{k}]", a[k]) for k in range(a.shape[0])]
        else:
            planes.append(("plane", f.name, a))
    assert len(planes) > 50  # the stacks' planes are there, not just the 2-D files
    return planes


def test_trainer_pairs_unchanged_byte_for_byte_on_real_images(real_data_dir):
    """The trainer's threshold (absolute 1e-6) became the engine's (relative 1e-12): no real plane is near either."""
    for _, name, a in _real_planes(real_data_dir):
        before = _trainer_zscore_before(a)
        after = zscore(a)  # float32, what train.data.zscore now calls
        assert after.dtype == np.float32 and after.shape == a.shape
        assert before.tobytes() == after.tobytes(), name


def test_trainer_pairs_unchanged_byte_for_byte_on_simulated_pairs():
    from napari_deepr.optics.simulate import random_training_pair
    from napari_deepr.train.data import zscore as trainer_zscore

    for seed in range(6):
        for img in random_training_pair(seed, patch=64)[:2]:
            assert _trainer_zscore_before(img).tobytes() == trainer_zscore(img).tobytes()


def test_metrics_and_figures_agree_with_the_former_formulas(real_data_dir):
    from napari_deepr.science.metrics import zscore as metrics_zscore

    for kind, name, a in _real_planes(real_data_dir):
        if kind == "rgb":
            a = a[1]
        new = metrics_zscore(a)
        assert new.dtype == np.float64
        # metrics: the same operations in float64, so the same bits
        assert np.array_equal(_metrics_zscore_before(a), new), name
        # figures divided by std + 1e-12: a relative change below 1e-9 for any real plane
        np.testing.assert_allclose(_figure_zscore_before(a), new, rtol=1e-9, atol=1e-12, err_msg=name)


def test_engine_statistics_give_the_trainers_zscore_to_float32_rounding(real_data_dir):
    """The engine z-scores streamed planes from blockwise float64 statistics; the trainer from float32 ones."""
    for _, name, a in _real_planes(real_data_dir):
        view = a if a.ndim == 3 else a[None]
        mean, std = plane_stats(view, block_rows=37)  # several blocks, combined as the engine does
        flat, safe = flat_planes(mean, std)
        assert not flat.any(), name
        engine = (view.astype(np.float32) - mean.astype(np.float32)[:, None, None]) * (1.0 / safe).astype(
            np.float32)[:, None, None]
        np.testing.assert_allclose(engine, zscore(view), atol=2e-5, err_msg=name)


def test_flat_planes_follow_the_engines_relative_rule():
    mean = np.array([0.0, 1e6, 1e6, 5.0])
    std = np.array([0.0, 1e-7, 1e-3, 1e-3])
    flat, safe = flat_planes(mean, std)
    # 1e-7 spread on a 1e6 level is rounding noise; 1e-3 on it is not, nor 1e-3 on 5
    assert flat.tolist() == [True, True, False, False]
    assert safe.tolist() == [1.0, 1.0, 1e-3, 1e-3]
    assert FLAT_RTOL == 1e-12
    # a flat plane becomes plane - mean (about zero), never a division by ~0
    z = zscore(np.full((8, 8), 1e6 + 1e-7 * (np.arange(64) % 2).reshape(8, 8)))
    assert np.all(np.isfinite(z)) and np.abs(z).max() < 1e-6
    const = zscore(np.full((5, 7), 3.25), dtype=np.float64)
    assert np.abs(const).max() < 1e-12
    # each channel (and each leading index) by its own statistics
    rng = np.random.default_rng(0)
    a = np.stack([rng.normal(10, 2, (16, 16)), rng.normal(-3, 0.5, (16, 16))])
    z = zscore(a, dtype=np.float64)
    np.testing.assert_allclose(z.mean(axis=(1, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=(1, 2)), 1, atol=1e-12)
    with pytest.raises(ValueError, match="two dimensions"):
        zscore(np.ones(5))


def test_card_names_a_normalization_the_engine_applies(tmp_path, tiny_model):
    from napari_deepr.engine.model import ModelCard, load_model

    assert card_normalization(1) == ZSCORE_PER_PLANE and card_normalization(3) == ZSCORE_PER_PLANE_PER_CHANNEL
    assert set(NORMALIZATIONS) == {ZSCORE_PER_PLANE, ZSCORE_PER_PLANE_PER_CHANNEL}
    assert load_model(tiny_model).card.normalization == ZSCORE_PER_PLANE  # the default when a card is silent
    import shutil

    for key, value in (("normalization", "minmax"), ("output_scaling", "none")):
        folder = tmp_path / f"bad_{key}"
        shutil.copytree(tiny_model, folder)
        card = json.loads((folder / "model.json").read_text())
        (folder / "model.json").write_text(json.dumps(dict(card, **{key: value})))
        with pytest.raises(ModelError, match=rf"'{key}' is '{value}', which this napari-deepr does not apply") as e:
            load_model(folder)
        assert str(e.value).count(". ") == 0  # one sentence
        with pytest.raises(ModelError, match=key):
            ModelCard.from_dict(dict(card, **{key: value}))
