"""The end of a run: the model card, the final validation and the ONNX export."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..engine.contract import CARD_FILE, DPM_FILE, GENERATOR_FILE, feature_name
from ..engine.model import ModelCard, json_default
from ..engine.normalization import INPUT_MEAN_STD, card_normalization
from .config import GAN_SHARE, TrainConfig
from .nets import TILE_MULTIPLE, count_parameters


class CardMixin:
    """Writes the :class:`~napari_deepr.train.loop.Trainer`'s model folder."""

    def card(self, quality: dict, export_dpm: bool) -> ModelCard:
        """The model card of this run, validated as :meth:`ModelCard.from_dict` validates a loaded one.

        ``TrainConfig.extra_card`` is merged over the fields last (any field, or a new key kept in
        the card's ``extra``), so it is validated too.
        """
        import onnx
        import onnxruntime

        from .. import __version__

        info = self.source.info
        optics = dict(info.get("optics") or {})
        px = optics.get("pixel_size_um")
        na = optics.get("na")
        tile = self.cfg.tile or 1024
        overlap = self.cfg.overlap
        if overlap is None:
            radius_px = 0.0
            if px and na:
                n_imm = float(optics.get("immersion_index") or 1.0)
                s = min(float(na) / n_imm, 0.99)
                radius_px = self.range_um * s / math.sqrt(1 - s * s) / float(px)
            overlap = int(max(96, math.ceil(2 * radius_px / 32) * 32))
        overlap = min(overlap, tile // 2)
        cfg = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in ("extra_card",)}
        rgb = self.channels == 3
        card = ModelCard(
            name=self.cfg.name or self.out.name,
            version=self.cfg.version,
            modality="brightfield" if (rgb and self.cfg.modality == TrainConfig.modality) else self.cfg.modality,
            channels=self.channels,
            pixel_size_um=px,
            na=na,
            wavelength_um=optics.get("wavelength_um"),
            immersion_index=optics.get("immersion_index"),
            defocus_range_um=(-self.range_um, self.range_um),
            normalization=card_normalization(self.channels),
            output_scaling=INPUT_MEAN_STD,
            tile_multiple=TILE_MULTIPLE,
            min_size=TILE_MULTIPLE,
            tile=tile,
            overlap=overlap,
            dpm_sign=info.get("dpm_sign") if self.dpm_signed else
            "magnitude only: the DPM is |defocus| in µm (these optics make +z and -z look alike)",
            dpm_sign_meaningful=self.dpm_signed and export_dpm,
            dpm_target="signed" if self.dpm_signed else "magnitude",
            has_dpm=export_dpm,
            architecture={
                "generator": "residual U-Net, 5 down + 5 up blocks, LeakyReLU 0.1, global residual",
                "base": self.cfg.base, "max_channels": self.cfg.max_channels,
                "parameters": count_parameters(self.G) or sum(p.numel() for p in self.G.parameters()),
                "features": [feature_name(i) for i in range(self.G.num_features)],
            },
            provenance={
                **(info.get("provenance") or {}),
                "source_kind": info.get("kind"),
                "trainer": "python -m napari_deepr.train",
                "gan_iterations": self.iteration,
                "best_iteration": self.best["iteration"],
                "dpm_iterations": self.dpm_iteration,
                "wall_s": {k: round(v, 1) for k, v in dict(self.elapsed, total=self.used()).items()},
                "parent": None if self.parent is None else {
                    "name": self.parent.name, "version": self.parent.card.get("version"),
                    "path": str(self.parent.weights), "chosen": "automatically (matching card)" if self.parent.auto
                    else "--init-from"},
                "budget": {"minutes": self.cfg.minutes, "split": f"setup, then {int(GAN_SHARE * 100)} % generator / "
                           f"{100 - int(GAN_SHARE * 100)} % DPM decoder of the rest after a reserve for the export"},
                "precision": "bf16 autocast" if self.bf16 else "float32",
                "device": str(self.device),
                "threads": torch.get_num_threads(),
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            quality=quality,
            config=cfg,
            versions={
                "napari_deepr": __version__,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "numpy": np.__version__,
                "python": sys.version.split()[0],
            },
            # Read from extra by engine.domain.model_modality (front ends say RGB or gray).
            extra={"photometric": "rgb" if rgb else "minisblack"},
        )
        # Through JSON and from_dict: numpy values become numbers and every field is checked.
        d = json.loads(json.dumps(card.to_dict() | dict(self.cfg.extra_card or {}), default=json_default))
        return ModelCard.from_dict(d, source=f"the card of {card.name}")

    def run_export(self) -> dict:
        from .export import export_model

        self._load_best_generator()
        export_dpm = self.dpm_iteration > 0
        if export_dpm and self.best_dpm.get("state") is not None:
            self.Dec.load_state_dict(self.best_dpm["state"])
        m = self.evaluate(with_dpm=export_dpm)
        m.pop("_preview")
        validation = dict(self.source.info.get("validation") or {})
        quality = {
            "dataset": validation.get("description", "validation pairs"),
            "validation": validation,
            "metric_notes": "SSIM: Gaussian 11-px window, data range of the z-scored target; RMSE and BerHu "
                            "on z-scored images; DPM MAE in µm against the pair's uniform defocus.",
            "mean": {k: v for k, v in m.items() if k != "per_z"},
            "per_z": m["per_z"],
        }
        comparison = self._compare(m, export_dpm)
        if comparison is not None:
            quality["parent_comparison"] = comparison
        card = self.card(quality, export_dpm)
        with _stdout_to_stderr():
            res = export_model(self.G, self.Dec if export_dpm else None, self.out, card, graphs=self._graphs_dir())
        return res | {"quality": quality, "comparison": comparison}

    def _graphs_dir(self) -> Path | None:
        """A folder whose ``generator.onnx`` (and ``dpm.onnx``) are traced graphs of this architecture.

        The parent's own ONNX files are such graphs (the exporter names initializers after the state
        dict; a parent always takes this run's channels), and so is a bundled model of this run's
        architecture and channel count for a from-scratch run; only other architectures are traced
        (into ``MODEL_DIR/.graphs``).
        """
        from ..engine.model import bundled_models_dir
        from .export import GRAPHS

        need_dpm = not self._dpm_skipped()
        cands = [self.out / GRAPHS]
        if self.parent is not None:
            w = Path(self.parent.weights)
            cands.append(w if w.is_dir() else w.parent)
        b = bundled_models_dir()
        if b is not None:
            for sub in sorted(b.iterdir()) if b.is_dir() else []:
                card = None
                # ModelError is a ValueError: a folder with an unreadable card is no template.
                with contextlib.suppress(OSError, ValueError):
                    card = ModelCard.from_dict(json.loads((sub / CARD_FILE).read_text()))
                # The first convolution's shape depends on the channels: a gray model's graph cannot
                # take an RGB run's weights (filling it would fail and trace afresh at the very end).
                if (card is not None and card.channels == self.channels and card.architecture.get("base") == self.cfg.base
                        and card.architecture.get("max_channels") == self.cfg.max_channels):
                    cands.append(sub)
        for c in cands:
            if (c / GENERATOR_FILE).is_file() and (not need_dpm or (c / DPM_FILE).is_file()):
                return c
        return None


class _stdout_to_stderr:
    """Keep exporter chatter off stdout (stdout carries only the JSON protocol)."""

    def __enter__(self):
        self._old = sys.stdout
        sys.stdout = sys.stderr

    def __exit__(self, *exc):
        sys.stdout = self._old

