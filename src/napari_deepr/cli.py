"""The ``deepr`` command: a thin front end over the same engine the napari widgets use."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import traceback
import warnings
from pathlib import Path

from .cli_refocus import add_refocus_parser, cmd_refocus
from .errors import Cancelled, DeepRError, OutputError, SettingsError


def _cancel_on_sigint() -> threading.Event:
    """Turn SIGINT and SIGTERM into a cancel: workers see the event, the main thread an exception.

    Raising :class:`Cancelled` in the main thread (where Python runs signal handlers) also stops the
    write phase, so every ``finally`` removes its temporary file before the process exits.
    """
    stop = threading.Event()

    def handler(signum, frame):
        stop.set()
        raise Cancelled(f"stopped by {signal.Signals(signum).name}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
    return stop


def _report_stale(path) -> None:
    from . import io

    removed = io.clean_stale_partials(path)
    if removed:
        print(f"deepr: removed {len(removed)} temporary file(s) left by an interrupted earlier run: "
              + ", ".join(p.name for p in removed), file=sys.stderr)


def _check_folder_target(path: str, what: str = "output folder") -> Path:
    """An output folder that may be created: refused when it is a file or its place is not writable."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputError(f"The {what} {p} is a file; choose a folder name.")
    anc = p.resolve()
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"The {what} {p} cannot be created because {anc} is a file.")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"The {what} {p} cannot be written ({anc} is not writable).")
    return p


# -- models -----------------------------------------------------------------------------------------
def cmd_models(args) -> int:
    from .engine.model import list_models, model_search_path
    from .engine.providers import available_providers

    models = list_models()
    if args.json:
        print(json.dumps([dict(m.card.to_dict(), path=str(m.root), has_dpm=m.has_dpm) for m in models], indent=1))
        return 0
    if not models:
        print("No models found in: " + ", ".join(str(p) for p in model_search_path()))
    for m in models:
        c = m.card
        print(f"{c.name} {c.version}  [{m.root}]")
        print(f"    {c.summary()}; DPM decoder: {'yes' if m.has_dpm else 'no'}; tile {c.tile}, overlap {c.overlap}")
    print(f"execution providers here: {', '.join(available_providers())}")
    return 0


# -- simulate ---------------------------------------------------------------------------------------
def cmd_simulate(args) -> int:
    from .optics.psf import Optics
    from .optics.simulate import write_sample_set
    from .optics.specimens import SPECIMEN_KINDS

    _check_folder_target(args.output)
    _cancel_on_sigint()  # SIGTERM/SIGINT unwind through the writers' finally: no temporary is left
    if args.specimen not in SPECIMEN_KINDS:
        raise SettingsError(f"Unknown specimen {args.specimen!r}; choose one of {', '.join(SPECIMEN_KINDS)}.")
    if args.size < 32:
        raise SettingsError(f"--size {args.size} is too small; use at least 32 pixels.")
    if args.na >= 1.6:
        raise SettingsError(f"--na {args.na:g} is beyond any objective (at most about 1.5).")
    optics = Optics(na=args.na, wavelength_um=args.wavelength, pixel_size_um=args.pixel_size)
    paths = write_sample_set(
        args.output, specimen=args.specimen, size=args.size, z_um=tuple(args.z), tilt_deg=args.tilt,
        seed=args.seed, optics=optics,
    )
    for p in paths:
        print(p)
    return 0


# -- pairs ------------------------------------------------------------------------------------------
def cmd_pairs(args) -> int:
    from . import io
    from .stacks.pairs import build_pairs

    io.check_output_path(args.output, *args.stacks, overwrite=args.overwrite, kind="folder")
    stop = _cancel_on_sigint()
    summary = build_pairs(
        args.stacks, args.output, z_step_um=args.z_step, range_um=args.range, patch=args.patch,
        focus_method=args.focus_method, infocus_index=args.infocus_index, split=args.split, seed=args.seed,
        gap_px=args.gap, pixel_size_um=args.pixel_size, pixel_size_out_um=args.pixel_size_out,
        focus_per=args.focus_per,
        progress=None if args.quiet else _text_progress("pairs"), cancel=stop.is_set, overwrite=args.overwrite,
    )
    print(json.dumps(summary, default=str))
    return 0


