"""Deep-R losses: least-squares GAN, MS-SSIM, BerHu, and the weighted generator objective.

Generator loss (paper Eq. 1)::

    L_G = lambda * (1 - D(G(x)))**2 + nu * (1 - MS-SSIM(y, G(x))) + xi * BerHu(y, G(x))

Discriminator loss (paper Eq. 2)::

    L_D = D(G(x))**2 + (1 - D(y))**2

Conventions fixed here (the paper leaves them open):

* **MS-SSIM data range.** Images are z-scored, so there is no natural ``max_val``. Each sample uses
  the range (max - min) of its own target as ``data_range``; this is what rescaling both images by
  the target's range would give for the contrast/structure terms, and stays fixed for a given target.
* **MS-SSIM on small patches.** pytorch-msssim needs the smallest side to exceed
  ``(win - 1) * 2**4`` (160 px for the TensorFlow 11-px window). :func:`msssim_config` keeps the
  five TF scales and weights with the 11-px window from 161 px up; below that it shrinks the window
  (down to 7 px: 128-px patches keep all five scales) and then drops the coarsest scales,
  renormalizing the remaining TF weights to sum 1 (64-px patches use 4 scales with a 7-px window).
* **Numerical safety.** The TF/pytorch-msssim product ``relu(cs)**w`` has an infinite gradient at
  0; the per-scale terms are clamped to ``>= 1e-4`` instead of 0 so a poor early prediction cannot
  produce NaNs. MS-SSIM is always computed in float32, also under bf16 autocast.
* **BerHu** uses ``c = 0.1 * std(target)`` per sample (0.1 for z-scored targets) and a mean
  reduction over pixels, so its scale does not depend on the patch size.

Balancing (the paper: weights "set such that the three losses contributed approximately equally
after convergence"). Measured term values with z-scored images (base-16 generator, 256-px simulated
fluorescence patches, first minutes of training on 2 CPU cores): BerHu 1.0-1.9 (sparse bright
objects reach tens of sigma, so the quadratic branch dominates), 1 - MS-SSIM 0.07-0.14, LSGAN
adversarial term about 1.07 (with the paper's discriminator learning rate of 1e-6 the critic stays
near its initial score of about 0, far from the 0.5 equilibrium where the term would be 0.25).
Defaults: ``xi = 1`` (BerHu is the reference, and the validation metric), ``nu = 5`` (brings
1 - MS-SSIM to about half of BerHu early on and closer to it as BerHu falls), ``lambda = 0.1``
(deliberately below equality: a generator pushed hard against a nearly random critic learns
artefacts on a CPU-length run). ``balance="auto"`` (trainer option ``--balance auto``) implements
the paper's rule literally: at every validation the weights are reset from running means so that
each weighted term equals the weighted BerHu term (clamped to [0.01, 100]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

TF_MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MIN_WINDOW = 7


def msssim_config(size: int, win_size: int = 11) -> tuple[int, tuple[float, ...]]:
    """Window size and scale weights usable for square patches of side ``size``.

    Parameters
    ----------
    size : int
        Smallest image side in pixels.
    win_size : int
        Preferred Gaussian window (11 as in TensorFlow).

    Returns
    -------
    win_size : int
        Odd window size, at least 3.
    weights : tuple of float
        Per-scale weights (finest first), summing to 1 when scales were dropped.

    Raises
    ------
    ValueError
        If the image is too small for even a single-scale SSIM with a 3-px window.
    """
    weights = TF_MSSSIM_WEIGHTS
    win = win_size
    while win > MIN_WINDOW and size <= (win - 1) * 2 ** (len(weights) - 1):
        win -= 2
    levels = len(weights)
    while levels > 1 and size <= (win - 1) * 2 ** (levels - 1):
        levels -= 1
    while levels == 1 and win > 3 and size <= win - 1:
        win -= 2
    if size <= win - 1:
        raise ValueError(f"Patches of {size} px are too small for SSIM; use at least 32 px.")
    if levels < len(weights):
        w = weights[:levels]
        total = sum(w)
        weights = tuple(v / total for v in w)
    return win, tuple(weights)


def target_range(y: torch.Tensor) -> torch.Tensor:
    """Per-sample dynamic range ``max - min`` of ``y`` as an ``[N, 1, 1, 1]`` tensor (>= 1e-6)."""
    flat = y.detach().flatten(1)
    return (flat.amax(1) - flat.amin(1)).clamp_min(1e-6).view(-1, 1, 1, 1)


def ms_ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    win_size: int | None = None,
    weights: tuple[float, ...] | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Multi-scale SSIM per sample with the target's own data range.

    Uses pytorch-msssim's Gaussian window and single-scale kernel (``_ssim``), combined as in
    ``pytorch_msssim.ms_ssim`` / TensorFlow ``ssim_multiscale``, but with a per-sample data range,
    a scale count adapted to the patch size (:func:`msssim_config`) and clamped terms.

    Parameters
    ----------
    pred, target : Tensor
        ``[N, C, H, W]``.
    win_size, weights : optional
        Override :func:`msssim_config`.
    eps : float
        Lower clamp of the per-scale terms.

    Returns
    -------
    Tensor
        ``[N]`` MS-SSIM values (mean over channels).
    """
    pred = pred.float()
    target = target.float()
    if win_size is None or weights is None:
        auto_win, auto_weights = msssim_config(min(target.shape[-2:]))
        win_size = win_size or auto_win
        weights = weights or auto_weights
    channels = target.shape[1]
    win = _fspecial_gauss_1d(win_size, 1.5).repeat(channels, 1, 1, 1).to(target.device)
    data_range = target_range(target)
    w = torch.tensor(weights, dtype=torch.float32, device=target.device)
    terms = []
    x, y = pred, target
    with torch.autocast(device_type=target.device.type, enabled=False):
        for level in range(len(weights)):
            ssim_c, cs_c = _ssim(x, y, win=win, data_range=data_range, size_average=False)
            if level < len(weights) - 1:
                terms.append(cs_c.clamp_min(eps))
                pad = [s % 2 for s in x.shape[2:]]
                x = torch.nn.functional.avg_pool2d(x, kernel_size=2, padding=pad)
                y = torch.nn.functional.avg_pool2d(y, kernel_size=2, padding=pad)
        terms.append(ssim_c.clamp_min(eps))
        stacked = torch.stack(terms, dim=0)  # (levels, N, C)
        value = torch.prod(stacked ** w.view(-1, 1, 1), dim=0)
    return value.mean(1)


