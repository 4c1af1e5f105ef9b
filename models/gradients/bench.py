#!/usr/bin/env python3
"""Measurements for models/gradients/README.md (short runs; medians).

  bench.py speed [--models lite0,lite1,lite2] [--batches 1,4,16] [--threads N] [--runs 5] [--rounds 3]
      per model: load time, compile time of logits / forward (with VJP) / backward per
      batch bucket, then median forward+backward and forward-only time per row, JAX vs
      onnxruntime (same thread count)
  bench.py server [--threads N] [--rows 16]
      server.py with the three models: startup time, peak RSS after 'ready' and after a
      forward+backward of --rows rows through the protocol for each model
  bench.py layer [--threads N]
      one depthwise and one pointwise conv of Lite0's shapes, forward+backward (input
      gradient) in JAX, to compare with other autodiff libraries
  bench.py steps [--photos 2]
      float64 Lite0: relative error of the central difference of <w, logits> along a random
      direction against the JAX directional derivative, for steps 1e-3 ... 1e-10, and how
      many ReLU6 units switch region inside each step
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import server  # noqa: E402  (no jax import at module level: threads can still be set)

NAMES = {"lite0": "efficientnet-lite0", "lite1": "efficientnet-lite1", "lite2": "efficientnet-lite2"}


def median_time(fn, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cmd_speed(args):
    server.configure_threads(args.threads)
    import numpy as np
    import onnxruntime as ort

    import jax
    import onnx_jax

    batches = [int(b) for b in args.batches.split(",")]
    setups, rows = {}, {}
    for key in args.models.split(","):
        path = ROOT / "models" / f"{NAMES[key]}.onnx"
        start = time.perf_counter()
        model = onnx_jax.Model(onnx_jax.load(path))
        load_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        setups[key] = (model, session, load_s)

    # Round 1 also times the first calls (trace + XLA compile + one run). Every round times
    # each (model, batch) once, JAX and onnxruntime back to back; the table shows the
    # median over rounds of each round's median, so a burst of other load on the machine
    # moves one round, not the figure.
    for round_ in range(args.rounds):
        for key, (model, session, load_s) in setups.items():
            input_name = session.get_inputs()[0].name
            for batch in batches:
                x = np.random.default_rng(0).standard_normal((batch,) + model.input_shape, dtype=np.float32)
                ct = np.random.default_rng(1).standard_normal((batch, model.num_classes), dtype=np.float32)
                start = time.perf_counter()
                model.logits(x)
                first_logits = time.perf_counter() - start
                start = time.perf_counter()
                _, pullback = model.forward(x)
                first_forward = time.perf_counter() - start
                start = time.perf_counter()
                pullback(ct)
                first_backward = time.perf_counter() - start

                def fwd_bwd():
                    _, pb = model.forward(x)
                    pb(ct)

                runs = args.runs if batch < 16 else max(3, args.runs // 2)
                cpu0, wall0 = cpu_seconds(), time.perf_counter()
                jax_fb = median_time(fwd_bwd, runs)
                cores_used = (cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
                fwd_only = median_time(lambda: model.forward(x), runs)
                bwd_only = median_time(lambda: pullback(ct), runs)
                jax_f = median_time(lambda: model.logits(x), runs)
                for _ in range(2):
                    session.run(None, {input_name: x})
                ort_f = median_time(lambda: session.run(None, {input_name: x}), max(runs, 5))
                sample = {"jax_fwd_bwd_ms_per_row": jax_fb / batch * 1e3, "jax_fwd_ms_per_row": jax_f / batch * 1e3,
                          "ort_fwd_ms_per_row": ort_f / batch * 1e3, "jax_cores_busy": cores_used}
                if round_ == 0:
                    rows[(key, batch)] = {
                        "model": NAMES[key], "batch": batch, "bucket": onnx_jax.bucket_for(batch),
                        "threads": args.threads, "load_s": round(load_s, 2),
                        "compile_logits_s": round(first_logits - jax_f, 1),
                        "compile_forward_s": round(first_forward - fwd_only, 1),
                        "compile_backward_s": round(first_backward - bwd_only, 1),
                        "saved_mb_per_row": round(pullback.nbytes() / batch / 2**20, 1),
                        "runs": runs, "samples": []}
                rows[(key, batch)]["samples"].append(sample)
                print(json.dumps({"round": round_ + 1, "model": key, "batch": batch,
                                  **{k: round(v, 2) for k, v in sample.items()}}), flush=True)

    for row in rows.values():
        for field in row["samples"][0]:
            row[field] = round(statistics.median(s[field] for s in row["samples"]), 1 if "ms" in field else 2)
        del row["samples"]
        print(json.dumps(row))
    print(f"\njax {jax.__version__}, {args.threads} thread(s), {args.rounds} rounds, "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print("| model | batch | compile: logits / forward+VJP / backward (s) | JAX forward+backward ms/row | "
          "JAX forward ms/row | ONNX Runtime forward ms/row | kept for backward MB/row |")
    print("|---|---|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['model']} | {r['batch']} | {r['compile_logits_s']} / {r['compile_forward_s']} / "
              f"{r['compile_backward_s']} | {r['jax_fwd_bwd_ms_per_row']} | {r['jax_fwd_ms_per_row']} | "
              f"{r['ort_fwd_ms_per_row']} | {r['saved_mb_per_row']} |")


def peak_rss_mb(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def cmd_server(args):
    import numpy as np
    from client import Client

    models = {key: ROOT / "models" / f"{name}.onnx" for key, name in NAMES.items()}
    start = time.perf_counter()
    with Client(models, threads=args.threads, extra_args=args.server_args) as client:
        ready_s = time.perf_counter() - start
        hwm, rss = peak_rss_mb(client.proc.pid)
        print(f"ready after {ready_s:.1f} s ({client.ready}); peak RSS {hwm:.0f} MB, RSS {rss:.0f} MB")
        for key in models:
            shape = client.models[key]["input"]
            x = np.random.default_rng(0).standard_normal([args.rows] + shape, dtype=np.float32)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                handle, logits = client.forward(key, x)
                client.backward(key, handle, np.ones_like(logits))
                times.append(time.perf_counter() - start)
            hwm, rss = peak_rss_mb(client.proc.pid)
            print(f"{key}: forward+backward of {args.rows} rows through the protocol: first call {times[0]:.1f} s "
                  f"(compiles unless warmed up), then median {statistics.median(times[1:]) * 1e3 / args.rows:.1f} ms/row; "
                  f"peak RSS {hwm:.0f} MB, RSS {rss:.0f} MB")
        print(f"load average {os.getloadavg()[0]:.1f}")


def cmd_layer(args):
    server.configure_threads(args.threads)
    import numpy as np

    import jax
    import jax.numpy as jnp
    from jax import lax

    import onnx_jax

    # Lite0 blocks.1: expand 16 -> 96 (1x1) at 112x112, then depthwise 3x3 stride 2 over 96 channels.
    rng = np.random.default_rng(0)
    cases = {
        "depthwise 3x3 s1, 96 ch, 112x112": ((96, 112), (96, 1, 3, 3), 96, 1),
        "depthwise 3x3 s2, 96 ch, 112x112": ((96, 112), (96, 1, 3, 3), 96, 2),
        "pointwise 1x1, 16 -> 96 ch, 112x112": ((16, 112), (96, 16, 1, 1), 1, 1),
    }
    print("| batch | layer | implementation | forward ms | forward + input gradient ms |")
    print("|---|---|---|---|---|")
    for batch in (1, 4):
        for label, ((c, size), wshape, group, stride) in cases.items():
            x = jnp.asarray(rng.standard_normal((batch, c, size, size), dtype=np.float32))
            w = jnp.asarray(rng.standard_normal(wshape, dtype=np.float32))
            k = wshape[-1]
            total = max(0, (-(-size // stride) - 1) * stride + k - size)  # ONNX SAME_UPPER, as in the graphs
            pads = ((total // 2, total - total // 2),) * 2

            def lax_nchw(x):
                return lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                                feature_group_count=group)

            def ours(x):  # onnx_jax's way: channels-last (as between layers), depthwise as multiply-adds
                if group > 1:
                    op = onnx_jax._depthwise_op((stride, stride), (1, 1), pads, (size, size))
                    return op(x, w)
                return lax.conv_general_dilated(x, w, (stride, stride), pads,
                                                dimension_numbers=lax.ConvDimensionNumbers((0, 3, 1, 2), (0, 1, 2, 3),
                                                                                           (0, 3, 1, 2)))

            out_size = -(-size // stride)
            for name, fn, xin, ct in (
                    ("lax.conv_general_dilated, NCHW, feature_group_count", lax_nchw, x,
                     jnp.asarray(rng.standard_normal((batch, wshape[0], out_size, out_size), dtype=np.float32))),
                    ("onnx_jax (NHWC; depthwise: multiply-adds + own VJP)", ours, jnp.moveaxis(x, 1, -1),
                     jnp.asarray(rng.standard_normal((batch, out_size, out_size, wshape[0]), dtype=np.float32)))):
                # forward and input gradient for a given cotangent, both returned (nothing is
                # dead code, and the cotangent is an argument, so nothing is constant-folded)
                step = jax.jit(lambda x, ct, fn=fn: (lambda y, vjp: (y, vjp(ct)[0]))(*jax.vjp(fn, x)))
                fwd = jax.jit(fn)
                jax.block_until_ready(step(xin, ct))
                jax.block_until_ready(fwd(xin))
                fb = median_time(lambda: jax.block_until_ready(step(xin, ct)), args.runs)
                f = median_time(lambda: jax.block_until_ready(fwd(xin)), args.runs)
                print(f"| {batch} | {label} | {name} | {f * 1e3:.2f} | {fb * 1e3:.2f} |", flush=True)
    print(f"jax {jax.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")


def cmd_steps(args):
    import numpy as np

    import jax
    jax.config.update("jax_enable_x64", True)
    import onnx_jax

    sys.path.insert(0, str(ROOT / "models" / "convert"))
    import csv
    import tomllib

    import reference

    with open(ROOT / "models" / "efficientnet-lite0.toml", "rb") as f:
        spec = tomllib.load(f)["input"]
    with open(ROOT / "testdata" / "imagenet" / "labels.csv", newline="") as f:
        files = [row["file"] for row in csv.DictReader(f)][:args.photos]
    x = np.stack([reference.preprocess(ROOT / "testdata" / "imagenet" / name, spec) for name in files]).astype(np.float64)
    model = onnx_jax.Model(onnx_jax.load(ROOT / "models" / "efficientnet-lite0.onnx"), np.float64)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((len(x), model.num_classes))
    v = rng.standard_normal(x.shape)
    _, pullback = model.forward(x)
    ad = (pullback(w) * v).sum(axis=(1, 2, 3))

    def regions(pb):
        return [np.asarray(leaf) for _, vjp in pb.pieces for leaf in jax.tree_util.tree_leaves(vjp) if leaf.dtype == np.uint8]

    units = sum(r[0].size for r in regions(pullback))
    print(f"Lite0 float64, {len(x)} photos, direction v ~ N(0, 1) per input value, {units} ReLU6 units per photo")
    print("| step h | relative error of the central difference (per photo) | units switching region in [x - hv, x + hv] |")
    print("|---|---|---|")
    for h in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10):
        plus, pb_plus = model.forward(x + h * v)
        minus, pb_minus = model.forward(x - h * v)
        fd = ((plus - minus) * w).sum(axis=1) / (2 * h)
        rel = np.abs(fd - ad) / np.abs(ad)
        switched = [int(sum((a[i] != b[i]).sum() for a, b in zip(regions(pb_plus), regions(pb_minus))))
                    for i in range(len(x))]
        print(f"| {h:.0e} | {', '.join(f'{r:.1e}' for r in rel)} | {', '.join(map(str, switched))} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    speed = sub.add_parser("speed")
    speed.add_argument("--models", default="lite0,lite1,lite2")
    speed.add_argument("--batches", default="1,4,16")
    speed.add_argument("--threads", type=int, default=server.available_cores())
    speed.add_argument("--runs", type=int, default=5)
    speed.add_argument("--rounds", type=int, default=3)
    speed.set_defaults(func=cmd_speed)
    srv = sub.add_parser("server")
    srv.add_argument("--threads", type=int, default=None)
    srv.add_argument("--rows", type=int, default=16)
    srv.add_argument("--repeats", type=int, default=3)
    srv.add_argument("--server-args", nargs=argparse.REMAINDER, default=[])
    srv.set_defaults(func=cmd_server)
    layer = sub.add_parser("layer")
    layer.add_argument("--threads", type=int, default=server.available_cores())
    layer.add_argument("--runs", type=int, default=7)
    layer.set_defaults(func=cmd_layer)
    steps = sub.add_parser("steps")
    steps.add_argument("--photos", type=int, default=2)
    steps.set_defaults(func=cmd_steps)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
