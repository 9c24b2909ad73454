"""Settings of a training run (:class:`TrainConfig`) and the machine they are resolved against.

``TrainConfig`` is saved in the checkpoint and in ``model.json``; on ``--resume`` only
:data:`RUNTIME_KEYS` may change. The device helpers say what this machine runs: CUDA or CPU, how
many CPUs this process may use, and whether bfloat16 is native here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from .data import DatasetError
from .nets import TILE_MULTIPLE

# Keys a --resume run may change; everything else (architecture, losses, data) comes from the checkpoint.
RUNTIME_KEYS = ("iterations", "minutes", "dpm_iterations", "dpm_minutes", "device", "threads", "workers",
                "patience", "val_every", "log_every", "export", "bf16", "lr_dpm", "dpm_target", "dpm_loss", "name", "version",
                "modality", "tile", "overlap")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in the checkpoint and in ``model.json``).

    Attributes
    ----------
    dataset : str
        Pairs folder or synthetic-data JSON file.
    out : str
        Model folder.
    iterations, minutes : optional
        ``minutes`` bounds the whole run (see the module docstring for the split); ``iterations``
        the GAN phase's iterations (whichever ends first). Neither: 10 minutes.
    dpm_iterations, dpm_minutes : optional
        DPM-phase budget. Neither: 25 % of the training time with ``minutes``, else a quarter of
        the GAN updates (``g_steps * iterations / 4``), at least 20. ``dpm_iterations=0`` skips the
        DPM decoder.
    device : str
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    base, max_channels, d_base : int
        Generator width, width cap, discriminator width.
    patch, batch : int
        Patch side (multiple of 32; default: stored size, 256 for synthetic) and batch size.
    g_steps, d_steps : int
        Generator and discriminator updates per iteration.
    lr_g, lr_d, lr_dpm : float
        Adam learning rates (``lr_g`` None: 1e-4 fine-tuning, 5e-4 from scratch).
    lr_schedule : str, optional
        ``constant`` (paper) or ``cosine`` (decays to 5 % over the budget); None: cosine when
        fine-tuning, constant from scratch.
    clip : float
        Gradient-norm clip for every network.
    gan : bool, optional
        Use the discriminator and the adversarial term (None: only from scratch -- a fresh
        discriminator would pull a fine-tuned generator away from its parent).
    adv_weight, msssim_weight, berhu_weight : float
        lambda, nu, xi of the generator loss.
    balance : str
        ``fixed`` or ``auto`` (re-balance to equal contributions at each validation).
    berhu_frac : float
        BerHu threshold as a fraction of the target std.
    dpm_target : str
        ``signed`` (defocus with its sign), ``magnitude`` (``|defocus|``) or ``auto``: signed only
        when the data source says the optics make +z and -z differ (aberrated simulator optics;
        pairs datasets record ``z_sign_meaningful``). With symmetric optics a signed target cannot
        be learned -- the best prediction is 0 -- so the decoder learns the magnitude instead.
    dpm_loss : str
        ``l2`` (the decoder predicts the conditional mean defocus) or ``l1`` (its median, the
        estimate with the least absolute error). Near focus a magnitude is bounded by 0, so where an
        image is ambiguous (a smooth object at focus, a sharp one out of focus) the mean reads
        higher than the median.
    val_every, val_pairs, patience : int
        Validation period (iterations), validation set size, early-stopping patience (validations;
        0 disables).
    seed : int
        Seed of weights, sampling and augmentation.
    bf16 : bool, optional
        bfloat16 autocast for forward/backward. None: on where the hardware runs bf16 natively (CPU
        flags ``avx512_bf16`` or ``amx_bf16``; a CUDA GPU with bf16), off elsewhere, where it is
        emulated and many times slower.
    threads : int, optional
        torch intra-op threads (default: the CPUs this process may use).
    workers : int
        Synthetic-data worker processes.
    log_every : int
        Iterations between progress events.
    export : bool
        Export the model folder at the end.
    name, version, modality : str
        Model card fields.
    tile, overlap : int, optional
        Model card inference defaults (default: 1024, and an overlap of at least 96 px that covers
        twice the geometric blur radius at the edge of the defocus range).
    init_from : str, optional
        Fine-tuning: start the generator and the DPM decoder from a model name (model search path),
        a model folder / ``generator.onnx`` or a ``checkpoint.pt`` / ``best.pt``; the network width
        is taken from it. Optimisers, budgets and iteration counts start fresh. None: the bundled
        model whose card matches the dataset, if any (see :mod:`.parent`).
    from_scratch : bool
        Do not start from any model.
    """

    dataset: str = ""
    out: str = ""
    iterations: int | None = None
    minutes: float | None = None
    dpm_iterations: int | None = None
    dpm_minutes: float | None = None
    device: str = "auto"
    base: int = 16
    max_channels: int = 64
    d_base: int = 16
    patch: int | None = None
    batch: int = 5
    g_steps: int = 6
    d_steps: int = 3
    lr_g: float | None = None
    lr_d: float = 1e-6
    lr_dpm: float = 1e-4
    lr_schedule: str | None = None
    clip: float = 1.0
    gan: bool | None = None
    adv_weight: float = 0.1
    msssim_weight: float = 5.0
    berhu_weight: float = 1.0
    balance: str = "fixed"
    berhu_frac: float = 0.1
    val_every: int = 50
    val_pairs: int = 48
    patience: int = 20
    dpm_target: str = "auto"
    dpm_loss: str = "l2"
    seed: int = 0
    bf16: bool | None = None
    threads: int | None = None
    workers: int = 1
    log_every: int = 1
    export: bool = True
    name: str | None = None
    version: str = "1.0.0"
    modality: str = "widefield fluorescence"
    tile: int | None = None
    overlap: int | None = None
    extra_card: dict = field(default_factory=dict)
    init_from: str | None = None
    from_scratch: bool = False

    def validate(self) -> None:
        """Raise :class:`DatasetError`-style ValueErrors for impossible settings (one sentence)."""
        if self.iterations is not None and self.iterations < 0:
            raise ValueError("--iterations must be zero or more.")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError("--minutes must be positive.")
        if self.patch is not None and (self.patch < 32 or self.patch % TILE_MULTIPLE):
            raise ValueError(f"--patch must be a positive multiple of {TILE_MULTIPLE}.")
        if self.batch < 1 or self.g_steps < 1 or self.d_steps < 0:
            raise ValueError("--batch and --g-steps must be at least 1 and --d-steps at least 0.")
        if self.lr_schedule not in (None, "constant", "cosine"):
            raise ValueError("--lr-schedule must be constant or cosine.")
        if self.balance not in ("fixed", "auto"):
            raise ValueError("--balance must be fixed or auto.")
        if self.dpm_target not in ("auto", "signed", "magnitude"):
            raise ValueError("--dpm-target must be auto, signed or magnitude.")
        if self.dpm_loss not in ("l2", "l1"):
            raise ValueError("--dpm-loss must be l2 or l1.")
        if self.val_every < 1:
            raise ValueError("--val-every must be at least 1.")
        zero_ok = ("dpm_iterations", "patience", "overlap", "workers")  # workers 0: data made in-process
        for name in ("dpm_iterations", "patience", "threads", "workers", "tile", "overlap", "log_every"):
            v = getattr(self, name, None)
            lo = 0 if name in zero_ok else 1
            if v is not None and v < lo:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {lo}.")
        if self.dpm_minutes is not None and not self.dpm_minutes > 0:
            raise ValueError("--dpm-minutes must be positive.")
        for name in ("lr_g", "lr_d", "lr_dpm", "clip"):
            v = getattr(self, name)
            if v is None and name == "lr_g":
                continue
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number.")
        for name in ("adv_weight", "msssim_weight", "berhu_weight"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"--{name.replace('_', '-')} must be zero or a positive number.")
        if self.base < 1 or self.max_channels < self.base or self.d_base < 1:
            raise ValueError("--base and --d-base must be at least 1 and --max-channels at least --base.")
        if self.from_scratch and self.init_from:
            raise ValueError("--from-scratch and --init-from contradict each other; give one of them.")



DEFAULT_MINUTES = 10.0
GAN_SHARE = 0.75
"""Share of the training time (after setup and the end reserve) that goes to the generator."""


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 natively (else autocast emulates it, many times slower).

    CPU: the ``avx512_bf16`` or ``amx_bf16`` flags of ``/proc/cpuinfo`` (Linux); elsewhere False.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)



def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DatasetError("CUDA was requested but this PyTorch sees no CUDA GPU; use --device cpu.")
    if name not in ("cpu", "cuda"):
        raise DatasetError(f"Unknown device {name!r}; use auto, cpu or cuda.")
    return torch.device(name)

