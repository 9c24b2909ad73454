"""ONNX export of a trained Deep-R model folder: ``generator.onnx``, ``dpm.onnx`` and ``model.json``.

Contract (``docs/ARCHITECTURE.md``):

* ``generator.onnx`` -- input ``input`` float32 ``[N, C, H, W]`` with ``H`` and ``W`` multiples of 32
  (exported as ``32*h`` and ``32*w`` symbolic dims, batch dynamic); outputs ``output`` (refocused,
  z-scored units) and ``feat0 .. feat5`` (encoder skips and bottleneck).
* ``dpm.onnx`` -- inputs exactly ``feat0 .. feat5`` with the generator's shapes, output ``dpm``
  ``[N, 1, H, W]`` in micrometres (the scale is inside the graph), so the engine never runs the
  encoder twice.
* ``model.json`` is written by :class:`~napari_deepr.engine.model.ModelCard` (the one writer and
  reader of the card); every field of :meth:`~napari_deepr.engine.model.ModelCard.to_dict` is also
  written to both files' ``metadata_props`` with keys ``deepr.<field>`` and JSON-encoded values.

File and tensor names come from :mod:`napari_deepr.engine.contract`.

Both graphs come from ``torch.onnx.export(..., dynamo=True, external_data=False)`` (torch >= 2.5;
one self-contained file each, opset 18+). After writing, each file is checked in onnxruntime against
PyTorch on random inputs of two shapes, and the largest absolute difference is returned.

Tracing is the slow part (5-10 s per graph on 2 cores) and its duration is hard to predict, which
would break a wall-clock budget at the very end of a run. So a timed run traces the graphs once at
the start (:func:`trace_graphs`, into ``MODEL_DIR/.graphs/``) and :func:`export_model` later only
writes the trained weights into those graphs' initializers -- which the exporter names after the
PyTorch state dict -- and checks the result in onnxruntime as always; anything unexpected (a missing
or reshaped initializer, a check that fails) falls back to a fresh trace.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.contract import (
    DPM_FILE,
    DPM_OUTPUT_NAME,
    GENERATOR_FILE,
    GRAPHS_DIR,
    INPUT_NAME,
    META_PREFIX,
    OUTPUT_NAME,
    feature_name,
)
from ..engine.model import ModelCard, json_default
from .nets import LEVELS, TILE_MULTIPLE, DPMDecoder, Generator


def feature_names(n: int = LEVELS + 1) -> list[str]:
    """``["feat0", ..., "feat{n-1}"]``."""
    return [feature_name(i) for i in range(n)]


class _GeneratorGraph(nn.Module):
    """Generator returning ``(output, feat0, ..., feat5)`` as a flat tuple for export."""

    def __init__(self, generator: Generator) -> None:
        super().__init__()
        self.generator = generator

    # The argument is named after the graph's input: torch.export keys dynamic_shapes by argument name.
    def forward(self, input: torch.Tensor):  # noqa: A002
        out, feats = self.generator.forward_with_features(input)
        return (out, *feats)


class _DPMGraph(nn.Module):
    """DPM decoder with one named argument per feature (``LEVELS + 1 == 6``)."""

    def __init__(self, decoder: DPMDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, feat0, feat1, feat2, feat3, feat4, feat5):
        return self.decoder(feat0, feat1, feat2, feat3, feat4, feat5)


def _dims():
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    h = Dim("h", min=1, max=4096)
    w = Dim("w", min=1, max=4096)
    return batch, h, w


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_shapes: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            external_data=False,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    program.save(str(path))


def _set_metadata(path: Path, card: dict, extra: dict | None = None) -> None:
    import onnx

    model = onnx.load(str(path))
    props = {META_PREFIX + k: json.dumps(v, default=json_default) for k, v in card.items()}
    for k, v in (extra or {}).items():
        props[META_PREFIX + k] = json.dumps(v, default=json_default)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    model.producer_name = "napari-deepr"
    onnx.save(model, str(path))


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _cpu_copy(module: nn.Module) -> nn.Module:
    import copy

    m = copy.deepcopy(module).to("cpu", dtype=torch.float32, memory_format=torch.contiguous_format)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


GRAPHS = GRAPHS_DIR


def _distinct(module: nn.Module) -> nn.Module:
    """``module`` with every parameter set to distinct random values, for tracing a graph to fill later.

    The exporter's optimizer merges initializers of equal value and drops their names; an untrained
    generator's zero-initialized biases and output convolution were merged that way, so its traced
    graph could never be filled with trained weights (every export then traced afresh at the end).
    Only the graph is kept, so the values do not matter.
    """
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
    return module


def trace_graphs(generator: Generator, dpm_decoder: DPMDecoder | None, out_dir: str | os.PathLike) -> dict:
    """Trace the generator (and DPM) ONNX graphs into ``out_dir/.graphs/`` for a later :func:`export_model`.

    Returns
    -------
    dict
        ``{"folder": path, "seconds": {...}}``.
    """
    folder = Path(out_dir) / GRAPHS
    folder.mkdir(parents=True, exist_ok=True)
    g = _distinct(_cpu_copy(generator))
    names = feature_names(g.num_features)
    example = torch.randn(2, g.in_channels, 2 * TILE_MULTIPLE, 3 * TILE_MULTIPLE, generator=torch.Generator().manual_seed(0))
    batch, h, w = _dims()
    seconds = {}
    t0 = time.perf_counter()
    path = folder / GENERATOR_FILE
    tmp = _tmp(path)
    try:
        _export(_GeneratorGraph(g), (example,), tmp, [INPUT_NAME], [OUTPUT_NAME, *names],
                {INPUT_NAME: {0: batch, 2: TILE_MULTIPLE * h, 3: TILE_MULTIPLE * w}})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    seconds["generator"] = round(time.perf_counter() - t0, 2)
    if dpm_decoder is not None:
        t0 = time.perf_counter()
        d = _distinct(_cpu_copy(dpm_decoder))
        with torch.no_grad():
            feats = g.forward_with_features(example)[1]
        shapes = {n: {0: batch, 2: 2 ** (LEVELS - i) * h, 3: 2 ** (LEVELS - i) * w} for i, n in enumerate(names)}
        path = folder / DPM_FILE
        tmp = _tmp(path)
        try:
            _export(_DPMGraph(d), tuple(feats), tmp, names, [DPM_OUTPUT_NAME], shapes)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        seconds["dpm"] = round(time.perf_counter() - t0, 2)
    return {"folder": str(folder), "seconds": seconds}


def _fill(template: Path, graph: nn.Module, dest: Path) -> None:
    """Write ``template`` with its initializers replaced by ``graph``'s state dict into ``dest``.

    Raises
    ------
    ValueError
        When an initializer is missing or has another shape (the caller then traces afresh).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(template))
    state = {k: v.detach().cpu().float().numpy() for k, v in graph.state_dict().items()}
    seen = set()
    for init in model.graph.initializer:
        arr = state.get(init.name)
        if arr is None:
            continue
        if tuple(init.dims) != arr.shape:
            raise ValueError(f"{init.name} has shape {tuple(init.dims)} in the traced graph, {arr.shape} now")
        old = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array(arr.astype(old.dtype), init.name))
        seen.add(init.name)
    missing = set(state) - seen
    if missing:
        raise ValueError(f"the traced graph lacks {sorted(missing)[0]}")
    onnx.save(model, str(dest))


