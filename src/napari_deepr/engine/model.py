"""Deep-R models: the model folder, its card, validation and discovery.

A model is a folder holding ``generator.onnx``, an optional ``dpm.onnx`` and ``model.json`` (the file
names are in :mod:`.contract`). The same card also sits in the generator's ONNX ``metadata_props``
(keys ``deepr.<field>``, JSON values), so a lone ``.onnx`` file loads with its facts.

:class:`ModelCard` is the one reader and writer of ``model.json``: the engine loads cards through
:meth:`ModelCard.from_dict`, and the trainer and the scripts build theirs as a ``ModelCard`` and
write them with :meth:`ModelCard.write`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .contract import CARD_FILE, DPM_FILE, FEATURE_PREFIX, GENERATOR_FILE, META_PREFIX, OUTPUT_NAME
from .normalization import INPUT_MEAN_STD, ZSCORE_PER_PLANE, check_card

DEFAULT_MODEL = "deepr-fluo-20x"
# META_PREFIX and FEATURE_PREFIX are defined in .contract and stay importable from here.
DPM_TARGETS = ("signed", "magnitude")
#: Largest border halo a card may ask for (px): a halo needs at most about the network's
#: receptive-field radius (223 px for the bundled U-Net; the bundled models use 16).
MAX_HALO = 1024


@dataclass
class ModelCard:
    """The facts a model must carry so that it is used only where it is valid.

    Attributes mirror ``model.json``; unknown keys are kept in ``extra`` and written back as they
    were. ``normalization`` and ``output_scaling`` say how the engine feeds the network and maps
    its output back (:mod:`.normalization`); a card naming anything else is refused when loaded.
    ``dpm_target`` is ``"signed"`` or ``"magnitude"`` (what the DPM decoder reports; None: not
    recorded, read as signed), ``has_dpm`` whether the trainer shipped a DPM decoder,
    ``architecture`` the network's width and size, ``versions`` the software that made it.
    """

    name: str = "unnamed"
    version: str = "0.0.0"
    modality: str = "unknown"
    channels: int = 1
    pixel_size_um: float | None = None
    na: float | None = None
    wavelength_um: float | None = None
    immersion_index: float | None = None
    defocus_range_um: tuple[float, float] = (-5.0, 5.0)
    normalization: str = ZSCORE_PER_PLANE
    output_scaling: str = INPUT_MEAN_STD
    tile_multiple: int = 32
    min_size: int = 32
    tile: int = 1024
    overlap: int = 96
    halo: int = 16
    dpm_sign: str = "positive = the focal plane lies above the sample"
    dpm_sign_meaningful: bool = False
    dpm_target: str | None = None
    has_dpm: bool | None = None
    architecture: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def dpm_magnitude(self) -> bool:
        """Whether the DPM decoder reports |defocus| (``"dpm_target": "magnitude"``) rather than signed defocus."""
        return self.dpm_target == "magnitude"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = CARD_FILE) -> ModelCard:
        """Build a card from ``model.json`` content, keeping unknown keys in ``extra``.

        Raises
        ------
        ModelError
            When a field has the wrong type or an impossible value (a text pixel size, a one-element
            defocus range, a negative tile), or names a normalization or output scaling the engine
            does not apply, in one sentence naming the field.
        """
        if not isinstance(d, dict):
            raise ModelError(f"{source} must hold a JSON object, not {type(d).__name__}.")
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in d.items() if k in names and k != "extra"}
        extra = {k: v for k, v in d.items() if k not in names}
        more = d.get("extra", {}) or {}
        if not isinstance(more, dict):
            raise ModelError(f"{source}: 'extra' must be an object.")
        extra.update(more)

        def bad(key, what):
            return ModelError(f"{source}: '{key}' must be {what}, not {known[key]!r}.")

        for key in ("name", "version", "modality", "normalization", "output_scaling", "dpm_sign"):
            if key in known:
                if isinstance(known[key], (int, float)) and not isinstance(known[key], bool) and key == "version":
                    known[key] = str(known[key])
                if not isinstance(known[key], str):
                    raise bad(key, "text")
        if "name" in known and not known["name"].strip():
            raise bad("name", "a non-empty name")
        for key in ("pixel_size_um", "na", "wavelength_um", "immersion_index"):
            if key in known and known[key] is not None:
                v = known[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    raise bad(key, "a positive number or null")
                known[key] = float(v)
        for key, lo in (("channels", 1), ("tile_multiple", 1), ("min_size", 1), ("tile", 1), ("overlap", 0), ("halo", 0)):
            if key in known:
                v = known[key]
                if isinstance(v, float) and v.is_integer():
                    v = int(v)
                if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                    raise bad(key, f"a whole number of at least {lo}")
                known[key] = v
        halo, tile = known.get("halo", cls.halo), known.get("tile", cls.tile)
        if halo > min(MAX_HALO, tile // 2):  # a huge halo only multiplies tiles of reflected pixels
            raise ModelError(f"{source}: 'halo' must be a whole number of pixels from 0 to {min(MAX_HALO, tile // 2)} "
                             f"({MAX_HALO} at most, and at most half the card's tile of {tile}), not {halo!r}.")
        if "dpm_sign_meaningful" in known and not isinstance(known["dpm_sign_meaningful"], bool):
            raise bad("dpm_sign_meaningful", "true or false")
        if known.get("has_dpm") is not None and not isinstance(known["has_dpm"], bool):
            raise bad("has_dpm", "true, false or null")
        if known.get("dpm_target") is not None and known["dpm_target"] not in DPM_TARGETS:
            raise bad("dpm_target", "signed, magnitude or null")
        for key in ("architecture", "provenance", "quality", "config", "versions"):
            if key in known and not isinstance(known[key], dict):
                raise bad(key, "an object")
        if "defocus_range_um" in known:
            r = known["defocus_range_um"]
            if isinstance(r, (int, float)) and not isinstance(r, bool):
                r = (-abs(float(r)), abs(float(r)))
            if (not isinstance(r, (list, tuple)) or len(r) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in r)
                    or not r[0] < r[1]):
                raise bad("defocus_range_um", "two numbers [low, high] with low < high")
            known["defocus_range_um"] = (float(r[0]), float(r[1]))
        card = cls(**known, extra=extra)
        check_card(card.normalization, card.output_scaling, source)
        return card

    def to_dict(self) -> dict[str, Any]:
        """``model.json`` content (``extra`` keys at the top level, as they were read)."""
        d = asdict(self)
        d["defocus_range_um"] = list(self.defocus_range_um)
        extra = d.pop("extra")
        d.update(extra)
        return d

    def to_json(self) -> str:
        """``model.json`` text: :meth:`to_dict` as indented JSON (numpy values as plain numbers)."""
        return json.dumps(self.to_dict(), indent=1, default=json_default) + "\n"

    def write(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/model.json`` atomically (a pid-named temporary, then a rename) after validating.

        The card is checked with :meth:`from_dict` first, so a card with a bad field is never
        written; returns the path.
        """
        text = self.to_json()
        ModelCard.from_dict(json.loads(text), source=f"the card of {self.name}")
        from .._safety import (
            atomic_path,  # pid-named: removed at exit, and by the next write after kill -9
        )

        path = Path(folder) / CARD_FILE
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        return path

    def summary(self) -> str:
        """One line: modality, optics, pixel size and trained range."""
        parts = [self.modality]
        if self.na:
            parts.append(f"NA {self.na:g}")
        if self.wavelength_um:
            parts.append(f"λ {self.wavelength_um * 1000:.0f} nm")
        if self.pixel_size_um:
            parts.append(f"{self.pixel_size_um:g} µm/px")
        lo, hi = self.defocus_range_um
        parts.append(f"defocus {lo:+g}…{hi:+g} µm")
        parts.append(f"{self.channels} channel" + ("s" if self.channels != 1 else ""))
        return ", ".join(parts)


