"""Screenshots of the refocus panel's pixel-size and modality verdicts, shown before Run.

Run under a display (Xvfb on servers)::

    QT_API=pyqt6 xvfb-run -a python scripts/screenshot_domain.py

Opens two real images from ``../shared/data/real`` (read, never copied): an uncalibrated RGB H&E
slide (pixel size unknown; a fluorescence model refuses it) and a DAPI field calibrated at 0.2 µm
(resampled to the model's 0.325 µm). Writes ``docs/screenshots/domain_rgb.png`` and
``docs/screenshots/domain_resample.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshots import _save, _viewer, _wait  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def main() -> int:
    from qtpy.QtWidgets import QApplication

    from napari_deepr._reader import read_layers
    from napari_deepr._widgets.refocus import RefocusWidget

    app = QApplication.instance() or QApplication([])
    for fname, shot in (("skin_he_rgb_2d.tif", "domain_rgb"), ("sephace_dapi_set2_2d.tif", "domain_resample")):
        v = _viewer(f"napari-deepr: verdicts before Run ({fname})")
        for data, kw, _ in read_layers(str(REAL / fname)):
            v.add_image(data, **kw)
        w = RefocusWidget(v)
        v.window.add_dock_widget(w, name="Refocus (Deep-R)", area="right")
        w.refresh_layers(select=v.layers[0])
        w.trust_check.setChecked(True)
        _wait(app, lambda: False, 1.5)
        print(shot, "|", w.scale_label.text(), "|", w.modality_label.text())
        v.reset_view()
        _save(v, shot)
        v.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