def ssim(pred: torch.Tensor, target: torch.Tensor, win_size: int = 11) -> torch.Tensor:
    """Single-scale SSIM per sample (Gaussian 11-px window, data range of the target).

    Parameters
    ----------
    pred, target : Tensor
        ``[N, C, H, W]``.
    win_size : int
        Window size (reduced automatically for tiny images).

    Returns
    -------
    Tensor
        ``[N]`` SSIM values.
    """
    pred = pred.float()
    target = target.float()
    win_size = min(win_size, (min(target.shape[-2:]) - 1) | 1)
    win = _fspecial_gauss_1d(win_size, 1.5).repeat(target.shape[1], 1, 1, 1).to(target.device)
    with torch.autocast(device_type=target.device.type, enabled=False):
        value, _ = _ssim(pred, target, win=win, data_range=target_range(target), size_average=False)
    return value.mean(1)


def berhu(pred: torch.Tensor, target: torch.Tensor, frac: float = 0.1, reduce: bool = True) -> torch.Tensor:
    """Reverse Huber (BerHu) loss with threshold ``c = frac * std(target)`` per sample.

    ``|d|`` where ``|d| <= c``, ``(d**2 + c**2) / (2 c)`` elsewhere, ``d = pred - target``.

    Parameters
    ----------
    pred, target : Tensor
        ``[N, C, H, W]``.
    frac : float
        Threshold as a fraction of the target's standard deviation (0.1 in the paper).
    reduce : bool
        Mean over everything (default) or per-sample means ``[N]``.

    Returns
    -------
    Tensor
        Scalar, or ``[N]`` when ``reduce`` is False.
    """
    pred = pred.float()
    target = target.float()
    c = (frac * target.detach().flatten(1).std(dim=1)).clamp_min(1e-6).view(-1, 1, 1, 1)
    d = (pred - target).abs()
    loss = torch.where(d <= c, d, (d * d + c * c) / (2 * c))
    return loss.mean() if reduce else loss.flatten(1).mean(1)


