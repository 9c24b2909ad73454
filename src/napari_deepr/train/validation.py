"""Validation of a run: BerHu, SSIM and RMSE of input and output per defocus bin, the DPM error,
preview mosaics, and the comparison of a fine-tune with its parent."""

from __future__ import annotations

import numpy as np
import torch

from .._safety import atomic_path
from ..engine.contract import PREVIEWS_DIR
from . import losses as L
from .data import bin_of


class ValidationMixin:
    """Scores the :class:`~napari_deepr.train.loop.Trainer`'s networks on its fixed validation set.

    Uses the trainer's ``val`` (inputs, targets, defocus), ``bins``, networks, ``cfg`` and
    ``parent_eval``.
    """

    def _run_at_scale(self, x: torch.Tensor, ratio: float | None, with_dpm: bool):
        """The generator's output (and DPM) for ``x``; with ``ratio`` (data ÷ network pixel size), run
        on ``x`` resampled to the network's sampling and resample the results back, as the engine
        does for a model whose pixel size differs from the image's."""
        if ratio is None:
            with self._autocast():
                out, feats = self.G.forward_with_features(x)
                dpm = self.Dec(*feats) if with_dpm else None
            return out.float(), None if dpm is None else dpm.float()
        from ..engine.domain import resample_plane, resampled_size
        from .nets import TILE_MULTIPLE

        n, c, h, w = x.shape
        hs, ws = resampled_size(h, ratio), resampled_size(w, ratio)
        ph, pw = -hs % TILE_MULTIPLE, -ws % TILE_MULTIPLE
        xs = np.stack([resample_plane(a, (hs, ws)) for a in x.float().cpu().numpy()])
        xs = np.pad(xs, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="symmetric")
        with self._autocast():
            out, feats = self.G.forward_with_features(self._to(np.ascontiguousarray(xs)))
            dpm = self.Dec(*feats) if with_dpm else None

        def back(t):
            a = t.float().cpu().numpy()[:, :, :hs, :ws]
            return torch.from_numpy(np.stack([resample_plane(b, (h, w)) for b in a])).to(self.device)

        return back(out), None if dpm is None else back(dpm)

    @torch.no_grad()
    def evaluate(self, with_dpm: bool = False, ratio: float | None = None) -> dict:
        """Score the validation set: BerHu, SSIM and RMSE of input and output, per defocus bin.

        Parameters
        ----------
        with_dpm : bool
            Also report the DPM decoder's mean absolute error (µm) per bin.
        ratio : float, optional
            Data pixel size ÷ the networks' pixel size: score the networks as the engine runs them on
            such data, on the validation pairs resampled to their sampling and back (used for a
            parent trained at another pixel size).

        Returns
        -------
        dict
            ``berhu``, ``berhu_input``, ``ssim_input``, ``ssim_output``, ``rmse_input``,
            ``rmse_output`` (means), ``per_z`` (list of per-bin dicts) and the outputs used for the
            preview under ``_preview``.
        """
        self.G.eval()
        self.Dec.eval()
        x_all, y_all, z_all = self.val
        n = len(z_all)
        rec = {k: np.zeros(n) for k in ("berhu_in", "berhu_out", "ssim_in", "ssim_out", "rmse_in", "rmse_out",
                                           "dpm_mae")}
        outputs = np.zeros_like(x_all)
        bs = max(1, self.cfg.batch * 2)
        for s in range(0, n, bs):
            x = self._to(x_all[s:s + bs])
            y = self._to(y_all[s:s + bs])
            # Same precision as training (bf16 where native): fp32 on channels-last weights is ~5x slower.
            out, dpm = self._run_at_scale(x, ratio, with_dpm)
            outputs[s:s + bs] = out.float().cpu().numpy()
            sl = slice(s, s + len(x))
            rec["berhu_in"][sl] = L.berhu(x, y, self.cfg.berhu_frac, reduce=False).cpu().numpy()
            rec["berhu_out"][sl] = L.berhu(out, y, self.cfg.berhu_frac, reduce=False).cpu().numpy()
            rec["ssim_in"][sl] = L.ssim(x, y).cpu().numpy()
            rec["ssim_out"][sl] = L.ssim(out, y).cpu().numpy()
            rec["rmse_in"][sl] = ((x - y) ** 2).flatten(1).mean(1).sqrt().cpu().numpy()
            rec["rmse_out"][sl] = ((out - y) ** 2).flatten(1).mean(1).sqrt().cpu().numpy()
            if with_dpm:
                z = self._dpm_target(torch.as_tensor(z_all[sl], device=self.device))
                # Scored where the in-focus target has structure (same rule as the training weight).
                mask = (L.structure_weight(y, floor=0.0) > 0).float()
                rec["dpm_mae"][sl] = L.weighted_mean((dpm - z).abs(), mask, reduce=False).cpu().numpy()
        bins = bin_of(z_all, self.bins)
        per_z = []
        for b in np.unique(bins):
            m = bins == b
            row = {
                "z_um": float(self.bins[b]),
                "n": int(m.sum()),
                "ssim_input": float(rec["ssim_in"][m].mean()),
                "ssim_output": float(rec["ssim_out"][m].mean()),
                "rmse_input": float(rec["rmse_in"][m].mean()),
                "rmse_output": float(rec["rmse_out"][m].mean()),
                "berhu_input": float(rec["berhu_in"][m].mean()),
                "berhu_output": float(rec["berhu_out"][m].mean()),
            }
            if with_dpm:
                row["dpm_mae_um"] = float(rec["dpm_mae"][m].mean())
            per_z.append(row)
        metrics = {
            "berhu": float(rec["berhu_out"].mean()),
            "berhu_input": float(rec["berhu_in"].mean()),
            "ssim_input": float(rec["ssim_in"].mean()),
            "ssim_output": float(rec["ssim_out"].mean()),
            "rmse_input": float(rec["rmse_in"].mean()),
            "rmse_output": float(rec["rmse_out"].mean()),
            "n": n,
            "per_z": per_z,
        }
        if with_dpm:
            metrics["dpm_mae_um"] = float(rec["dpm_mae"].mean())
        metrics["_preview"] = outputs
        self.G.train()
        self.Dec.train()
        return metrics

    def write_preview(self, outputs: np.ndarray, tag: str) -> str:
        """Save an input / output / target mosaic of up to 5 validation pairs spread over z."""
        from PIL import Image, ImageDraw

        x_all, y_all, z_all = self.val
        order = np.argsort(z_all)
        pick = order[np.unique(np.linspace(0, len(order) - 1, min(5, len(order))).round().astype(int))]
        tiles = []
        rgb = x_all.shape[1] == 3
        for i in pick:
            # RGB (brightfield) previews in colour, each channel stretched by the target's percentiles
            tgt = np.moveaxis(y_all[i], 0, -1) if rgb else y_all[i, 0]
            src = (np.moveaxis(x_all[i], 0, -1), np.moveaxis(outputs[i], 0, -1), tgt) if rgb else (
                x_all[i, 0], outputs[i, 0], tgt)
            axis = (0, 1) if rgb else None
            lo, hi = np.percentile(tgt, 0.5, axis=axis), np.percentile(tgt, 99.8, axis=axis)
            hi = np.where(hi > lo, hi, lo + 1)
            row = [np.clip((a - lo) / (hi - lo), 0, 1) for a in src]
            gap = np.ones((tgt.shape[0], 4) + tgt.shape[2:])
            tiles.append(np.concatenate([row[0], gap, row[1], gap, row[2]], axis=1))
            tiles.append(np.ones((4,) + tiles[-1].shape[1:]))
        mosaic = (np.concatenate(tiles[:-1], axis=0) * 255).astype(np.uint8)
        img = Image.fromarray(mosaic).convert("RGB")
        draw = ImageDraw.Draw(img)
        p = x_all.shape[-1]
        for r, i in enumerate(pick):
            # "um", not "µm": Pillow's built-in fonts (bitmap and Aileron) have no glyph for µ.
            draw.text((3, r * (p + 4) + 2), f"z={float(z_all[i]):+.2f}um", fill=(255, 64, 64))
        for c, label in enumerate(("input", "output", "target")):
            draw.text((c * (p + 4) + 3, img.height - 12), label, fill=(64, 160, 255))
        path = self.out / PREVIEWS_DIR / f"{tag}.png"
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG")
        return str(path)

    def _compare(self, m: dict, with_dpm: bool) -> dict | None:
        """The fine-tune against its parent on the same validation pairs (None without a parent)."""
        pe = self.parent_eval
        if not pe:
            return None
        pm = pe["metrics"]
        better = m["ssim_output"] > pm["ssim_output"] and m["berhu"] <= pm["berhu"]
        how = (f" (the parent run as the engine runs it on these images: resampled by {pe['resampled_ratio']:.3g}× "
               "to its pixel size and back)" if pe.get("resampled_ratio") else "")
        words = (f"on the same {m['n']} validation pairs{how} the fine-tuned model is "
                 f"{'better than' if better else 'NOT better than'} its parent {pe['name']}: SSIM "
                 f"{m['ssim_output']:.3f} vs {pm['ssim_output']:.3f} (input {m['ssim_input']:.3f}), BerHu "
                 f"{m['berhu']:.4f} vs {pm['berhu']:.4f}")
        out = {"parent": pe["name"], "better": bool(better), "parent_resampled_ratio": pe.get("resampled_ratio"), "ssim_output": m["ssim_output"],
               "parent_ssim_output": pm["ssim_output"], "berhu": m["berhu"], "parent_berhu": pm["berhu"],
               "ssim_input": m["ssim_input"], "n": m["n"],
               "per_z": [{"z_um": r["z_um"], "n": r["n"], "ssim_input": r["ssim_input"], "ssim_output": r["ssim_output"],
                          "parent_ssim_output": q["ssim_output"]}
                         for r, q in zip(m["per_z"], pe["per_z"]) if abs(r["z_um"] - q["z_um"]) < 1e-6]}
        if with_dpm and "dpm_mae_um" in m and pm.get("dpm_mae_um") is not None:
            out["dpm_mae_um"] = m["dpm_mae_um"]
            out["parent_dpm_mae_um"] = pm["dpm_mae_um"]
            words += f", DPM error {m['dpm_mae_um']:.2f} vs {pm['dpm_mae_um']:.2f} µm"
        out["verdict"] = words[0].upper() + words[1:] + ("." if better else "; keep using the parent for such images.")
        return out