@dataclass
class DeepRModel:
    """A validated model: paths, card and the ONNX input/output names the engine uses."""

    card: ModelCard
    generator_path: Path
    dpm_path: Path | None
    input_name: str
    output_name: str
    feature_names: tuple[str, ...]
    root: Path
    location: Path | None = None  # what load_model resolved: the folder or the lone .onnx file

    @property
    def name(self) -> str:
        """The model's name from its card."""
        return self.card.name

    @property
    def has_dpm(self) -> bool:
        """Whether a DPM decoder is available."""
        return self.dpm_path is not None


def bundled_models_dir() -> Path | None:
    """The ``models/`` folder shipped with the package (wheel) or at the repository root (source)."""
    here = Path(__file__).resolve().parent.parent
    for cand in (here / "models", here.parent.parent / "models"):
        if cand.is_dir():
            return cand
    return None


def user_models_dir() -> Path:
    """Where user-trained models are looked up by name (``$DEEPR_HOME/models``)."""
    home = Path(os.environ.get("DEEPR_HOME", Path.home() / ".napari-deepr"))
    return home / "models"


def model_search_path() -> list[Path]:
    """Folders searched for models by name: ``$DEEPR_MODELS_PATH``, the user folder, bundled models."""
    out = [Path(p) for p in os.environ.get("DEEPR_MODELS_PATH", "").split(os.pathsep) if p]
    out.append(user_models_dir())
    b = bundled_models_dir()
    if b is not None:
        out.append(b)
    return out