def structure_weight(target: torch.Tensor, window_px: int = 15, threshold: float = 0.25,
                     floor: float = 0.1) -> torch.Tensor:
    """Per-pixel weight of the DPM loss: 1 where the in-focus target has structure, ``floor`` elsewhere.

    Same rule as :func:`napari_deepr.engine.dpm.structure_mask` (local standard deviation over
    ``window_px`` above ``threshold`` times the sample's own): the defocus of empty background is
    not observable, and an L2 loss there only pulls the decoder towards the mean defocus.

    Parameters
    ----------
    target : Tensor
        In-focus targets ``[N, C, H, W]``.

    Returns
    -------
    Tensor
        ``[N, 1, H, W]`` weights in ``[floor, 1]``.
    """
    t = target.detach().float().mean(1, keepdim=True)
    t = (t - t.mean((2, 3), keepdim=True)) / t.flatten(1).std(1).clamp_min(1e-6).view(-1, 1, 1, 1)
    pad = window_px // 2
    tp = torch.nn.functional.pad(t, (pad, pad, pad, pad), mode="reflect")
    m1 = torch.nn.functional.avg_pool2d(tp, window_px, stride=1)
    m2 = torch.nn.functional.avg_pool2d(tp * tp, window_px, stride=1)
    sd = (m2 - m1 * m1).clamp_min(0).sqrt()
    return floor + (1.0 - floor) * (sd > threshold).float()


def weighted_mean(values: torch.Tensor, weight: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """Weighted mean over all pixels (``reduce``) or per sample ``[N]``."""
    w = weight.expand_as(values)
    if reduce:
        return (values * w).sum() / w.sum().clamp_min(1e-12)
    return (values * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-12)


def lsgan_d_loss(d_fake: torch.Tensor, d_real: torch.Tensor) -> torch.Tensor:
    """Least-squares discriminator loss ``mean(D(G(x))**2) + mean((1 - D(y))**2)``."""
    return (d_fake.float() ** 2).mean() + ((1 - d_real.float()) ** 2).mean()


def lsgan_g_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """Least-squares adversarial generator loss ``mean((1 - D(G(x)))**2)``."""
    return ((1 - d_fake.float()) ** 2).mean()


@dataclass
class LossWeights:
    """Weights of the generator objective and their optional automatic balancing.

    Attributes
    ----------
    adv : float
        lambda, weight of the LSGAN term.
    msssim : float
        nu, weight of ``1 - MS-SSIM``.
    berhu : float
        xi, weight of BerHu (the reference the others are balanced to).
    balance : str
        ``"fixed"`` keeps the weights; ``"auto"`` re-balances them by :meth:`rebalance`.
    """

    adv: float = 0.1
    msssim: float = 5.0
    berhu: float = 1.0
    balance: str = "fixed"
    running: dict = field(default_factory=dict)

    def observe(self, terms: dict[str, float], momentum: float = 0.98) -> None:
        """Update the running means of the unweighted terms (used by ``balance="auto"``)."""
        for key in ("adv", "msssim", "berhu"):
            if key in terms:
                old = self.running.get(key)
                v = float(terms[key])
                self.running[key] = v if old is None else momentum * old + (1 - momentum) * v

    def rebalance(self, max_weight: float = 100.0) -> bool:
        """Set ``adv`` and ``msssim`` so their weighted running means equal the weighted BerHu.

        Returns
        -------
        bool
            True when the weights changed.
        """
        if self.balance != "auto" or "berhu" not in self.running:
            return False
        ref = self.berhu * self.running["berhu"]
        changed = False
        for key in ("adv", "msssim"):
            value = self.running.get(key)
            if value is not None and value > 1e-8:
                setattr(self, key, float(min(max(ref / value, 1.0 / max_weight), max_weight)))
                changed = True
        return changed

    def as_dict(self) -> dict:
        """JSON-friendly view."""
        return {"adv": self.adv, "msssim": self.msssim, "berhu": self.berhu, "balance": self.balance}


def generator_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: LossWeights,
    d_fake: torch.Tensor | None = None,
    berhu_frac: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted Deep-R generator objective.

    Parameters
    ----------
    pred, target : Tensor
        Generator output and in-focus target, ``[N, C, H, W]``, z-scored.
    weights : LossWeights
        lambda, nu, xi.
    d_fake : Tensor, optional
        Discriminator scores of ``pred``; without it (``--no-gan``) the adversarial term is absent.
    berhu_frac : float
        BerHu threshold as a fraction of the target std.

    Returns
    -------
    loss : Tensor
        Scalar to back-propagate.
    terms : dict
        Unweighted values of each term and the total, as floats.
    """
    l_berhu = berhu(pred, target, berhu_frac)
    l_ms = 1.0 - ms_ssim(pred, target).mean()
    loss = weights.berhu * l_berhu + weights.msssim * l_ms
    terms = {"berhu": float(l_berhu.detach()), "msssim": float(l_ms.detach())}
    if d_fake is not None:
        l_adv = lsgan_g_loss(d_fake)
        loss = loss + weights.adv * l_adv
        terms["adv"] = float(l_adv.detach())
    terms["total"] = float(loss.detach())
    return loss, terms
