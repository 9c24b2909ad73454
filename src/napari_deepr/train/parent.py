"""Which model a training run starts from: the bundled model whose card matches the dataset.

A Deep-R model is only valid for the optics it was trained on, and a user's dataset is small, so
``deepr train`` fine-tunes by default. This module (torch-free, so front ends may use it) decides
from what:

* :func:`choose_parent` -- the bundled model whose card matches the dataset: same modality, same
  channels, pixel size within :data:`PIXEL_TOLERANCE` (10 %), and the dataset's defocus range inside
  the model's. None when nothing matches (the run then starts from scratch and says why).
* :func:`resolve_parent` -- ``--init-from NAME|PATH``: a model name on the model search path
  (bundled, ``$DEEPR_HOME/models``, ``$DEEPR_MODELS_PATH``), a model folder, a ``generator.onnx`` or a
  trainer checkpoint, from any working directory.
* :func:`check_parent` -- the optics of an explicitly chosen parent against the dataset: one-sentence
  refusals (channels, pixel size off by more than :data:`PIXEL_REFUSE_RATIO`) and warnings
  (pixel size beyond 10 %, another modality, a wider range, another NA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.contract import CARD_FILE, GENERATOR_FILE
from .data import DatasetError

PIXEL_TOLERANCE = 0.10
"""Relative pixel-size difference within which a bundled model is chosen automatically."""

PIXEL_REFUSE_RATIO = 2.0
"""A parent whose pixel size differs by more than this factor is refused: its features are tuned to
structures at another scale, so starting from it is worse than from scratch."""


@dataclass
class Parent:
    """The model a run starts from.

    Attributes
    ----------
    weights : Path
        Model folder, ``.onnx`` file or checkpoint holding the weights.
    name : str
        Model name (card name, or the file's stem).
    card : dict
        The parent's ``model.json`` (empty for a bare checkpoint).
    auto : bool
        Chosen automatically (not named with ``--init-from``).
    warnings : list of str
        Sentences about optics that differ.
    """

    weights: Path
    name: str
    card: dict = field(default_factory=dict)
    auto: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def dpm_target(self) -> str | None:
        """``"signed"`` or ``"magnitude"`` as the parent's card says (None when unknown)."""
        t = self.card.get("dpm_target")
        if t in ("signed", "magnitude"):
            return t
        if "dpm_sign_meaningful" in self.card:
            return "signed" if self.card["dpm_sign_meaningful"] else "magnitude"
        return None

    @property
    def range_um(self) -> float | None:
        r = self.card.get("defocus_range_um")
        return float(max(abs(float(v)) for v in r)) if r else None


def _dataset_facts(info: dict, modality: str | None) -> dict:
    optics = info.get("optics") or {}
    return {
        "pixel_size_um": optics.get("pixel_size_um"),
        "na": optics.get("na"),
        "modality": (info.get("modality") or optics.get("modality") or modality or "").strip().lower() or None,
        "range_um": float(info.get("range_um") or 0.0),
    }


def mismatches(card: dict, info: dict, modality: str | None) -> tuple[list[str], list[str]]:
    """Refusals and warnings for starting a run on ``info``'s data from a model with ``card``.

    Parameters
    ----------
    card : dict
        The parent's ``model.json``.
    info : dict
        The data source's ``info`` (``optics``, ``range_um``, ``modality``).
    modality : str, optional
        The run's ``--modality`` (used when the dataset records none).

    Returns
    -------
    refusals, warnings : list of str
        One sentence each; the run may start only when ``refusals`` is empty.
    """
    d = _dataset_facts(info, modality)
    name = card.get("name", "the parent model")
    refuse, warn = [], []
    data_ch = int(info.get("channels", 1) or 1)
    if int(card.get("channels", 1)) != data_ch:
        refuse.append(f"{name} takes {card.get('channels')} channel(s) but the dataset has {data_ch}; "
                      "choose a model with the same channels or use --from-scratch.")
    px, ppx = d["pixel_size_um"], card.get("pixel_size_um")
    if px and ppx:
        ratio = max(px, ppx) / min(px, ppx)
        if ratio > PIXEL_REFUSE_RATIO:
            refuse.append(
                f"{name} was trained at {ppx:g} µm pixels but the dataset has {px:g} µm ({ratio:.1f}x apart), so its "
                "features do not fit; rebuild the pairs at its sampling (deepr pairs --pixel-size-out "
                f"{ppx:g}), choose another --init-from, or use --from-scratch."
            )
        elif ratio - 1 > PIXEL_TOLERANCE:
            warn.append(
                f"{name} was trained at {ppx:g} µm pixels and the dataset has {px:g} µm ({100 * (ratio - 1):.0f} % apart); "
                f"the fine-tuned model is for {px:g} µm and must relearn the scale; rebuilding the pairs at "
                f"{ppx:g} µm (deepr pairs --pixel-size-out {ppx:g}) keeps the parent's scale."
            )
    elif ppx and not px:
        warn.append(f"The dataset does not record its pixel size, so it could not be checked against {name}'s {ppx:g} µm.")
    pm = str(card.get("modality") or "").strip().lower()
    if pm and d["modality"] and pm != d["modality"]:
        warn.append(f"{name} is for {pm} but the dataset is {d['modality']}; the fine-tuned model is for {d['modality']}.")
    prange = max((abs(float(v)) for v in card.get("defocus_range_um") or []), default=None)
    if prange is not None and d["range_um"] > prange + 1e-6:
        warn.append(f"The dataset spans ±{d['range_um']:g} µm, wider than {name}'s ±{prange:g} µm.")
    na, pna = d["na"], card.get("na")
    if na and pna and abs(na - pna) / pna > PIXEL_TOLERANCE:
        warn.append(f"{name} was trained for NA {pna:g} and the dataset says NA {na:g}.")
    return refuse, warn


def scale_ratio(card: dict, info: dict) -> float | None:
    """Dataset ÷ model pixel size when the engine would resample for this model (beyond its 5 %
    tolerance), else None (equal, or either unknown).

    The trainer scores a parent at this ratio, as the engine would run it on the dataset's images.
    """
    from ..engine.domain import scale_mismatch

    return scale_mismatch((info.get("optics") or {}).get("pixel_size_um"), card.get("pixel_size_um"))


def matches(card: dict, info: dict, modality: str | None) -> bool:
    """Whether a model may be chosen automatically for this data (see the module docstring)."""
    d = _dataset_facts(info, modality)
    px, ppx = d["pixel_size_um"], card.get("pixel_size_um")
    prange = max((abs(float(v)) for v in card.get("defocus_range_um") or []), default=0.0)
    pm = str(card.get("modality") or "").strip().lower()
    return bool(
        int(card.get("channels", 1)) == int(info.get("channels", 1) or 1)
        and px and ppx and abs(px - ppx) / ppx <= PIXEL_TOLERANCE
        and (not d["modality"] or not pm or pm == d["modality"])
        and d["range_um"] <= prange + 1e-6
    )


def choose_parent(info: dict, modality: str | None) -> tuple[Parent | None, str]:
    """The bundled model that matches the dataset, or None with a sentence saying why none does.

    Parameters
    ----------
    info : dict
        The data source's ``info``.
    modality : str, optional
        The run's ``--modality``.

    Returns
    -------
    parent : Parent or None
    note : str
        What was chosen, or why nothing was.
    """
    from ..engine.model import bundled_models_dir, load_model

    root = bundled_models_dir()
    cards = []
    for sub in sorted(root.iterdir()) if root is not None and root.is_dir() else []:
        if (sub / GENERATOR_FILE).is_file():
            try:
                m = load_model(sub)
            except Exception:  # noqa: BLE001 - a broken bundled folder must not stop training
                continue
            cards.append((sub, m.card.to_dict()))
    d = _dataset_facts(info, modality)
    for sub, card in cards:
        if matches(card, info, modality):
            return Parent(sub, card.get("name", sub.name), card, auto=True), (
                f"Fine-tuning from the bundled model {card.get('name', sub.name)} (its card matches the dataset: "
                f"{card.get('modality')}, {card.get('pixel_size_um'):g} µm pixels, ±{max(abs(v) for v in card['defocus_range_um']):g} µm)."
            )
    if not cards:
        return None, "No bundled model is installed, so training starts from scratch."
    if not d["pixel_size_um"]:
        why = "the dataset does not record its pixel size"
    else:
        why = "; ".join(
            f"{c.get('name')} is for {c.get('pixel_size_um'):g} µm pixels, {c.get('modality')}, "
            f"±{max(abs(v) for v in c['defocus_range_um']):g} µm"
            for _, c in cards
        ) + f", the dataset has {d['pixel_size_um']:g} µm, {d['modality'] or 'unknown modality'}, ±{d['range_um']:g} µm"
    names = ", ".join(c.get("name", s.name) for s, c in cards)
    return None, (f"No bundled model matches the dataset ({why}), so training starts from scratch; "
                  f"pass --init-from {names.split(', ')[0]} to fine-tune anyway.")


def resolve_parent(spec: str | os.PathLike) -> Parent:
    """The parent named by ``--init-from`` (model name, folder, ``.onnx`` or checkpoint).

    Raises
    ------
    DatasetError
        In one sentence, when nothing of that name or path exists.
    """
    import json

    p = Path(spec).expanduser()
    if p.suffix in (".pt", ".pth"):
        if not p.is_file():
            raise DatasetError(f"There is no checkpoint at {p}.")
        card: dict = {}
        cand = p.parent / CARD_FILE
        if cand.is_file():
            try:
                card = json.loads(cand.read_text())
            except (OSError, ValueError):
                card = {}
        return Parent(p.resolve(), card.get("name", p.stem), card)
    from ..engine.model import load_model
    from ..errors import DeepRError

    try:
        m = load_model(p if p.exists() else str(spec))
    except DeepRError as exc:
        if p.exists():
            raise DatasetError(f"There is no {GENERATOR_FILE} or checkpoint at {p} ({str(exc).splitlines()[0]})") from exc
        raise DatasetError(f"There is no model named {spec} and no {GENERATOR_FILE} or checkpoint at that path "
                           f"({str(exc).splitlines()[0].rstrip('.')}).") from exc
    weights = Path(m.generator_path).parent if Path(m.generator_path).name == GENERATOR_FILE else Path(m.generator_path)
    return Parent(weights, m.card.name, m.card.to_dict())
