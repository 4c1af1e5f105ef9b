#!/usr/bin/env python3
"""Make the int8 variants of the converted models: ONNX Runtime static quantization (QDQ).

For each model, models/efficientnet-liteX.onnx (written by convert.py) becomes
models/efficientnet-liteX-int8.onnx:

  1. calibration inputs: crops, flips and rescales of images shipped with the installed
     packages that are NOT the 20 evaluation photos (matplotlib's grace_hopper.jpg and
     foolbox's 40 CIFAR-10/100 photos), preprocessed exactly like the server does
     (reference.py's preprocessing: shorter side resize, centre crop, (x - 0.498) / 0.502);
  2. MinMax calibration of every activation with ONNX Runtime;
  3. the ranges are rounded to 3 significant digits, so that the last-bit differences
     between ONNX Runtime's CPU kernels on different machines (AVX2, AVX-512) cannot
     change the output file: the file is byte-for-byte reproducible and its sha256 sits
     in the model card's [int8] table like the fp32 file's;
  4. onnxruntime.quantization.quantize_static with QuantFormat.QDQ, uint8 activations
     and int8 weights quantized per output channel (chosen by measurement:
     models/README.md "int8 variants").

With --check it also compares each file's sha256 with the `[int8] sha256` of the model
card and exits non-zero on a mismatch.

Usage: python models/convert/quantize.py [--models lite0,lite1,lite2] [--fp32-dir models] [--out-dir models] [--check]
"""

import argparse
import hashlib
import importlib.util
import logging
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    create_calibrator,
    quantize_static,
)
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import preprocess_image  # noqa: E402

MODELS_DIR = Path(__file__).resolve().parents[1]
MODELS = ("lite0", "lite1", "lite2")

# Bump when the produced files change (calibration set, rounding, quantization options).
QUANTIZER_VERSION = "1.0.0"

# Measured choice (models/README.md "int8 variants"): per-channel weights keep the
# depthwise convolutions' accuracy, uint8 activations with int8 weights are the fast
# path of ONNX Runtime's x86 int8 kernels (VNNI / AVX2).
PER_CHANNEL = True
ACTIVATION_TYPE = QuantType.QUInt8
WEIGHT_TYPE = QuantType.QInt8

# Significant digits kept of each calibrated range (see the module docstring, step 3).
RANGE_DIGITS = 3
# Calibration inputs per ONNX Runtime run. The calibrator's graph reduces every
# activation to its min and max over the whole batch, so batching changes no range
# (min and max are exact) and only saves time.
CALIBRATION_BATCH = 16


