"""Deep-R networks: the residual U-Net generator, the DPM decoder and the LSGAN discriminator.

Design (see ``docs/ARCHITECTURE.md`` and the Deep-R paper, Luo et al., ACS Photonics 2021):

* **Generator** -- a U-Net with five down-sampling blocks with residual connections and five
  up-sampling blocks. An input 3x3 convolution lifts the image to ``base`` channels, a residual block
  works at full resolution, then five times ``2x2 average pool -> residual block`` double the width
  (capped at ``max_channels``). Each residual block is ``2 x (3x3 conv + LeakyReLU(0.1))`` plus the
  block input, zero-padded along channels. The up path mirrors it: five times ``bilinear x2 ->
  concatenate the skip -> 2 x (3x3 conv + LeakyReLU)``, then a 1x1 output convolution. A global
  residual adds the input, so an untrained generator starts as the identity map.
* The encoder tensors are the six **features** ``feat0 .. feat5``: the skips at full, 1/2, 1/4, 1/8
  and 1/16 resolution and the bottleneck at 1/32. ``H`` and ``W`` must be multiples of 32.
* **DPM decoder** -- the same structure as the generator's up path, consuming exactly those features,
  with one output channel in micrometres (the scale ``range_um`` is a buffer inside the graph).
* **Discriminator** -- an input conv, four ``(stride-2 conv + LReLU, conv + LReLU)`` blocks, global
  average pooling and two fully connected layers ending in one unbounded score. There is no sigmoid:
  the least-squares GAN losses compare the raw score with 0 (fake) and 1 (real).

No batch normalization is used: batch 5 of z-scored images does not need it, and inference stays a
pure function of one tile. Width ``base=16`` is the CPU default (8.0 M parameters, about 137 GFLOP
per megapixel, > 1 MP/s with onnxruntime on 2 cores); the paper-sized network is ``base=32``.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 5
"""Number of down-sampling (and up-sampling) blocks; inputs must be multiples of ``2**LEVELS``."""

TILE_MULTIPLE = 2**LEVELS
SLOPE = 0.1


def widths(base: int, max_channels: int = 512, levels: int = LEVELS) -> list[int]:
    """Channel width at each resolution level.

    Parameters
    ----------
    base : int
        Channels at full resolution.
    max_channels : int
        Cap applied at every level.
    levels : int
        Number of down-sampling steps.

    Returns
    -------
    list of int
        ``levels + 1`` widths, full resolution first, bottleneck last.
    """
    if base < 1:
        raise ValueError("The network width (base) must be a positive number of channels.")
    return [min(base * 2**i, max_channels) for i in range(levels + 1)]


def glorot_init(module: nn.Module) -> None:
    """Glorot (Xavier) truncated-normal initialization of convolutions and linear layers.

    As in the paper (TensorFlow's ``glorot_normal``): ``std = sqrt(2 / (fan_in + fan_out))``,
    truncated at two standard deviations; biases start at zero.

    Parameters
    ----------
    module : nn.Module
        Applied to every ``Conv2d`` and ``Linear`` below it.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            fan_out = m.weight.shape[0] * (m.weight[0, 0].numel() if m.weight.dim() > 2 else 1)
            # TensorFlow divides by 0.8796 to keep the variance of a 2-sigma truncated normal.
            std = math.sqrt(2.0 / (fan_in + fan_out)) / 0.87962566103423978
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with LeakyReLU plus the input, zero-padded along channels.

    Parameters
    ----------
    cin, cout : int
        Input and output channels (``cout >= cin``).
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        if cout < cin:
            raise ValueError("A residual block cannot reduce the number of channels.")
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.pad = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        y = F.leaky_relu(self.conv1(x), SLOPE)
        y = F.leaky_relu(self.conv2(y), SLOPE)
        skip = F.pad(x, (0, 0, 0, 0, 0, self.pad)) if self.pad else x
        return y + skip


class UpBlock(nn.Module):
    """Bilinear x2 up-sampling, concatenation with the skip, two 3x3 convs with LeakyReLU.

    Parameters
    ----------
    cin : int
        Channels of the coarser input.
    cskip : int
        Channels of the skip tensor.
    cout : int
        Output channels.
    """

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin + cskip, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Up-sample ``x`` to the size of ``skip`` and fuse them."""
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = torch.cat([x, skip], dim=1)
        x = F.leaky_relu(self.conv1(x), SLOPE)
        return F.leaky_relu(self.conv2(x), SLOPE)


class UpPath(nn.Module):
    """The decoder shared by the generator and the DPM decoder.

    Parameters
    ----------
    chans : list of int
        Widths per level as returned by :func:`widths`.
    out_channels : int
        Channels of the final 1x1 convolution.
    """

    def __init__(self, chans: list[int], out_channels: int) -> None:
        super().__init__()
        levels = len(chans) - 1
        # ups[0] works at the coarsest level; the last one returns to full resolution.
        self.ups = nn.ModuleList(UpBlock(chans[i + 1], chans[i], chans[i]) for i in reversed(range(levels)))
        self.out = nn.Conv2d(chans[0], out_channels, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Decode ``[feat0 .. featK]`` (finest first, bottleneck last)."""
        x = feats[-1]
        for block, skip in zip(self.ups, reversed(feats[:-1])):
            x = block(x, skip)
        return self.out(x)


class Encoder(nn.Module):
    """Input conv, a full-resolution residual block, then five (pool + residual block) levels.

    Parameters
    ----------
    in_channels : int
        Image channels.
    chans : list of int
        Widths per level.
    """

    def __init__(self, in_channels: int, chans: list[int]) -> None:
        super().__init__()
        self.inc = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            [ResidualBlock(chans[0], chans[0])]
            + [ResidualBlock(chans[i - 1], chans[i]) for i in range(1, len(chans))]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return ``[feat0 .. featK]``: skips at each resolution and the bottleneck."""
        y = F.leaky_relu(self.inc(x), SLOPE)
        feats = []
        for i, block in enumerate(self.blocks):
            if i:
                y = F.avg_pool2d(y, 2)
            y = block(y)
            feats.append(y)
        return feats


class Generator(nn.Module):
    """Deep-R generator: residual U-Net with five down and five up blocks and a global residual.

    Parameters
    ----------
    in_channels : int
        Image channels (1 for fluorescence).
    base : int
        Width at full resolution (16 is the CPU default, 32 the paper-sized network).
    max_channels : int
        Width cap at the deep levels.
    init : bool
        Glorot-initialize the weights (False when they are loaded next).
    """

    def __init__(self, in_channels: int = 1, base: int = 16, max_channels: int = 512, init: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.base = base
        self.max_channels = max_channels
        self.chans = widths(base, max_channels)
        self.encoder = Encoder(in_channels, self.chans)
        self.decoder = UpPath(self.chans, in_channels)
        if init:  # False when weights are loaded right after (fine-tuning): saves seconds on a busy CPU
            glorot_init(self)
        # Start as the identity map: the global residual carries the input, the decoder adds zero.
        nn.init.zeros_(self.decoder.out.weight)
        nn.init.zeros_(self.decoder.out.bias)

    @property
    def num_features(self) -> int:
        """Number of feature tensors (``feat0 .. feat{n-1}``)."""
        return len(self.chans)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Refocus ``x`` and return the encoder features used by the DPM decoder.

        Parameters
        ----------
        x : Tensor
            ``[N, C, H, W]`` z-scored images, ``H`` and ``W`` multiples of 32.

        Returns
        -------
        output : Tensor
            ``[N, C, H, W]`` refocused images in z-scored units.
        feats : list of Tensor
            ``feat0 .. feat5``; ``feat_i`` has ``chans[i]`` channels at ``1 / 2**i`` resolution.
        """
        feats = self.encoder(x)
        return x + self.decoder(feats), feats

    features = forward_with_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Refocus ``x`` (``[N, C, H, W]``, z-scored, multiples of 32)."""
        return self.forward_with_features(x)[0]


class DPMDecoder(nn.Module):
    """Per-pixel defocus map decoder: the generator's up path on the generator's features.

    Parameters
    ----------
    chans : list of int
        The generator's widths (``Generator.chans``).
    range_um : float
        Scale of the raw output: ``dpm = range_um * decoder(feats)``; kept inside the ONNX graph so
        that the exported ``dpm`` output is in micrometres.
    """

    def __init__(self, chans: list[int], range_um: float = 5.0) -> None:
        super().__init__()
        self.chans = list(chans)
        self.up = UpPath(self.chans, 1)
        self.register_buffer("range_um", torch.tensor(float(range_um)))
        glorot_init(self)
        nn.init.zeros_(self.up.out.weight)
        nn.init.zeros_(self.up.out.bias)

    def forward(self, *feats: torch.Tensor) -> torch.Tensor:
        """Return the defocus map ``[N, 1, H, W]`` in micrometres from ``feat0 .. featK``."""
        if len(feats) == 1 and isinstance(feats[0], (list, tuple)):
            feats = tuple(feats[0])
        return self.up(list(feats)) * self.range_um


class Discriminator(nn.Module):
    """LSGAN discriminator: conv blocks, global average pool, two fully connected layers.

    The output is an unbounded score per image (no sigmoid): the least-squares losses push it to
    1 for in-focus targets and 0 for generator outputs.

    Parameters
    ----------
    in_channels : int
        Image channels.
    base : int
        Width of the first convolution; doubles at each of the four stride-2 blocks.
    max_channels : int
        Width cap.
    """

    def __init__(self, in_channels: int = 1, base: int = 16, max_channels: int = 512) -> None:
        super().__init__()
        chans = widths(base, max_channels, levels=4)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, chans[0], 3, padding=1), nn.LeakyReLU(SLOPE)]
        for cin, cout in itertools.pairwise(chans):
            layers += [
                nn.Conv2d(cin, cout, 3, stride=2, padding=1),
                nn.LeakyReLU(SLOPE),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.LeakyReLU(SLOPE),
            ]
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(chans[-1], chans[-1])
        self.fc2 = nn.Linear(chans[-1], 1)
        glorot_init(self)
        # The paper initializes FC weights to 0.1; constant weights would make every hidden unit
        # identical forever, so the weights stay Glorot and the constant goes to the biases.
        nn.init.constant_(self.fc1.bias, 0.1)
        nn.init.constant_(self.fc2.bias, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Score ``x`` (``[N, C, H, W]``); returns ``[N]``."""
        y = self.features(x).mean(dim=(2, 3))
        y = F.leaky_relu(self.fc1(y), SLOPE)
        return self.fc2(y).squeeze(1)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
