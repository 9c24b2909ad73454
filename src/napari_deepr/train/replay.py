"""Rehearsal while fine-tuning: part of every batch simulated like the parent's own training data.

A fine-tune on a user's few fields learns their optics, and also their content: on one 25 × 66 µm
band of a confocal nuclei stack the child learned "bright almost everywhere" and filled the
background of another band with haze where the input was mostly noise (docs/FINETUNE.md). Mixing
in pairs drawn as the parent's were (its recorded ``synthetic`` recipe: procedural specimens through
the physical PSF model, never the user's images) reminds the network of everything else it has
seen, the usual remedy against such forgetting (rehearsal / experience replay). The user's pairs
alone validate.

Only the parent's procedural families are replayed: real in-focus images it was trained on are
not shipped with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..engine.contract import TRAIN_CONFIG_FILE
from .data import DatasetError, Source, _z_batch


def parent_recipe(weights: Path) -> dict | None:
    """The ``synthetic`` recipe the parent model at ``weights`` was trained with (None when unknown)."""
    folder = weights if weights.is_dir() else weights.parent
    path = folder / TRAIN_CONFIG_FILE
    try:
        spec = json.loads(path.read_text())["synthetic"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(spec, dict):
        return None
    spec = {k: v for k, v in spec.items() if k not in ("real_images_dir", "real_images", "real_fraction")}
    return spec


class ReplaySource(Source):
    """The user's pairs with a share of each batch simulated by the parent's recipe.

    Parameters
    ----------
    user : Source
        The dataset being fine-tuned on (validates alone; its ``info`` describes the run).
    recipe : dict
        The parent's ``synthetic`` recipe (see :func:`parent_recipe`).
    fraction : float
        Expected share of simulated pairs per batch (each sample is simulated with this probability).
    seed : int
        Seed of the simulation stream.
    """

    def __init__(self, user: Source, recipe: dict, fraction: float, seed: int = 0) -> None:
        from .synthetic import SyntheticSource

        if not 0 < fraction < 1:
            raise DatasetError(f"--replay must be between 0 and 1 (a share of each batch), got {fraction:g}.")
        self.user = user
        self.patch = user.patch
        self.channels = getattr(user, "channels", 1)
        self.fraction = float(fraction)
        self.warnings = list(getattr(user, "warnings", []))
        # In-process simulation: ~6 ms a pair at 32-64 px, far below a training step.
        self.sim = SyntheticSource(dict(recipe, validation_pairs=1), self.patch, seed=seed + 7919, workers=0)
        if self.sim.channels != self.channels:
            raise DatasetError("The parent's training recipe makes images with another number of channels than the "
                               "dataset, so it cannot be replayed; use --replay 0.")
        self.info = dict(user.info, replay={"fraction": self.fraction, "recipe": "the parent's procedural families",
                                            "specimen_kinds": recipe.get("specimen_kinds")})

    def sample(self, rng: np.random.Generator, n: int):
        """See :meth:`Source.sample`: ``Binomial(n, fraction)`` simulated pairs, the rest the user's."""
        k = int(rng.binomial(n, self.fraction))
        parts = [s.sample(rng, m) for s, m in ((self.user, n - k), (self.sim, k)) if m]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        zs = [z for p in parts for z in (p[2] if p[2].ndim == 1 else list(p[2][:, 0]))]
        return x, y, _z_batch(zs, self.patch)

    def validation(self):
        """The user's validation pairs only."""
        return self.user.validation()

    def close(self) -> None:
        self.sim.close()
        self.user.close()


def with_replay(source: Source, parent, share: float, *, explicit: bool, seed: int):
    """``source`` wrapped in a :class:`ReplaySource` when a fine-tune of a pairs dataset asks for it.

    Returns
    -------
    source : Source
        The wrapped source, or ``source`` itself (no share, synthetic data, no parent or no recipe).
    note, warning : str or None
        A sentence for the run's notes, and one for its warnings when ``explicit`` replay cannot be done.
    """
    if not share or source.info.get("kind") == "synthetic":
        return source, None, None
    recipe = parent_recipe(Path(parent.weights)) if parent is not None else None
    if recipe is None:
        return source, None, ("--replay needs a parent model that records its training recipe (train_config.json); "
                              "this run trains on the dataset alone." if explicit else None)
    wrapped = ReplaySource(source, recipe, share, seed=seed)
    return wrapped, (f"{100 * share:.0f} % of each batch is simulated as {parent.name}'s training data was "
                     "(rehearsal); validation uses your pairs only."), None