def package_dir(name):
    """Folder of an installed package, located without importing it (foolbox is
    installed without its dependencies and cannot be imported)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{name} is not installed; run `make setup` (it installs requirements.txt into .venv)")
    return Path(next(iter(spec.submodule_search_locations)))


def calibration_images():
    """The calibration set as PIL images, in a fixed order (the output depends on it).

    None of them is one of the evaluation photos (foolbox/data/imagenet_*.jpg)."""
    images = []
    hopper_path = package_dir("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    with Image.open(hopper_path) as hopper:
        hopper = hopper.convert("RGB")
    width, height = hopper.size
    # Whole photo, then square crops of 90%, 70% and 50% of the shorter side at the
    # centre and the four corners, each also mirrored: 32 views of one portrait.
    crops = [(0, 0, width, height)]
    for fraction in (0.9, 0.7, 0.5):
        side = round(min(width, height) * fraction)
        for left, top in ((width - side) // 2, (height - side) // 2), (0, 0), (width - side, 0), \
                (0, height - side), (width - side, height - side):
            crops.append((left, top, left + side, top + side))
    for box in crops:
        view = hopper.crop(box)
        images += [view, ImageOps.mirror(view)]
    # foolbox's 20 CIFAR-10 and 20 CIFAR-100 photos (32x32, natural images of other
    # classes), upscaled by the preprocessing, each also mirrored: 80 inputs.
    data = package_dir("foolbox") / "data"
    cifar = sorted(data.glob("cifar10_*.png")) + sorted(data.glob("cifar100_*.png"))
    if len(cifar) != 40:
        sys.exit(f"expected 40 CIFAR photos in {data}, found {len(cifar)}")
    for path in cifar:
        with Image.open(path) as photo:
            photo = photo.convert("RGB")
        images += [photo, ImageOps.mirror(photo)]
    return images


class Reader(CalibrationDataReader):
    def __init__(self, input_name, batches):
        self.input_name = input_name
        self.batches = iter(batches)

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def round_significant(values):
    values = np.asarray(values, dtype=np.float64)
    rounded = np.vectorize(lambda v: float(f"{v:.{RANGE_DIGITS}g}"))(values) if values.size else values
    return np.asarray(rounded, dtype=np.float32)


def calibrate(fp32_path, input_name, inputs, work_dir):
    """MinMax ranges of every activation, rounded (module docstring, step 3)."""
    calibrator = create_calibrator(
        fp32_path,
        augmented_model_path=str(work_dir / "augmented.onnx"),
        calibrate_method=CalibrationMethod.MinMax,
    )
    batches = [np.stack(inputs[start:start + CALIBRATION_BATCH]) for start in range(0, len(inputs), CALIBRATION_BATCH)]
    calibrator.collect_data(Reader(input_name, batches))
    ranges = calibrator.compute_data()
    rounded = {}
    for name, data in ranges.items():
        low, high = data.range_value
        rounded[name] = TensorData(lowest=round_significant(low), highest=round_significant(high))
    return TensorsData(CalibrationMethod.MinMax, rounded)


def quantize(name, fp32_dir, out_dir, calibration, per_channel=PER_CHANNEL, activation_type=ACTIVATION_TYPE):
    card = tomllib.loads((MODELS_DIR / f"{name}.toml").read_text())
    fp32_path = fp32_dir / card["file"]
    if not fp32_path.is_file():
        sys.exit(f"{fp32_path} is missing; run models/convert/convert.py first (`make models` runs both)")
    out_path = out_dir / card.get("int8", {}).get("file", f"{name}-int8.onnx")
    inputs = [preprocess_image(image, card["input"]) for image in calibration]
    with tempfile.TemporaryDirectory(prefix="pandaguard-quantize.") as tmp:
        work_dir = Path(tmp)
        ranges = calibrate(fp32_path, card["input"]["name"], inputs, work_dir)
        cache = work_dir / "ranges.json"
        save_tensors_data(ranges, cache)
        quantize_static(
            str(fp32_path),
            str(work_dir / "quantized.onnx"),
            calibration_data_reader=None,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=activation_type,
            weight_type=WEIGHT_TYPE,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_cache_path=str(cache),
        )
        model = onnx.load(str(work_dir / "quantized.onnx"))
    model.producer_name = "pandaguard-quantize"
    model.producer_version = QUANTIZER_VERSION
    del model.metadata_props[:]
    for key, value in (("source_file", card["file"]), ("source_sha256", card["sha256"]),
                       ("quantization", f"QDQ static, MinMax over {len(calibration)} calibration inputs, "
                                        f"activations {activation_type.name}, weights {WEIGHT_TYPE.name}"
                                        f"{' per channel' if per_channel else ''}")):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString(deterministic=True)
    out_path.write_bytes(data)
    return out_path, hashlib.sha256(data).hexdigest(), card


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of lite0,lite1,lite2")
    parser.add_argument("--fp32-dir", type=Path, default=MODELS_DIR,
                        help="where the fp32 files written by convert.py are (default: models/)")
    parser.add_argument("--out-dir", type=Path, default=MODELS_DIR, help="where the int8 files go (default: models/)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a file's sha256 differs from the [int8] sha256 of its model card")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # quantize_static logs a suggestion to run its pre-processing (shape inference and
    # graph optimisation) on every call; ONNX Runtime optimises the graph at load anyway.
    logging.getLogger().setLevel(logging.ERROR)

    calibration = calibration_images()
    mismatches = []
    for short in args.models.split(","):
        if short not in MODELS:
            sys.exit(f"unknown model {short!r} (known: {', '.join(MODELS)})")
        started = time.perf_counter()
        path, digest, card = quantize(f"efficientnet-{short}", args.fp32_dir, args.out_dir, calibration)
        print(f"{digest}  {path}  ({time.perf_counter() - started:.1f} s)")
        expected = card.get("int8", {}).get("sha256")
        if args.check and digest != expected:
            mismatches.append(f"{path.name}: sha256 {digest}, card {card['name']}.toml [int8] says {expected}")
    if mismatches:
        sys.exit("\n".join(mismatches) + "\nthe quantizer or its inputs changed: update the cards' [int8] sha256 "
                 "(and bump QUANTIZER_VERSION) if that was deliberate")


if __name__ == "__main__":
    main()
