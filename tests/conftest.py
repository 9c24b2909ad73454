import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DEEPR_HOME", str(Path(__file__).parent / ".deepr_home_unused"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from onnx_builders import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def real_data_dir():
    d = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
    if not d.is_dir():
        pytest.skip("../shared/data/real is not present")
    return d


@pytest.fixture(scope="module")
def bundled_copy(tmp_path_factory):
    """The bundled model's fp32 files in a scratch folder (variants are written beside them)."""
    d = tmp_path_factory.mktemp("bundled") / "deepr-fluo-20x"
    d.mkdir()
    src = Path(__file__).resolve().parents[1] / "models" / "deepr-fluo-20x"
    for f in ("generator.onnx", "dpm.onnx", "model.json"):
        shutil.copy(src / f, d / f)
    return d