def json_default(o: Any):
    """``json.dumps`` fallback for numpy scalars and arrays and paths found in cards and events."""
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _is_model_folder(p: Path) -> bool:
    return p.is_dir() and (p / GENERATOR_FILE).is_file()


def list_models() -> list[DeepRModel]:
    """Every loadable model on the search path (bundled ones last), each validated.

    Folders that fail validation are skipped with a warning, so one broken model never hides the others.
    """
    seen: set[str] = set()
    out = []
    for root in model_search_path():
        try:
            subs = sorted(root.iterdir()) if root.is_dir() else []
        except OSError as exc:
            warnings.warn(f"The model folder {root} cannot be listed ({exc.strerror or exc}).", stacklevel=2)
            continue
        for sub in subs:
            if not _is_model_folder(sub) or sub.name in seen:
                continue
            try:
                out.append(load_model(sub))
                seen.add(sub.name)
            except ModelError as exc:
                warnings.warn(str(exc), stacklevel=2)
            except Exception as exc:  # noqa: BLE001 - one unreadable folder must not hide every other model
                warnings.warn(f"{sub} was skipped ({type(exc).__name__}: {exc}).", stacklevel=2)
    return out


def _resolve(name_or_path: str | os.PathLike) -> Path:
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p.resolve()
    name = str(name_or_path)
    if name == "default":
        name = DEFAULT_MODEL
    for root in model_search_path():
        cand = root / name
        if _is_model_folder(cand):
            return cand.resolve()
    known = ", ".join(m.name for m in list_models()) or "none installed"
    if name == DEFAULT_MODEL:
        raise ModelError(
            f"The bundled default model '{DEFAULT_MODEL}' is not installed; pass a model folder or .onnx file (known models: {known})."
        )
    raise ModelError(f"No model named or at '{name_or_path}' (known models: {known}).")


