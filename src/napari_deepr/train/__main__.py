"""Command line of the Deep-R trainer: ``python -m napari_deepr.train DATASET -o MODEL_DIR [...]``.

By default a person reads it: a progress bar and sentences on stderr (:mod:`.console`). With
``--json`` it prints one JSON object per line on stdout instead (events ``status``, ``init``,
``start``, ``plan``, ``progress``, ``validation``, ``checkpoint``, ``export``, ``done``, ``error``,
``stopped``), which is what the napari Train widget reads; other noise then goes to stderr.

Exit codes: 0 when done or stopped (a stop leaves ``MODEL_DIR/checkpoint.pt`` for ``--resume``),
2 for an unusable dataset or setting (one ``error`` line saying why), 1 for unexpected failures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

# --minutes counts from here: the first thing this process does.
T0 = time.monotonic()

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse whose errors follow the trainer's protocol: one ``error`` event (JSON with --json), exit 2."""

    json_mode = False

    def error(self, message: str):
        if self.json_mode:
            _emit({"event": "error", "message": message, "kind": "ArgumentError"})
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The trainer's argument parser (also used by ``deepr train``)."""
    p = _Parser(
        prog="python -m napari_deepr.train",
        description="Train a Deep-R refocusing model (GAN generator + DPM decoder) and export it to ONNX.",
    )
    p.add_argument("dataset", help='pairs folder from "deepr pairs", or a JSON file {"synthetic": {...}}')
    p.add_argument("-o", "--out", required=True, help="model folder to write (checkpoints, previews, ONNX)")
    b = p.add_argument_group("budget")
    b.add_argument("--iterations", type=int, default=None, help="GAN iterations (each = g-steps G + d-steps D updates)")
    b.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget of the WHOLE run (setup, generator 75 %%, DPM 25 %%, export), across "
                        "resumes (default 10 when no --iterations)")
    b.add_argument("--dpm-iterations", type=int, default=None, help="DPM-decoder updates (0 = no DPM decoder)")
    b.add_argument("--dpm-minutes", type=float, default=None, help="DPM-phase share of --minutes (or its own budget)")
    b.add_argument("--dpm-target", choices=("auto", "signed", "magnitude"), default="auto",
                   help="DPM learns signed defocus or its magnitude (auto: the parent's when fine-tuning, else "
                        "signed only when the optics are asymmetric)")
    b.add_argument("--dpm-loss", choices=("l2", "l1"), default="l2",
                   help="DPM loss: l2 predicts the mean defocus, l1 its median (least absolute error)")
    b.add_argument("--resume", action="store_true",
                   help="continue from MODEL_DIR/checkpoint.pt (a finished run trains on when given a larger budget)")
    b.add_argument("--redo-dpm", action="store_true",
                   help="resume a finished run, train a fresh DPM decoder (new --lr-dpm/--dpm-target/budget) and re-export")
    b.add_argument("--init-from", metavar="MODEL",
                   help="fine-tune from this model: a name (deepr models), a model folder, generator.onnx or a "
                        "checkpoint (default: the bundled model whose card matches the dataset)")
    b.add_argument("--from-scratch", action="store_true",
                   help="do not start from a model (the bundled architecture, the paper's lr 5e-4 and LSGAN)")
    b.add_argument("--patience", type=int, default=None, help="early stopping after N validations without a better BerHu (0 = off; default 20)")
    n = p.add_argument_group("network and optimisation")
    n.add_argument("--base", type=int, default=16, help="generator width at full resolution (16 CPU default, 32 paper-sized)")
    n.add_argument("--max-channels", type=int, default=64, help="width cap (64, the bundled model's)")
    n.add_argument("--d-base", type=int, default=16, help="discriminator width")
    n.add_argument("--patch", type=int, default=None, help="training patch side, multiple of 32 (default: dataset's, 256 synthetic)")
    n.add_argument("--batch", type=int, default=5)
    n.add_argument("--g-steps", type=int, default=6)
    n.add_argument("--d-steps", type=int, default=3)
    n.add_argument("--lr-g", type=float, default=None, help="generator lr (default 1e-4 fine-tuning, 5e-4 from scratch)")
    n.add_argument("--lr-d", type=float, default=1e-6)
    n.add_argument("--lr-dpm", type=float, default=1e-4)
    n.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                   help="default cosine when fine-tuning, constant (paper) from scratch")
    n.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    gan = n.add_mutually_exclusive_group()
    gan.add_argument("--no-gan", dest="gan", action="store_false", default=None,
                     help="no discriminator: (1 - MS-SSIM) + BerHu only (default when fine-tuning)")
    gan.add_argument("--gan", dest="gan", action="store_true", help="LSGAN discriminator (default from scratch)")
    n.add_argument("--adv-weight", type=float, default=0.1, help="lambda (LSGAN term)")
    n.add_argument("--msssim-weight", type=float, default=5.0, help="nu (1 - MS-SSIM)")
    n.add_argument("--berhu-weight", type=float, default=1.0, help="xi (BerHu)")
    n.add_argument("--balance", choices=("fixed", "auto"), default="fixed",
                   help="auto: re-balance lambda and nu at each validation so all terms contribute equally")
    bf = n.add_mutually_exclusive_group()
    bf.add_argument("--bf16", dest="bf16", action="store_true", default=None,
                    help="bfloat16 autocast (default: on where the CPU/GPU runs bf16 natively)")
    bf.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 only")
    r = p.add_argument_group("run")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    r.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the CPUs available)")
    r.add_argument("--workers", type=int, default=None, help="synthetic-data worker processes (default 1)")
    r.add_argument("--val-every", type=int, default=None, help="iterations between validations (default 50)")
    r.add_argument("--val-pairs", type=int, default=48)
    r.add_argument("--log-every", type=int, default=None, help="iterations between progress lines (default 1)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    r.add_argument("--json", action="store_true", help="print JSON lines on stdout instead of a progress bar")
    c = p.add_argument_group("model card")
    c.add_argument("--name", default=None, help="model name (default: the folder name)")
    c.add_argument("--version", default="1.0.0")
    c.add_argument("--modality", default="widefield fluorescence")
    c.add_argument("--tile", type=int, default=None, help="inference tile written to the card (default 1024)")
    c.add_argument("--overlap", type=int, default=None, help="inference overlap (default: twice the blur radius, >= 96)")
    return p


def config_from_args(args: argparse.Namespace):
    """Turn parsed arguments into a :class:`~napari_deepr.train.loop.TrainConfig`."""
    from .loop import TrainConfig

    d = TrainConfig.__dataclass_fields__
    return TrainConfig(
        dataset=args.dataset, out=args.out, iterations=args.iterations, minutes=args.minutes,
        dpm_iterations=args.dpm_iterations, dpm_minutes=args.dpm_minutes, device=args.device,
        base=args.base, max_channels=args.max_channels, d_base=args.d_base, patch=args.patch, batch=args.batch,
        g_steps=args.g_steps, d_steps=args.d_steps, lr_g=args.lr_g, lr_d=args.lr_d, lr_dpm=args.lr_dpm,
        lr_schedule=args.lr_schedule, clip=args.clip, gan=args.gan, adv_weight=args.adv_weight,
        msssim_weight=args.msssim_weight, berhu_weight=args.berhu_weight, balance=args.balance,
        val_every=args.val_every if args.val_every is not None else d["val_every"].default,
        val_pairs=args.val_pairs, dpm_target=args.dpm_target, dpm_loss=args.dpm_loss,
        patience=args.patience if args.patience is not None else d["patience"].default,
        seed=args.seed, bf16=args.bf16, threads=args.threads,
        workers=args.workers if args.workers is not None else d["workers"].default,
        log_every=args.log_every if args.log_every is not None else d["log_every"].default,
        export=not args.no_export, name=args.name, version=args.version, modality=args.modality,
        tile=args.tile, overlap=args.overlap, init_from=args.init_from, from_scratch=args.from_scratch,
    )


def _emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _one_sentence(exc: BaseException) -> str:
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    return text.splitlines()[0]


def _refuse_a_foreign_model(out: Path) -> None:
    """Refuse a model folder that holds a model no training run wrote there (its files would be replaced).

    A folder of an earlier ``deepr train`` run keeps its ``checkpoint.pt`` and may be trained again;
    a model folder without one (a bundled or downloaded model, a user's own copy) is never written over.
    """
    from ..engine.contract import CARD_FILE, CHECKPOINT_FILE, DPM_FILE, GENERATOR_FILE
    from ..errors import OutputError

    if not out.is_dir() or (out / CHECKPOINT_FILE).is_file():
        return
    held = [n for n in (GENERATOR_FILE, DPM_FILE, CARD_FILE) if (out / n).exists()]
    if held:
        raise OutputError(f"The model folder {out} already holds a model that no training run wrote there "
                          f"({', '.join(held)}); give a new folder, or the folder of an earlier 'deepr train' run.")


def main(argv: list[str] | None = None) -> int:
    """Run the trainer; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    _Parser.json_mode = "--json" in argv
    args = parser.parse_args(argv)
    if args.json:
        emit = _emit
    else:
        from .console import Console

        emit = Console()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    emit({"event": "status", "phase": "setup", "message": "starting (loading PyTorch)",
          "elapsed_s": round(time.monotonic() - T0, 2)})
    try:
        from ..errors import DeepRError
        from .loop import train

        config = config_from_args(args)
        config.validate()
        _refuse_a_foreign_model(Path(args.out))
        train(config, emit, resume=args.resume, redo_dpm=args.redo_dpm, t0=T0)
    except DeepRError as exc:
        emit({"event": "error", "message": _one_sentence(exc), "kind": type(exc).__name__})
        return EXIT_BAD_INPUT
    except ValueError as exc:  # settings refused by TrainConfig.validate: the sentence is the message
        emit({"event": "error", "message": _one_sentence(exc), "kind": type(exc).__name__})
        if os.environ.get("DEEPR_DEBUG"):
            traceback.print_exc(file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - the one-line protocol boundary; details go to stderr
        emit({"event": "error", "message": f"{type(exc).__name__}: {_one_sentence(exc)}", "kind": type(exc).__name__})
        traceback.print_exc(file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