def _text_progress(label: str):
    def show(fraction, message=""):
        sys.stderr.write(f"{label}: {100 * fraction:5.1f}% {message}\n")
        sys.stderr.flush()

    return show


# -- train ------------------------------------------------------------------------------------------
def cmd_train(args, extra: list[str]) -> int:
    """Run the bundled trainer as its own process, passing its JSON lines through."""
    _check_folder_target(args.output, "model folder")
    if not Path(args.dataset).exists():
        raise SettingsError(f"The dataset {args.dataset} does not exist.")
    cmd = [sys.executable, "-m", "napari_deepr.train", args.dataset, "-o", args.output, *extra]
    proc = subprocess.Popen(cmd)

    def forward(signum, frame):
        # The trainer writes a resumable checkpoint when signalled; pass the signal on and wait for it
        # instead of dying and leaving an orphan that is killed without one.
        if proc.poll() is None:
            proc.send_signal(signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


# -- bench ------------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    from . import io
    from .bench import format_table, run_bench

    if args.json:
        io.check_output_path(args.json, kind="file", overwrite=True)
    if args.train:
        try:
            from .train.bench_torch import bench_train, format_train_bench
        except ImportError as exc:
            raise SettingsError(f"deepr bench --train needs the [train] extra ({exc.name} is missing).") from exc
        result = bench_train(patch=args.train_patch, batch=args.train_batch, seconds=args.train_seconds,
                             threads=args.threads)
        print(format_train_bench(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
            print(f"wrote {args.json}")
        return 0
    result = run_bench(
        model=args.model, sizes=args.sizes, repeats=args.repeats, threads=args.threads, torch_eager=not args.no_torch,
        baselines=not args.no_baselines, tile=args.tile, overlap=args.overlap, variants=args.variants,
        provider=args.provider,
    )
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


# -- quantize -------------------------------------------------------------------------------------
def cmd_quantize(args) -> int:
    from . import io
    from .engine.model import load_model
    from .engine.quantize import calibration_tiles, quality_delta, quantize_generator

    load_model(args.model)
    if args.json:
        io.check_output_path(args.json, kind="file", overwrite=True)
    _cancel_on_sigint()  # SIGTERM/SIGINT unwind through the writers' finally: no temporary is left

    if args.precision == "int8":
        path = quantize_generator(args.model, tiles=calibration_tiles(args.calibration_tiles))
    q = quality_delta(args.model, precision=args.precision)
    if args.precision == "int8":
        q["path"] = str(path)
    print(json.dumps(q))
    if args.json:
        Path(args.json).write_text(json.dumps(q, indent=1) + "\n")
    return 0


# -- demo (the README's main job) -------------------------------------------------------------------
def cmd_demo(args) -> int:
    from .demo import NO_BRIGHTFIELD_MODEL, find_brightfield_model, run_brightfield_demo, run_demo
    from .engine.domain import model_modality
    from .engine.model import load_model

    _check_folder_target(args.output)
    chosen = load_model(args.model)  # refused before the output folder is created
    _cancel_on_sigint()  # SIGTERM/SIGINT unwind through the writers' finally: no temporary is left

    if model_modality(chosen.card) != ("brightfield", "rgb"):  # an RGB model gets only the RGB case
        out = run_demo(args.output, model=args.model, provider=args.provider)
        for k, v in out.items():
            print(f"{k:>12}: {v}")
    bf = chosen if model_modality(chosen.card) == ("brightfield", "rgb") else find_brightfield_model()
    if bf is None:
        print(f"{'brightfield':>12}: {NO_BRIGHTFIELD_MODEL}")
        return 0
    print(f"{'brightfield':>12}: {bf.card.name}, simulated H&E field at +6 µm")
    for k, v in run_brightfield_demo(Path(args.output) / "brightfield", bf, provider=args.provider).items():
        print(f"{k:>12}: {v}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-sentence errors (no usage block) and exit code 2."""

    def error(self, message: str):
        message = message[0].upper() + message[1:] if message else message
        self.exit(2, f"deepr: error: {message.rstrip('.')}; see '{self.prog} --help'.\n")


def _number(kind, text: str, check, what: str):
    try:
        v = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not check(v):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return v


def _positive_int(text: str) -> int:
    return _number(int, text, lambda v: v > 0, "a whole number of at least 1")


def _nonneg_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "a whole number of at least 0")


def _positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0 and v != float("inf"), "a positive number")


def _finite_float(text: str) -> float:
    return _number(float, text, lambda v: abs(v) != float("inf") and v == v, "a finite number")


def _fraction(text: str) -> float:
    return _number(float, text, lambda v: 0 < v <= 1, "a fraction above 0 and at most 1")


def build_parser() -> argparse.ArgumentParser:
    """The ``deepr`` argument parser."""
    from . import __version__

    p = _Parser(prog="deepr", description="Deep-R single-shot autofocusing (refocus + defocus maps).")
    p.add_argument("--version", action="version", version=f"napari-deepr {__version__}")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of a failure (anywhere on the line)")
    sub = p.add_subparsers(dest="command", required=True)

    add_refocus_parser(sub)

    m = sub.add_parser("models", help="list bundled and user models with their optics and range")
    m.add_argument("--json", action="store_true")

    s = sub.add_parser("simulate", help="write physically defocused sample data (uniform, tilted, z-stack)")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--specimen", default="mixed")
    s.add_argument("--size", type=_positive_int, default=512)
    s.add_argument("--z", type=_finite_float, nargs="+", default=[-4, -2, 0, 2, 4], help="defocus values in µm")
    s.add_argument("--tilt", type=_finite_float, default=1.5, help="tilt of the tilted field in degrees")
    s.add_argument("--na", type=_positive_float, default=0.75)
    s.add_argument("--wavelength", type=_positive_float, default=0.55, help="emission wavelength in µm")
    s.add_argument("--pixel-size", type=_positive_float, default=0.325, help="µm")
    s.add_argument("--seed", type=int, default=0)

    pr = sub.add_parser("pairs", help="build a training-pairs dataset from z-stacks")
    pr.add_argument("stacks", nargs="+")
    pr.add_argument("-o", "--output", required=True)
    pr.add_argument("--z-step", type=_positive_float, help="µm, when the files do not say")
    pr.add_argument("--range", type=_positive_float, default=5.0, help="pair planes within ±range µm of focus")
    pr.add_argument("--patch", type=_positive_int, default=256)
    pr.add_argument("--focus-method", default="ssim_edof")
    pr.add_argument("--infocus-index", type=_nonneg_int, help="manual in-focus plane (overrides --focus-method)")
    pr.add_argument("--focus-per", choices=("crop", "field"), default="crop",
                    help="one in-focus plane per crop (default; follows tilt) or per field of view (flat samples of "
                         "objects thicker than a crop's depth of field)")
    pr.add_argument("--pixel-size", type=_positive_float, help="µm, when the files do not say (or say wrongly)")
    pr.add_argument("--pixel-size-out", type=_positive_float,
                    help="resample the stacks to this pixel size (µm) first, e.g. the model you fine-tune (0.325 for "
                         "deepr-fluo-20x)")
    pr.add_argument("--split", type=_fraction, default=0.85)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--gap", type=_nonneg_int, default=None,
                    help="one field only: px between the training and validation regions (default: the network's "
                         "receptive-field radius, 223 px)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output folder that is not a pairs dataset")
    pr.add_argument("-q", "--quiet", action="store_true")

    t = sub.add_parser(
        "train", help="train a model (runs python -m napari_deepr.train; extra options pass through)",
        description="Options after DATASET -o MODEL_DIR go to the trainer: see python -m napari_deepr.train --help.",
    )
    t.add_argument("dataset")
    t.add_argument("-o", "--output", required=True)

    b = sub.add_parser("bench", help="throughput (MP/s, s/mm²) of the engine, raw ORT, PyTorch, baselines")
    b.add_argument("--model", default="default")
    b.add_argument("--sizes", type=_positive_int, nargs="+", default=[512, 4096])
    b.add_argument("--repeats", type=_positive_int, default=3)
    b.add_argument("--threads", type=_positive_int)
    b.add_argument("--tile", type=_positive_int)
    b.add_argument("--overlap", type=_nonneg_int)
    b.add_argument("--variants", nargs="*", default=[], help="extra engine runs: bf16 int8 (CPU), fp16 dpm_fp16 dpm_no_iobinding (GPU), dpm, trust trust4 (trust-map cost)")
    b.add_argument("--provider", default="cpu", help="cpu (default) or a GPU provider, e.g. cuda")
    b.add_argument("--no-torch", action="store_true")
    b.add_argument("--no-baselines", action="store_true")
    b.add_argument("--json", help="write the results as JSON here")
    b.add_argument("--train", action="store_true",
                   help="training throughput instead: generator updates/s of the trainer's default configuration "
                        "beside a plain PyTorch forward+backward of the same network on the same batch")
    b.add_argument("--train-patch", type=_positive_int, default=256)
    b.add_argument("--train-batch", type=_positive_int, default=5)
    b.add_argument("--train-seconds", type=_positive_float, default=20.0, help="time per measured configuration")

    qz = sub.add_parser(
        "quantize", help="write an int8 (static QDQ) variant of a model, or check bf16, and measure its SSIM cost",
    )
    qz.add_argument("model")
    qz.add_argument("--precision", choices=("int8", "bf16"), default="int8",
                    help="int8: write generator.int8.onnx; bf16: measure the OpenVINO bf16 run (nothing written)")
    qz.add_argument("--calibration-tiles", type=_positive_int, default=64)
    qz.add_argument("--json", help="also write the measurement here")

    d = sub.add_parser("demo", help="refocus the bundled tilted sample (and, with a brightfield model installed, "
                                    "a simulated H&E field): images, DPM and comparison PNGs")
    d.add_argument("-o", "--output", default="deepr_quickstart")
    d.add_argument("--model", default="default")
    d.add_argument("--provider", action="append")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deepr`` command.

    Exit codes: 0 done, 2 a problem the user can fix (one sentence on stderr), 130 cancelled, 1 an
    unexpected failure (one sentence; the traceback only with ``--debug``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # --debug may stand anywhere; for train everything after DATASET passes through to the trainer.
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    try:  # argparse exits on errors (one line, code 2) and on --help/--version (code 0)
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "train":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:
        return int(exc.code or 0)
    old_showwarning = warnings.showwarning

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        if debug:
            return old_showwarning(message, category, filename, lineno, file, line)
        print(f"deepr: warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line_warning
    try:
        if args.command == "train":
            return cmd_train(args, extra)
        return {
            "refocus": cmd_refocus,
            "models": cmd_models,
            "simulate": cmd_simulate,
            "pairs": cmd_pairs,
            "bench": cmd_bench,
            "demo": cmd_demo,
            "quantize": cmd_quantize,
        }[args.command](args)
    except (Cancelled, KeyboardInterrupt):
        print("deepr: cancelled; nothing was written.", file=sys.stderr)
        return 130
    except DeepRError as exc:
        if debug:
            traceback.print_exc()
        print(f"deepr: error: {_one_sentence(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        if debug:
            traceback.print_exc()
        print("deepr: error: not enough memory; use a smaller --tile or --batch.", file=sys.stderr)
        return 2
    except OSError as exc:  # a disk that is full or read-only, a file removed meanwhile
        if debug:
            traceback.print_exc()
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"deepr: error: {exc.strerror or _one_sentence(exc)}{where}.", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the command's boundary: one sentence, details on request
        if debug:
            traceback.print_exc()
        print(f"deepr: internal error: {type(exc).__name__}: {_one_sentence(exc)}; rerun with --debug for the traceback "
              "and please report it.", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = old_showwarning


def _one_sentence(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
