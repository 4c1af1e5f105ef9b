#!/usr/bin/env python3
"""Reference runs of the converted models with Python onnxruntime (CPUExecutionProvider).

  logits    raw little-endian float32 tensor in -> raw little-endian float32 logits out
            (the Rust parity test compares its own output with this one)
  accuracy  top-1/top-5 of a model card's model on the labelled sample photos, using the
            card's preprocessing
  bench     median session.run latency on a random batch, as one JSON line
            (the Rust benchmark compares against it)

--model takes either an .onnx file or a model card (.toml; its `file` is used).

Usage:
  reference.py logits   --model M --input IN.bin --shape N,3,224,224 --output OUT.bin [--threads T]
  reference.py accuracy --model models/efficientnet-lite0.toml --images testdata/imagenet [--int8]
  reference.py bench    --model M --batch B --threads T --iters K
"""

import argparse
import csv
import json
import math
import statistics
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

BENCH_WARMUP_RUNS = 3


def onnx_path(model):
    """The .onnx file for --model, which is either that file or a model card."""
    model = Path(model)
    if model.suffix == ".toml":
        return model.parent / load_card(model)["file"]
    return model


def load_card(path):
    with open(path, "rb") as f:
        return tomllib.load(f)


def make_session(model, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(onnx_path(model)), sess_options=options, providers=["CPUExecutionProvider"])


def run(session, batch):
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def cmd_logits(args):
    shape = [int(d) for d in args.shape.split(",")]
    data = np.fromfile(args.input, dtype="<f4")
    if data.size != math.prod(shape):
        sys.exit(f"{args.input} holds {data.size} floats, shape {shape} needs {math.prod(shape)}")
    logits = run(make_session(args.model, args.threads), data.reshape(shape).astype(np.float32))
    logits.astype("<f4").tofile(args.output)


def preprocess(path, input_spec):
    """Image file -> CHW float32 array (preprocess_image)."""
    with Image.open(path) as image:
        return preprocess_image(image.convert("RGB"), input_spec)


def preprocess_image(image, input_spec):
    """RGB PIL image -> CHW float32 array, exactly as the model card's [input] table says.

    An image of exactly size x size is used as it is. Otherwise the shorter side is resized
    (bilinear) to floor(size / crop_fraction), the longer side proportionally (rounded), and
    the centre size x size is cropped (offset floor((side - size) / 2)).
    """
    size = input_spec["width"]
    if input_spec["height"] != size or input_spec["resize"] != "shorter_side_center_crop" \
            or input_spec["interpolation"] != "bilinear" or input_spec["layout"] != "NCHW" \
            or input_spec["color"] != "RGB":
        sys.exit(f"unsupported [input] settings: {input_spec}")

    if image.size != (size, size):
        width, height = image.size
        shorter = math.floor(size / input_spec["crop_fraction"])
        if width <= height:
            resized = (shorter, round(height * shorter / width))
        else:
            resized = (round(width * shorter / height), shorter)
        image = image.resize(resized, Image.Resampling.BILINEAR)
        left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))

    pixels = np.asarray(image, dtype=np.float32) / 255.0
    normalized = (pixels - np.array(input_spec["mean"], np.float32)) / np.array(input_spec["std"], np.float32)
    return normalized.transpose(2, 0, 1)


def cmd_accuracy(args):
    card = load_card(args.model)
    labels = (args.model.parent / card["labels"]).read_text().splitlines()
    with open(args.images / "labels.csv", newline="") as f:
        samples = [(row["file"], int(row["class_id"])) for row in csv.DictReader(f)]
    if not samples:
        sys.exit(f"no samples in {args.images / 'labels.csv'}; run scripts/fetch_samples.py")

    batch = np.stack([preprocess(args.images / file, card["input"]) for file, _ in samples])
    logits = run(make_session(args.model, args.threads), batch)
    if args.int8:
        # The card's [int8] variant, compared with the fp32 model on the same inputs.
        fp32_top1 = logits.argmax(axis=1)
        logits = run(make_session(args.model.parent / card["int8"]["file"], args.threads), batch)
        card = dict(card, name=card["name"] + "-int8")
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)

    top1 = top5 = 0
    print(f"{card['name']}: {len(samples)} photos from {args.images}")
    for (file, truth), probs in zip(samples, probabilities):
        ranking = list(np.argsort(-probs, kind="stable")[:5])
        hit1, hit5 = ranking[0] == truth, truth in ranking
        top1 += hit1
        top5 += hit5
        mark = "ok  " if hit1 else ("top5" if hit5 else "MISS")
        best = ranking[0]
        print(f"  {mark} {file:<22} truth {truth:>3} {labels[truth]!r:<28} "
              f"predicted {best:>3} {labels[best]!r} ({probs[best]:.3f})")
    print(f"top1 = {top1}/{len(samples)} = {top1 / len(samples):.2f}")
    print(f"top5 = {top5}/{len(samples)} = {top5 / len(samples):.2f}")
    if args.int8:
        agree = int((probabilities.argmax(axis=1) == fp32_top1).sum())
        print(f"top1 agreement with fp32 = {agree}/{len(samples)} = {agree / len(samples):.2f}")


def cmd_bench(args):
    session = make_session(args.model, args.threads)
    _, channels, height, width = session.get_inputs()[0].shape
    batch = np.random.default_rng(0).standard_normal((args.batch, channels, height, width), dtype=np.float32)
    for _ in range(BENCH_WARMUP_RUNS):
        run(session, batch)
    times_ms = []
    for _ in range(args.iters):
        start = time.perf_counter()
        run(session, batch)
        times_ms.append((time.perf_counter() - start) * 1000.0)
    median = statistics.median(times_ms)
    print(json.dumps({"model": onnx_path(args.model).stem, "batch": args.batch, "threads": args.threads,
                      "median_ms": round(median, 3), "per_image_ms": round(median / args.batch, 3)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    logits = commands.add_parser("logits", help="run one raw float32 tensor through the model")
    logits.add_argument("--model", type=Path, required=True)
    logits.add_argument("--input", type=Path, required=True)
    logits.add_argument("--shape", required=True, help="comma-separated, e.g. 1,3,224,224")
    logits.add_argument("--output", type=Path, required=True)
    logits.add_argument("--threads", type=int, default=1)
    logits.set_defaults(func=cmd_logits)

    accuracy = commands.add_parser("accuracy", help="top-1/top-5 on labelled photos")
    accuracy.add_argument("--model", type=Path, required=True, help="model card (.toml)")
    accuracy.add_argument("--images", type=Path, required=True, help="directory with labels.csv")
    accuracy.add_argument("--threads", type=int, default=1)
    accuracy.add_argument("--int8", action="store_true", help="the card's [int8] variant, and its agreement with fp32")
    accuracy.set_defaults(func=cmd_accuracy)

    bench = commands.add_parser("bench", help="median inference latency")
    bench.add_argument("--model", type=Path, required=True)
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--threads", type=int, default=1)
    bench.add_argument("--iters", type=int, default=20)
    bench.set_defaults(func=cmd_bench)

    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
