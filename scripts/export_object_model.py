"""Bring YOLOX-nano (ONNX) into batchtag: check it, make its input dynamic, record parity data.

Run once, by hand; needs ``onnx`` (``.venv/bin/pip install onnx``; batchtag itself only needs
onnxruntime)::

    .venv/bin/python scripts/export_object_model.py --source /path/to/yolox_nano.onnx

Provenance: ``model/yolox_nano.onnx`` of the public GitHub repository
Kazuhito00/YOLOX-ONNX-TFLite-Sample at commit 3d4f1119d0694200671c08069ecb847aa0d8495a
(Apache-2.0, its LICENSE is ``batchtag/taggers/data/OBJECT-MODEL-LICENSE.md``), an export of
Megvii's YOLOX-nano COCO weights (YOLOX is Apache-2.0 too). Only the .onnx file is used; the
repository's code is not part of batchtag. Its sha256 is checked against ``SOURCE_SHA256``.

Steps:

1. the edit: the input is pinned to 1x3x416x416 and the head's three Reshapes to
   ``[1, 85, -1]``; the input becomes ``(N, 3, H, W)``, the Reshapes ``[0, 85, -1]`` (0 keeps
   the batch dimension), initialisers are taken out of the graph inputs (the exporter listed
   them there, which stops ONNX Runtime from folding constants) and the output is
   ``(N, anchors, 85)``; written to ``batchtag/taggers/data/yolox_nano.onnx``;
2. parity: the original and the edited model on the same 416 px inputs (a seeded random
   image and example photos as ``batchtag/taggers/objects.py`` prepares them) must agree to
   float noise (``ATOL``); the edited model at batch 3 equals itself at batch 1;
3. reference outputs: the original model's outputs on the fixture photo are saved to
   ``tests/data/yolox_parity.npz`` (the input, and the rows with the highest objectness), so
   the test suite checks the committed file against the original without having it.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batchtag.taggers.objects import letterbox  # noqa: E402

DEFAULT_OUTPUT = REPO / "batchtag" / "taggers" / "data" / "yolox_nano.onnx"
FIXTURE = REPO / "tests" / "data" / "yolox_parity.npz"
PHOTOS = REPO / "examples" / "photos"
FIXTURE_PHOTO = "cat_chelsea.jpg"
CHECK_PHOTOS = ("astronaut_eileen_collins.jpg", "cat_chelsea.jpg", "coffee.jpg")
SOURCE_SHA256 = "695e750a5d5754bb5a8d5325643b59282191a7e7a564e435a415fd3c578eab14"
ORIGINAL_SIZE = 416
FIXTURE_ROWS = 64
ATOL = 1e-3


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    """The edit of step 1, in place; returns the model."""
    graph = model.graph
    initialisers = {i.name for i in graph.initializer}
    kept = [i for i in graph.input if i.name not in initialisers]
    del graph.input[:]
    graph.input.extend(kept)
    dims = graph.input[0].type.tensor_type.shape.dim
    for dim, name in zip(dims, ("batch", None, "height", "width"), strict=True):
        if name is not None:
            dim.ClearField("dim_value")
            dim.dim_param = name
    by_name = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        shape = by_name[node.input[1]]
        value = numpy_helper.to_array(shape)
        if list(value) != [1, 85, -1]:
            raise ValueError(f"unexpected Reshape target {value} in {node.name}")
        shape.CopyFrom(numpy_helper.from_array(np.array([0, 85, -1], dtype=np.int64), shape.name))
    out_dims = graph.output[0].type.tensor_type.shape.dim
    for dim, name in zip(out_dims, ("batch", "anchors", None), strict=True):
        if name is not None:
            dim.ClearField("dim_value")
            dim.dim_param = name
    del model.metadata_props[:]
    for key, value in (
        ("source", "Kazuhito00/YOLOX-ONNX-TFLite-Sample@3d4f111 model/yolox_nano.onnx"),
        ("source_sha256", SOURCE_SHA256),
        ("license", "Apache-2.0"),
        ("edit", "dynamic batch and input size (scripts/export_object_model.py)"),
    ):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def inputs() -> np.ndarray:
    """(k, 3, 416, 416) float32: a seeded random image, then the check photos."""
    rng = np.random.default_rng(18)
    batch = [rng.integers(0, 256, (3, ORIGINAL_SIZE, ORIGINAL_SIZE), dtype=np.uint8)]
    for name in CHECK_PHOTOS:
        with Image.open(PHOTOS / name) as image:
            batch.append(letterbox(image.convert("RGB"), ORIGINAL_SIZE, square=True)[0])
    return np.stack(batch).astype(np.float32)


def check(source: Path, edited: Path) -> float:
    """Max abs difference of step 2 (asserted below ATOL)."""
    original, dynamic = session(source), session(edited)
    batch = inputs()
    worst = 0.0
    singles = []
    for one in batch:
        (a,) = original.run(None, {"images": one[None]})
        (b,) = dynamic.run(None, {"images": one[None]})
        singles.append(b[0])
        worst = max(worst, float(np.abs(a - b).max()))
    (together,) = dynamic.run(None, {"images": batch})
    worst = max(worst, float(np.abs(together - np.stack(singles)).max()))
    if worst > ATOL:
        raise SystemExit(f"parity failed: max abs difference {worst} > {ATOL}")
    return worst


def record_fixture(source: Path, fixture: Path) -> None:
    """Step 3: the fixture photo's input and the original's strongest rows."""
    with Image.open(PHOTOS / FIXTURE_PHOTO) as image:
        pixels, _ = letterbox(image.convert("RGB"), ORIGINAL_SIZE, square=True)
    (out,) = session(source).run(None, {"images": pixels[None].astype(np.float32)})
    rows = np.argsort(-out[0, :, 4], kind="stable")[:FIXTURE_ROWS]
    np.savez_compressed(fixture, pixels=pixels, rows=rows, outputs=out[0, rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="the original yolox_nano.onnx")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--fixture", type=Path, default=FIXTURE)
    args = parser.parse_args(argv)
    digest = sha256(args.source)
    if digest != SOURCE_SHA256:
        print(f"{args.source}: sha256 {digest}, expected {SOURCE_SHA256}", file=sys.stderr)
        return 1
    onnx.save(make_dynamic(onnx.load(str(args.source))), str(args.output))
    worst = check(args.source, args.output)
    record_fixture(args.source, args.fixture)
    print(f"wrote {args.output} (sha256 {sha256(args.output)}); parity max abs diff {worst:.2e}")
    print(f"wrote {args.fixture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