def load_model(name_or_path: str | os.PathLike | DeepRModel = "default") -> DeepRModel:
    """Find, read and validate a Deep-R model.

    Parameters
    ----------
    name_or_path : str, Path or DeepRModel
        ``"default"``, a model name on the search path, a model folder, or a lone generator ``.onnx``.

    Returns
    -------
    DeepRModel

    Raises
    ------
    ModelError
        With one sentence saying what is wrong (missing, not ONNX, wrong inputs, DPM mismatch).
    """
    if isinstance(name_or_path, DeepRModel):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):
        from ..errors import ArgumentTypeError

        raise ArgumentTypeError(f"A model is a name, folder or .onnx path, not {type(name_or_path).__name__}.")
    if not str(name_or_path).strip():
        raise ModelError("The model name is empty; pass a model name, folder or .onnx file.")
    path = _resolve(name_or_path)
    st = path.stat()
    return _load_cached(str(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=16)
def _load_cached(path_str: str, _mtime: int, _size: int) -> DeepRModel:
    path = Path(path_str)
    if path.is_dir():
        gen = path / GENERATOR_FILE
        if not gen.is_file():
            raise ModelError(f"The folder {path.name} holds no {GENERATOR_FILE}, so it is not a Deep-R model.")
        dpm = path / DPM_FILE
        dpm_path = dpm if dpm.is_file() else None
        card_file = path / CARD_FILE
        root = path
    else:
        gen, dpm_path, card_file, root = path, None, None, path.parent
    gen_info = _inspect_onnx(gen)
    card_dict = dict(gen_info["meta"])
    if card_file is not None and card_file.is_file():
        try:
            loaded = json.loads(card_file.read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"{card_file} is not valid JSON ({exc.msg} at line {exc.lineno}).") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"{card_file} cannot be read ({exc}).") from exc
        if not isinstance(loaded, dict):
            raise ModelError(f"{card_file} must hold a JSON object, not {type(loaded).__name__}.")
        card_dict.update(loaded)
    if "name" not in card_dict:
        card_dict["name"] = path.stem if path.is_file() else path.name
    card = ModelCard.from_dict(card_dict, source=str(card_file) if card_file is not None and card_file.is_file() else gen.name)
    inp = gen_info["inputs"]
    if len(inp) != 1:
        raise ModelError(f"{gen.name} has {len(inp)} inputs; a Deep-R generator takes exactly one image tensor.")
    in_name, in_type, in_shape = inp[0]
    if in_type != 1:
        raise ModelError(f"{gen.name} takes {_TYPE_NAMES.get(in_type, in_type)} input; a Deep-R generator takes float32.")
    if len(in_shape) != 4:
        raise ModelError(f"{gen.name} takes a {len(in_shape)}-D input; a Deep-R generator takes NCHW (4-D).")
    ch = in_shape[1]
    if isinstance(ch, int) and ch > 0:
        if "channels" in card_dict and card.channels != ch:
            raise ModelError(f"{gen.name} takes {ch} channels but its card says {card_dict['channels']}.")
        card.channels = ch
    if card.tile_multiple <= 0 or card.tile % card.tile_multiple:
        raise ModelError(f"The card of {card.name} has tile {card.tile} that is not a multiple of {card.tile_multiple}.")
    outs = gen_info["outputs"]
    out_names = [o[0] for o in outs]
    output_name = OUTPUT_NAME if OUTPUT_NAME in out_names else out_names[0]
    feats = tuple(n for n in out_names if n.startswith(FEATURE_PREFIX))
    if dpm_path is not None:
        dpm_info = _inspect_onnx(dpm_path)
        needed = [i[0] for i in dpm_info["inputs"]]
        missing = [n for n in needed if n not in feats]
        if missing:
            raise ModelError(
                f"{DPM_FILE} of {card.name} needs inputs {missing} that {GENERATOR_FILE} does not output, so it cannot reuse the generator's features."
            )
        feats = tuple(needed)
    return DeepRModel(card, gen, dpm_path, in_name, output_name, feats, root, path)


_TYPE_NAMES = {1: "float32", 10: "float16", 11: "float64", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 16: "bfloat16"}


def _inspect_onnx(path: Path) -> dict:
    """Inputs, outputs and ``deepr.*`` metadata of an ONNX file, without loading weights into a session."""
    import onnx

    if not path.is_file():
        raise ModelError(f"{path} does not exist.")
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others for non-ONNX bytes
        raise ModelError(f"{path.name} is not a valid ONNX model (it could not be parsed).") from exc
    if not m.graph.node:
        raise ModelError(f"{path.name} is not a valid ONNX model (its graph is empty).")
    inits = {i.name for i in m.graph.initializer}

    def desc(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        return (v.name, t.elem_type, dims)

    meta = {}
    for p in m.metadata_props:
        if p.key.startswith(META_PREFIX):
            key = p.key[len(META_PREFIX):]
            try:
                meta[key] = json.loads(p.value)
            except json.JSONDecodeError:
                meta[key] = p.value
    return {
        "inputs": [desc(v) for v in m.graph.input if v.name not in inits],
        "outputs": [desc(v) for v in m.graph.output],
        "meta": meta,
    }
