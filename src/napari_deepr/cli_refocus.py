"""``deepr refocus``: its options, the engine settings they make, and the run (in memory or streamed)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import SettingsError


class ProgressBar:
    """A dependency-free progress bar on stderr (silent when stderr is not a terminal and quiet)."""

    def __init__(self, label: str, enabled: bool = True):
        self.label, self.enabled = label, enabled
        self.t0 = time.perf_counter()
        self._last = 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, ev) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if ev.done < ev.total and now - self._last < (0.1 if self.tty else 5.0):
            return
        self._last = now
        frac = ev.fraction
        el = now - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        bar = "#" * int(30 * frac)
        line = f"{self.label} [{bar:<30}] {ev.done}/{ev.total} tiles  {el:5.1f}s  eta {eta:5.1f}s  ({ev.provider})"
        end = "\r" if self.tty and ev.done < ev.total else "\n"
        sys.stderr.write(line + end)
        sys.stderr.flush()


def add_refocus_parser(sub) -> argparse.ArgumentParser:
    """The ``refocus`` subcommand and its options."""
    from .cli import _nonneg_int, _positive_int
    from .engine.providers import PROVIDERS
    from .engine.settings import PRECISIONS

    r = sub.add_parser("refocus", help="refocus a defocused image (TIFF/OME-TIFF/zarr in and out)")
    r.add_argument("input")
    r.add_argument("-o", "--output", required=True)
    r.add_argument("--model", default="default", help="model name, folder or .onnx (default: bundled)")
    r.add_argument("--dpm", metavar="DPM_OUT", help="also write the defocus map (µm) here")
    r.add_argument("--tile", type=_positive_int, help="tile side in px, a multiple of the model's tile multiple (default: by memory)")
    r.add_argument("--overlap", type=_nonneg_int)
    r.add_argument("--batch", type=_positive_int)
    r.add_argument("--provider", action="append", help=f"{', '.join(PROVIDERS)} (repeatable)")
    r.add_argument("--axes", help="axis letters of the input, e.g. ZYX, YXS, TCYX (default: from the file)")
    r.add_argument("--threads", type=_positive_int)
    r.add_argument(
        "--precision", choices=PRECISIONS, default="fp32",
        help="fp16: half precision on GPU providers; bf16: bfloat16 on AVX512-BF16/AMX CPUs via onnxruntime-openvino; int8: the model's quantized variant",
    )
    r.add_argument("--pixel-size", type=float, metavar="UM",
                   help="the image's pixel size in µm (overrides the file; uncalibrated files otherwise use the model's)")
    r.add_argument("--no-resample", action="store_true",
                   help="do not resample to the model's pixel size (a mismatch then only warns, before the run)")
    r.add_argument("--force-modality", action="store_true",
                   help="refocus even an image of another modality than the model's (e.g. RGB through a fluorescence model)")
    r.add_argument("--trust", metavar="TRUST_OUT", help="also write a per-pixel trust map (0-1, 1 = trust) here")
    r.add_argument("--trust-passes", type=int, default=8, metavar="N",
                   help="test-time passes (flips and turns) for the trust map, 1-8 (default 8)")
    r.add_argument("--scheduler", help="dask.distributed scheduler address (out-of-core, chunk by chunk)")
    r.add_argument("--out-of-core", action="store_true",
                   help="stream disk to disk even for a small image (chosen by itself for large ones)")
    r.add_argument("--in-memory", action="store_true",
                   help="keep the whole result in memory even for a large image (faster tiles, more memory)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output that napari-deepr did not write")
    r.add_argument("-q", "--quiet", action="store_true")
    return r


def refocus_settings(args):
    """The engine's :class:`~napari_deepr.engine.settings.RefocusSettings` of ``deepr refocus``'s options.

    Raises
    ------
    napari_deepr.errors.DeepRError
        For an option the engine refuses without a model (a pixel size, the trust passes, bf16 on a GPU).
    """
    from .engine.settings import RefocusSettings

    return RefocusSettings(
        dpm=bool(args.dpm), tile=args.tile, overlap=args.overlap, batch=args.batch, providers=args.provider,
        threads=args.threads, precision=args.precision, pixel_size_um=args.pixel_size,
        resample=not args.no_resample, force_modality=args.force_modality,
        trust=int(args.trust_passes) if args.trust else False, stream=False if args.in_memory else None,
    )


def cmd_refocus(args) -> int:
    """Run ``deepr refocus``: check everything, refocus (in memory or disk to disk), write, summarize."""
    from . import io
    from .cli import _cancel_on_sigint, _report_stale
    from .engine.domain import preflight, small_field_note
    from .engine.model import load_model
    from .engine.refocus import RefocusJob
    from .engine.results import stream_by_default, write_results
    from .layout import image_layout

    # Everything a user can get wrong is checked before anything is read in full or written.
    settings = refocus_settings(args)
    out_path = io.check_output_path(args.output, args.input, overwrite=args.overwrite)
    taken = [out_path]
    for flag, path in (("--dpm", args.dpm), ("--trust", args.trust)):
        if path:
            p = io.check_output_path(path, args.input, overwrite=args.overwrite)
            if p in taken:
                raise SettingsError(f"{flag} names the same file as another output; choose different outputs.")
            taken.append(p)
    load_model(args.model)  # a wrong model is refused before a large image is read
    _report_stale(out_path)
    img = io.read_image(args.input)
    card = load_model(args.model).card
    axes = (args.axes or img.axes).upper()
    sampling, modality = preflight(card, tuple(img.data.shape), axes, image_um=img.pixel_size_um,
                                   pixel_size_um=settings.pixel_size_um, resample=settings.resample,
                                   force_modality=settings.force_modality)
    for v in (sampling, modality):  # said once, before the run
        if v.message and v.level != "ok":
            print(f"deepr: {'warning' if v.level == 'warning' else 'note'}: {v.message}", file=sys.stderr)
    if args.dpm:
        lay = image_layout(tuple(img.data.shape), axes, card.channels)
        note = small_field_note(card, img.data.shape[lay.y], img.data.shape[lay.x], sampling)
        if note:
            print(f"deepr: note: {note}", file=sys.stderr)
    if args.in_memory and (args.scheduler or args.out_of_core):
        raise SettingsError("--in-memory cannot be combined with --out-of-core or --scheduler; choose one.")
    streamed = bool(args.scheduler or args.out_of_core)
    if not streamed and not args.in_memory:
        streamed = stream_by_default(img, axes, card.channels, int(bool(args.dpm)) + int(bool(args.trust)))
    # Before any computing: the outputs must fit on their disks.
    from ._safety import check_free_space, refocus_needs

    check_free_space(refocus_needs(out_path, img.data.shape, axes, card.channels, img.data.dtype, dpm=args.dpm,
                                   trust=args.trust, rgb=modality.image == "rgb", streamed=streamed))
    progress = None if args.quiet else ProgressBar(f"refocus {Path(args.input).name}")
    if streamed:
        from .engine.distributed import refocus_file

        info = refocus_file(img, out_path, model=args.model, settings=settings, dpm_path=args.dpm,
                            trust_path=args.trust, scheduler=args.scheduler, progress=progress,
                            overwrite=args.overwrite)
        info["output"] = str(out_path)
        info["streamed"] = "asked" if (args.scheduler or args.out_of_core) else "chosen (large input; --in-memory forces memory)"
        print(json.dumps(info))
        return 0
    job = RefocusJob(img, args.model, settings, axes=args.axes)
    job.run(progress, _cancel_on_sigint())
    for w in dict.fromkeys(job.warnings):
        if w not in job.announced:  # the fallback warnings were already shown when they happened
            print(f"deepr: warning: {w}", file=sys.stderr)
    summary = write_results(job, img, out_path, dpm_path=args.dpm, trust_path=args.trust,
                            source=str(Path(args.input).resolve()), overwrite=args.overwrite,
                            say=lambda line: print(line, file=sys.stderr))
    print(json.dumps(summary))
    return 0


__all__ = ["ProgressBar", "add_refocus_parser", "cmd_refocus", "refocus_settings"]
