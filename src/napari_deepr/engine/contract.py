"""File and tensor names that the engine, the trainer, the scripts and the front ends agree on.

Each name is written here once; everything else imports it. This module imports nothing, so the
lowest layers (``io``) and the front ends may use it without pulling in onnx, torch or Qt.

A **model folder** (``docs/ARCHITECTURE.md``)::

    MODEL/
      generator.onnx            GENERATOR_FILE     (required)
      dpm.onnx                  DPM_FILE           (optional DPM decoder)
      model.json                CARD_FILE          (the ModelCard; also in the ONNX metadata)
      generator.int8.onnx       INT8_GENERATOR_FILE  (``deepr quantize``)
      <stem>.fp16.onnx          fp16_name(stem)    (GPU providers; made on first use)
      <precision>_quality.json  quality_name(precision)  (measured cost of a precision variant)
      quality.json              QUALITY_FILE       (held-out quality table, scripts/evaluate_model.py)
      MODEL_CARD.md             CARD_MD_FILE       (the card for people)
      train_config.json         TRAIN_CONFIG_FILE  (how a bundled model was trained)
      training_summary.json     TRAINING_SUMMARY_FILE

A **training run** folder adds ``checkpoint.pt``, ``best.pt``, ``previews/``, ``.graphs/`` and the
stop file ``STOP``; a **pairs dataset** is a folder with ``index.json``.
"""

from __future__ import annotations

# -- model folder ------------------------------------------------------------------------------------
GENERATOR_FILE = "generator.onnx"
DPM_FILE = "dpm.onnx"
CARD_FILE = "model.json"
INT8_GENERATOR_FILE = "generator.int8.onnx"
FP16_SUFFIX = ".fp16.onnx"
QUALITY_FILE = "quality.json"
QUALITY_SUFFIX = "_quality.json"
CARD_MD_FILE = "MODEL_CARD.md"
TRAIN_CONFIG_FILE = "train_config.json"
TRAINING_SUMMARY_FILE = "training_summary.json"

# -- ONNX graphs -------------------------------------------------------------------------------------
INPUT_NAME = "input"
"""The generator's one input, float32 ``[N, C, H, W]``."""
OUTPUT_NAME = "output"
"""The generator's refocused output (z-scored units)."""
FEATURE_PREFIX = "feat"
"""Generator outputs ``feat0 .. featK`` that the DPM decoder takes as inputs."""
DPM_OUTPUT_NAME = "dpm"
"""The DPM decoder's output ``[N, 1, H, W]`` in micrometres."""
META_PREFIX = "deepr."
"""Key prefix of the card's fields in the ONNX ``metadata_props`` (JSON-encoded values)."""

# -- training run and dataset --------------------------------------------------------------------------
CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"
STOP_FILE = "STOP"
GRAPHS_DIR = ".graphs"
PREVIEWS_DIR = "previews"
PAIRS_INDEX_FILE = "index.json"


def fp16_name(stem: str) -> str:
    """File name of the float16 copy of the graph ``stem`` (``"generator"`` -> ``generator.fp16.onnx``)."""
    return f"{stem}{FP16_SUFFIX}"


def quality_name(precision: str) -> str:
    """File name of a precision variant's measured quality cost (``"int8"`` -> ``int8_quality.json``)."""
    return f"{precision}{QUALITY_SUFFIX}"


def feature_name(i: int) -> str:
    """Name of the generator's ``i``-th feature output (``feat0`` ...)."""
    return f"{FEATURE_PREFIX}{i}"
