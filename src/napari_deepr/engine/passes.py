"""Plane-by-plane runs at the model's sampling: resample in, test-time passes, trust, resample back.

A :class:`~napari_deepr.engine.refocus.RefocusJob` that resamples or computes a trust map runs each
plane here. Each pass is a whole-plane run of an inner job (same tiling, providers and precision),
so tiling, stacks and disk-backed outputs behave as without resampling. Only the identity pass
computes the DPM and provides the output; the other passes only measure how much the answer moves.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import Cancelled
from . import trust as _trust
from .domain import resample_plane
from .settings import RefocusSettings, available_memory

#: Rows written at a time when results go back onto the input grid without resampling.
WRITE_ROWS = 512


#: Scratch folders are named ``deepr-work-<pid>-…`` in the system's temporary folder.
SCRATCH_PREFIX = "deepr-work-"


def remove_stale_scratch() -> list[Path]:
    """Remove scratch folders whose process is gone (a run killed with -9 cannot remove its own)."""
    import re
    import shutil

    from .._files import _pid_alive

    removed = []
    for d in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        m = re.match(rf"{SCRATCH_PREFIX}(\d+)-", d.name)
        if m and d.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


class Scratch:
    """Float32 work arrays of one job: in memory, or memmaps in a temporary folder when an array would
    take over an eighth of free memory (the folder goes with this object)."""

    def __init__(self):
        self._dir = None

    def __call__(self, shape) -> np.ndarray:
        nbytes = 4 * math.prod(shape)
        if nbytes <= available_memory() // 8:
            return np.zeros(shape, dtype=np.float32)
        if self._dir is None:
            remove_stale_scratch()
            self._dir = tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
        path = f"{self._dir.name}/{len(os.listdir(self._dir.name))}.npy"
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(shape))


def planewise_steps(job, is_cancelled) -> Iterator:
    """Run ``job`` plane by plane (see the module docstring), yielding its progress.

    Raises
    ------
    Cancelled
        When ``is_cancelled()`` before a pass; finished planes are kept.
    """
    from .refocus import Progress, RefocusJob, plane_stats

    card = job.model.card
    hw, ww = job.work_hw
    h, w = job.input_hw
    transforms = _trust.D4[: job.passes] if job.passes else _trust.D4[:1]
    joint = job.layout.channel_axis is not None
    # The trust map's range test reads the DPM too (computed once, on the identity pass).
    need_dpm = job.want_dpm or (job.passes > 0 and job.model.has_dpm)
    # Out of domain by what the engine already knows: trust is capped whatever the pixels say.
    known_ood = job.modality.forced or (
        job.sampling.ratio is not None and not job.sampling.resample and abs(job.sampling.ratio - 1) > 0.05)
    cap = _trust.OUT_OF_DOMAIN_CAP if known_ood else 1.0
    scratch = job.scratch = Scratch()
    for p in job.planes:
        view = job.plane_view(p)
        c = int(view.shape[0])
        if job.sampling.resample:
            src = resample_plane(view, (hw, ww), out=scratch((c, hw, ww)))
        elif isinstance(view, np.ndarray):
            src = view.astype(np.float32, copy=False)
        else:
            src = scratch((c, hw, ww))
            for a in range(0, hw, WRITE_ROWS):
                src[:, a:a + WRITE_ROWS] = np.asarray(view[:, a:a + WRITE_ROWS], dtype=np.float32)
        mean, std = plane_stats(src)
        flat, safe_std = job.check_statistics(p, mean, std)
        out0 = dpm0 = None
        acc = m2 = None
        for k, (rot, flip) in enumerate(transforms):
            if is_cancelled():
                raise Cancelled("Refocus was cancelled; finished planes are kept.")
            first = k == 0
            # The pass runs what the outer job runs (after any fallback), at the model's own sampling.
            inner_settings = RefocusSettings(
                dpm=need_dpm and first, tile=job.tile, overlap=job.overlap, batch=job.batch,
                providers=tuple(job.providers), threads=job.threads, precision=job.precision,
                memory_arena=job.arena, io_binding=job.io_binding, pipeline=job.pipeline,
                pixel_size_um=card.pixel_size_um, force_modality=True,
            )
            inner = RefocusJob(
                _trust.forward(src, rot, flip), job.model, inner_settings, axes="CYX",
                out=scratch((c, hw, ww)[:1] + ((ww, hw) if rot % 2 else (hw, ww))) if first else None,
                norm={(0,) if not joint else (): (mean, std)},
            )
            base = job.done
            for ev in inner.steps(is_cancelled):
                job.done = base + ev.done
                yield Progress(job.done, job.total, p, inner.provider)
            job.warnings.extend(m for m in inner.warnings if m not in job.warnings)
            y = _trust.inverse(np.asarray(inner.output), rot, flip).astype(np.float32, copy=False)
            if first:
                out0 = y
                if need_dpm:
                    dpm0 = np.asarray(inner.dpm, dtype=np.float32).reshape(hw, ww)
            if job.passes > 1:  # Welford: mean and spread of the passes without keeping them
                if acc is None:
                    acc, m2 = y.copy(), np.zeros_like(y)
                else:
                    delta = y - acc
                    acc += delta / (k + 1)
                    m2 += delta * (y - acc)
        trust2d = None
        if job.passes:
            s32 = np.asarray(safe_std, dtype=np.float32)[:, None, None]
            m32 = np.asarray(mean, dtype=np.float32)[:, None, None]
            spread = None
            if job.passes > 1:
                spread = (np.sqrt(m2 / (len(transforms) - 1)) / s32).mean(axis=0)
            xz = ((src - m32) / s32).mean(axis=0)
            yz = ((out0 - m32) / s32).mean(axis=0)
            # The signals of the last plane (model grid) stay, for measurements (scripts/trust_eval.py).
            trust2d, job.trust_parts = _trust.trust_map(xz, spread, dpm0, card, cap=cap, y=yz,
                                                        scale_known=job.sampling.known)
        _write_back(job, p, (h, w), out0, dpm0, trust2d)
        del flat


def _write_back(job, p, hw: tuple[int, int], out0, dpm0, trust2d) -> None:
    """Plane ``p``'s results back onto the input grid, band by band, in the input's layout."""
    results = [(job.output, out0)]
    if job.want_dpm:
        results.append((job.dpm, dpm0[None]))
    if job.passes:
        results.append((job.trust_map, trust2d[None]))
    if job.sampling.resample:
        for target, value in results:
            resample_plane(value, hw, out=lambda a, b, blk, target=target: job.write(target, p, a, b, blk))
        return
    h = hw[0]
    for a in range(0, h, WRITE_ROWS):
        b = min(a + WRITE_ROWS, h)
        for target, value in results:
            job.write(target, p, a, b, value[:, a:b])


__all__ = ["Scratch", "planewise_steps"]
