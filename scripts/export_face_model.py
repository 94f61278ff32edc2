"""Export MediaPipe's BlazeFace short-range face detector from TFLite to ONNX and check it.

Run once, by hand, in a separate venv; batchtag itself only needs onnxruntime::

    python3 -m venv .venv-export-faces
    .venv-export-faces/bin/pip install tflite2onnx==0.4.1 ai-edge-litert==2.3.0 onnx \\
        onnxruntime numpy Pillow
    .venv-export-faces/bin/python scripts/export_face_model.py

Steps:

1. ``pip download mediapipe==0.10.14 --no-deps`` into a temporary directory (the last wheels
   that ship the face detectors as files) and unzip
   ``mediapipe/modules/face_detection/face_detection_short_range.tflite`` and the wheel's
   licence; the .tflite's sha256 is checked against the one recorded here;
2. convert it with ``tflite2onnx`` (NHWC TFLite graph to an NCHW ONNX graph, float16 weights
   widened to float32), then make the batch dimension dynamic (the converter pins it to 1) and
   add metadata; write ``batchtag/taggers/data/blazeface_short_range.onnx``;
3. parity: the TFLite interpreter (``ai-edge-litert``) against ONNX Runtime on fixed inputs
   (a seeded random image and the example photos as ``batchtag/taggers/faces.py`` prepares
   them); max abs differences of the raw scores and box regressions are asserted, and the
   detector's decoded faces on each example photo are printed;
4. the inputs and the TFLite outputs are saved to ``tests/data/blazeface_parity.npz``, so the
   test suite can check the committed ONNX file against the TFLite source without a TFLite
   runtime (which batchtag does not depend on).

Why only the short-range model: the full-range and pose detectors in the same wheel store
their weights sparse (TFLite DENSIFY), which tflite2onnx cannot convert. The short-range model
on the whole photo sees faces down to about 12 % of the photo's longer side, which covers
portraits and small groups; the limits are measured in ``batchtag/taggers/data/people.toml``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
FACES_PY = REPO / "batchtag" / "taggers" / "faces.py"
DEFAULT_OUTPUT = REPO / "batchtag" / "taggers" / "data" / "blazeface_short_range.onnx"
FIXTURE = REPO / "tests" / "data" / "blazeface_parity.npz"
PHOTOS = REPO / "examples" / "photos"
FIXTURE_PHOTOS = ("astronaut_eileen_collins.jpg", "grace_hopper.jpg", "cat_chelsea.jpg")

MEDIAPIPE = "mediapipe==0.10.14"
TFLITE_IN_WHEEL = "mediapipe/modules/face_detection/face_detection_short_range.tflite"
TFLITE_SHA256 = "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"
LICENSE_IN_WHEEL = "mediapipe-0.10.14.dist-info/LICENSE"

# ONNX vs TFLite on identical inputs: float32 reassociation noise only (measured up to ~5e-4 on logits).
ATOL = 2e-3


def load_faces_module() -> ModuleType:
    """Import ``batchtag/taggers/faces.py`` by path (the export venv has no batchtag)."""
    name = "batchtag_taggers_faces_by_path"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, FACES_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def fetch_tflite(workdir: Path, wheel_dir: Path | None) -> tuple[Path, Path]:
    """The .tflite and the wheel's LICENSE, unzipped from the mediapipe wheel under ``workdir``."""
    if wheel_dir is None:
        wheel_dir = workdir / "wheel"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", MEDIAPIPE, "--no-deps",
             "--only-binary=:all:", "--python-version", "3.11", "--platform",
             "manylinux2014_x86_64", "-d", str(wheel_dir)],
            check=True,
        )  # fmt: skip
    wheels = sorted(wheel_dir.glob("mediapipe-0.10.14-*.whl"))
    if not wheels:
        raise SystemExit(f"no mediapipe 0.10.14 wheel in {wheel_dir}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(TFLITE_IN_WHEEL, workdir)
        wheel.extract(LICENSE_IN_WHEEL, workdir)
    tflite = workdir / TFLITE_IN_WHEEL
    digest = hashlib.sha256(tflite.read_bytes()).hexdigest()
    if digest != TFLITE_SHA256:
        raise SystemExit(f"{tflite.name}: sha256 {digest}, expected {TFLITE_SHA256}")
    return tflite, workdir / LICENSE_IN_WHEEL


def convert(tflite: Path, output: Path) -> None:
    """tflite2onnx, then a dynamic batch axis and metadata."""
    import onnx
    import tflite2onnx
    from onnx import numpy_helper

    raw = output.with_suffix(".raw.onnx")
    tflite2onnx.convert(str(tflite), str(raw))
    model = onnx.load(str(raw))
    raw.unlink()
    graph = model.graph
    # The converter writes Reshape targets like [1, -1, 16]; 0 copies the input's batch size.
    reshape_shapes = {n.input[1] for n in graph.node if n.op_type == "Reshape"}
    for init in graph.initializer:
        if init.name in reshape_shapes:
            shape = numpy_helper.to_array(init).copy()
            assert shape[0] == 1, (init.name, shape)
            shape[0] = 0
            init.CopyFrom(numpy_helper.from_array(shape, init.name))
    for value in list(graph.input) + list(graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    del graph.value_info[:]  # intermediate shapes pinned to batch 1; ONNX Runtime infers them
    onnx.checker.check_model(model, full_check=True)
    meta = {
        "model": "BlazeFace short-range face detector (MediaPipe face_detection_short_range)",
        "source": f"PyPI {MEDIAPIPE}, {TFLITE_IN_WHEEL} (sha256 {TFLITE_SHA256}), Apache-2.0",
        "input": "input: float32 (N, 3, 128, 128), RGB scaled to [-1, 1], letterboxed",
        "output": "regressors (N, 896, 16): box + 6 keypoints per anchor; classificators (N, 896, 1): logits",
        "exported_with": f"tflite2onnx {tflite2onnx.__version__}, onnx {onnx.__version__}",
    }
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(output))


def tflite_outputs(tflite: Path, batch_nchw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(regressors, classificators) of the TFLite model, one input at a time (its batch is 1)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite))
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    outs = {d["name"]: d["index"] for d in interpreter.get_output_details()}
    regs, scores = [], []
    for x in batch_nchw:
        interpreter.set_tensor(inp["index"], x.transpose(1, 2, 0)[None].astype(np.float32))
        interpreter.invoke()
        regs.append(interpreter.get_tensor(outs["regressors"])[0])
        scores.append(interpreter.get_tensor(outs["classificators"])[0])
    return np.stack(regs), np.stack(scores)