def _tmp(path: Path) -> Path:
    """A pid-named temporary beside ``path`` (io's scheme: removed at exit, and by the next export after kill -9)."""
    from .. import io

    io.clean_stale_partials(path)
    return io._temp_sibling(path)


def export_model(
    generator: Generator,
    dpm_decoder: DPMDecoder | None,
    out_dir: str | os.PathLike,
    card: ModelCard | dict[str, Any],
    *,
    check_shapes: tuple[tuple[int, int, int], ...] = ((1, 64, 96), (2, 96, 64)),
    seed: int = 0,
    graphs: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write ``generator.onnx``, ``dpm.onnx`` (when a decoder is given) and ``model.json``.

    Parameters
    ----------
    generator : Generator
        Trained generator (any device; a float32 CPU copy is exported).
    dpm_decoder : DPMDecoder or None
        Trained DPM decoder, or None to ship no ``dpm.onnx``.
    out_dir : path
        Model folder (created if needed). Files are written to temporary names and renamed.
    card : ModelCard or dict
        The model card (a dict is read with :meth:`ModelCard.from_dict`, so a bad field is refused
        before anything is written); written as ``model.json`` and stored as ONNX metadata.
    check_shapes : tuple of (N, H, W)
        Random inputs on which onnxruntime is compared with PyTorch (multiples of 32).
    seed : int
        Seed of the random check inputs.
    graphs : path, optional
        Folder written by :func:`trace_graphs`: fill its graphs with the weights instead of tracing.

    Returns
    -------
    dict
        Paths, export seconds per file, max abs error ORT vs torch per file, opset, and ``traced``
        (False when the pre-traced graphs were filled).
    """
    if not isinstance(card, ModelCard):
        card = ModelCard.from_dict(card, source="the exported card")
    if graphs is not None:
        try:
            return _export_model(generator, dpm_decoder, out_dir, card, check_shapes, seed, Path(graphs))
        except (ValueError, OSError) as exc:
            warnings.warn(f"The pre-traced ONNX graphs could not be reused ({exc}); tracing afresh.", stacklevel=2)
    return _export_model(generator, dpm_decoder, out_dir, card, check_shapes, seed, None)


def _export_model(generator, dpm_decoder, out_dir, model_card: ModelCard, check_shapes, seed,
                  graphs: Path | None) -> dict[str, Any]:
    card = model_card.to_dict()  # the same fields go into the ONNX metadata and model.json
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = _cpu_copy(generator)
    names = feature_names(g.num_features)
    channels = g.in_channels
    result: dict[str, Any] = {"seconds": {}, "max_abs_error": {}}
    rng = torch.Generator().manual_seed(seed)
    example = torch.randn(2, channels, 2 * TILE_MULTIPLE, 3 * TILE_MULTIPLE, generator=rng)
    batch, h, w = _dims()

    gen_path = out / GENERATOR_FILE
    tmp = _tmp(gen_path)
    t0 = time.perf_counter()
    try:
        if graphs is not None:
            _fill(graphs / GENERATOR_FILE, _GeneratorGraph(g), tmp)
        else:
            _export(
                _GeneratorGraph(g), (example,), tmp, [INPUT_NAME], [OUTPUT_NAME, *names],
                {INPUT_NAME: {0: batch, 2: TILE_MULTIPLE * h, 3: TILE_MULTIPLE * w}},
            )
        _set_metadata(tmp, card, {"role": "generator", "feature_names": names})
        os.replace(tmp, gen_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    result["seconds"]["generator"] = round(time.perf_counter() - t0, 2)
    result["generator"] = str(gen_path)

    dpm_path = None
    if dpm_decoder is not None:
        d = _cpu_copy(dpm_decoder)
        with torch.no_grad():
            feats = g.forward_with_features(example)[1]
        shapes = {}
        for i, name in enumerate(names):
            scale = 2 ** (LEVELS - i)
            shapes[name] = {0: batch, 2: scale * h, 3: scale * w}
        dpm_path = out / DPM_FILE
        tmp = _tmp(dpm_path)
        t0 = time.perf_counter()
        try:
            if graphs is not None:
                _fill(graphs / DPM_FILE, _DPMGraph(d), tmp)
            else:
                _export(_DPMGraph(d), tuple(feats), tmp, names, [DPM_OUTPUT_NAME], shapes)
            _set_metadata(tmp, card, {"role": "dpm", "feature_names": names})
            os.replace(tmp, dpm_path)
        finally:
            if tmp.exists():
                tmp.unlink()
        result["seconds"]["dpm"] = round(time.perf_counter() - t0, 2)
        result["dpm"] = str(dpm_path)

    # model.json last: a folder with a card always has its networks.
    result["model_json"] = str(model_card.write(out))

    result["max_abs_error"] = verify_export(g, dpm_decoder and _cpu_copy(dpm_decoder), gen_path, dpm_path,
                                            check_shapes, seed)
    result["traced"] = graphs is None
    if graphs is not None and max(result["max_abs_error"].values()) > 1e-3:
        raise ValueError(f"the filled graphs differ from PyTorch by {max(result['max_abs_error'].values()):.2g}")
    import onnx

    result["opset"] = int(next(o.version for o in onnx.load(str(gen_path), load_external_data=False).opset_import
                               if o.domain in ("", "ai.onnx")))
    result["size_mb"] = {"generator": round(gen_path.stat().st_size / 2**20, 2)}
    if dpm_path is not None:
        result["size_mb"]["dpm"] = round(dpm_path.stat().st_size / 2**20, 2)
    return result


def verify_export(generator: Generator, dpm_decoder: DPMDecoder | None, gen_path: str | os.PathLike,
                  dpm_path: str | os.PathLike | None,
                  shapes: tuple[tuple[int, int, int], ...] = ((1, 64, 96), (2, 96, 64)),
                  seed: int = 0) -> dict[str, float]:
    """Largest absolute difference between onnxruntime and PyTorch on random inputs.

    The DPM session is fed the generator *session's* feature outputs, exactly as the engine does.

    Parameters
    ----------
    generator, dpm_decoder : nn.Module
        The float32 CPU models that were exported.
    gen_path, dpm_path : path
        The ONNX files.
    shapes : tuple of (N, H, W)
        Input shapes to try.
    seed : int
        Seed of the random inputs.

    Returns
    -------
    dict
        ``{"generator": err, "features": err, "dpm": err}`` (``dpm`` only with a decoder).
    """
    rng = np.random.default_rng(seed)
    gen_sess = _session(Path(gen_path))
    dpm_sess = _session(Path(dpm_path)) if dpm_path is not None else None
    names = [o.name for o in gen_sess.get_outputs()]
    errs = {"generator": 0.0, "features": 0.0}
    if dpm_sess is not None:
        errs["dpm"] = 0.0
    for n, hh, ww in shapes:
        x = rng.standard_normal((n, generator.in_channels, hh, ww)).astype(np.float32)
        outs = dict(zip(names, gen_sess.run(None, {INPUT_NAME: x})))
        with torch.no_grad():
            ref, feats = generator.forward_with_features(torch.from_numpy(x))
        errs["generator"] = max(errs["generator"], float(np.abs(outs[OUTPUT_NAME] - ref.numpy()).max()))
        for i, f in enumerate(feats):
            errs["features"] = max(errs["features"], float(np.abs(outs[feature_name(i)] - f.numpy()).max()))
        if dpm_sess is not None:
            feed = {i.name: outs[i.name] for i in dpm_sess.get_inputs()}
            dpm = dpm_sess.run([DPM_OUTPUT_NAME], feed)[0]
            with torch.no_grad():
                ref_dpm = dpm_decoder(*feats).numpy()
            errs["dpm"] = max(errs["dpm"], float(np.abs(dpm - ref_dpm).max()))
    return errs