def fixed_inputs(faces: ModuleType) -> tuple[list[str], np.ndarray]:
    """Names and uint8 (N, 3, 128, 128) detector inputs: a seeded random image, then photos."""
    rng = np.random.default_rng(14)
    names = ["random"]
    images = [rng.integers(0, 256, (3, faces.INPUT_SIZE, faces.INPUT_SIZE), dtype=np.uint8)]
    for name in FIXTURE_PHOTOS:
        with Image.open(PHOTOS / name) as img:
            (view,) = faces.whole_view(img.convert("RGB"))
        names.append(name)
        images.append(view)
    return names, np.stack(images)


def check(tflite: Path, onnx_path: Path, fixture: Path | None) -> bool:
    faces = load_faces_module()
    detector = faces.FaceDetector(onnx_path, threads=1)
    names, images = fixed_inputs(faces)
    batch = faces.normalise(images)
    ref_regs, ref_scores = tflite_outputs(tflite, batch)
    got_regs, got_scores = detector.raw(batch)  # one batched call: also checks the dynamic axis
    d_regs = float(np.abs(ref_regs - got_regs).max())
    d_scores = float(np.abs(ref_scores - got_scores).max())
    print(f"fixed inputs x{len(names)}: max |regressor diff| {d_regs:.2e}, max |logit diff| {d_scores:.2e}")
    ok = d_regs <= ATOL and d_scores <= ATOL
    if fixture is not None:
        fixture.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            fixture, names=np.array(names), images=images, regressors=ref_regs, classificators=ref_scores
        )
        print(f"wrote {fixture.relative_to(REPO)} ({fixture.stat().st_size / 1024:.0f} KiB)")

    print(f"{'photo':40s} faces (score, box area as a fraction of the photo)")
    for path in sorted(PHOTOS.rglob("*.jpg")):
        with Image.open(path) as img:
            found = detector.detect([faces.prepare_views(img.convert("RGB"))])[0]
        shown = ", ".join(f"{f.score:.3f} ({f.area:.3f})" for f in found) or "-"
        best = detector.best_anchor_score(faces.prepare_views(Image.open(path).convert("RGB")))
        print(f"{path.relative_to(PHOTOS).as_posix():40s} best anchor {best:.3f}; {shown}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="ONNX file to write")
    parser.add_argument("--wheel-dir", type=Path, help="a directory already holding the mediapipe wheel")
    parser.add_argument("--check-only", action="store_true", help="check an existing file, do not export")
    parser.add_argument("--no-fixture", action="store_true", help=f"do not rewrite {FIXTURE.name}")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="blazeface-") as tmp:
        tflite, license_file = fetch_tflite(Path(tmp), args.wheel_dir)
        print(f"{tflite.name}: sha256 OK; licence: {license_file.read_text().splitlines()[0].strip()}")
        if not args.check_only:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            convert(tflite, args.output)
            print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")
        ok = check(tflite, args.output, None if args.no_fixture else FIXTURE)
    print("parity: OK" if ok else "parity: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
