#!/usr/bin/env python3
"""Exact gradients of the served ONNX models, for the white-box red team (PGD/APGD + EOT).

A long-running process that speaks length-prefixed binary frames on stdin/stdout; see
models/gradients/README.md for the protocol (the contract with the Rust side). Nothing but
protocol frames is ever written to stdout; logs go to stderr.

Usage:
  server.py --model NAME=PATH.onnx [--model ...] [--threads N] [--warmup 1,4,16]
            [--max-handles 64] [--max-saved-mb 4096] [--cache-dir DIR]
"""

import argparse
import collections
import json
import logging
import os
import struct
import sys
import time

MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 8 << 30  # larger frames are read and discarded, and answered with an error
DISCARD_CHUNK = 1 << 20

log = logging.getLogger("gradients")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="a model to serve under NAME (repeatable); PATH alone uses the file stem")
    parser.add_argument("--threads", type=int, default=None,
                        help="XLA:CPU intra-op threads (default: all cores this process may use)")
    parser.add_argument("--warmup", default="",
                        help="comma-separated batch buckets to compile before 'ready' (default: none, "
                             "each bucket compiles on first use)")
    parser.add_argument("--max-handles", type=int, default=64,
                        help="forward passes kept for backward; the oldest is dropped beyond this")
    parser.add_argument("--max-saved-mb", type=float, default=4096,
                        help="memory the kept forward passes may hold; the oldest are dropped beyond this")
    parser.add_argument("--cache-dir", default=None,
                        help="JAX persistent compilation cache (makes restarts compile in seconds)")
    return parser.parse_args(argv)


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(threads):
    """Thread settings for XLA:CPU; they only take effect before jax is imported."""
    # The XLA:CPU client sizes its intra-op (Eigen) thread pool from NPROC when it is set,
    # else from the cores this process may run on.
    os.environ["NPROC"] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_cpu_multi_thread_eigen")]
    flags.append(f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


class Truncated(Exception):
    pass


class Channel:
    """Frames: u32 LE header length, UTF-8 JSON header, u64 LE payload length, payload."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    def _read_exact(self, n, at_frame_start=False):
        chunks, got = [], 0
        while got < n:
            chunk = self.reader.read(n - got)
            if not chunk:
                if at_frame_start and got == 0:
                    return None
                raise Truncated(f"stdin closed inside a frame ({got} of {n} bytes)")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _discard(self, n):
        while n > 0:
            chunk = self.reader.read(min(n, DISCARD_CHUNK))
            if not chunk:
                raise Truncated("stdin closed inside a payload")
            n -= len(chunk)

    def read(self):
        """(header dict or an error string, payload bytes), or None at a clean EOF."""
        raw = self._read_exact(4, at_frame_start=True)
        if raw is None:
            return None
        (header_len,) = struct.unpack("<I", raw)
        if header_len > MAX_HEADER_BYTES:
            raise Truncated(f"header length {header_len} > {MAX_HEADER_BYTES}: stream out of sync")
        header_bytes = self._read_exact(header_len)
        (payload_len,) = struct.unpack("<Q", self._read_exact(8))
        if payload_len > MAX_PAYLOAD_BYTES:
            self._discard(payload_len)
            return f"payload of {payload_len} bytes is over the limit of {MAX_PAYLOAD_BYTES}", b""
        payload = self._read_exact(payload_len)
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"header is not UTF-8 JSON: {e}", payload
        if not isinstance(header, dict):
            return "header must be a JSON object", payload
        return header, payload

    def write(self, header, payload=b""):
        header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
        self.writer.write(struct.pack("<I", len(header_bytes)))
        self.writer.write(header_bytes)
        self.writer.write(struct.pack("<Q", len(payload)))
        if payload:
            self.writer.write(payload)
        self.writer.flush()


class RequestError(Exception):
    pass


class Server:
    def __init__(self, models, max_handles, max_saved_bytes):
        import numpy as np

        self.np = np
        self.models = models  # name -> onnx_jax.Model
        self.max_handles = max_handles
        self.max_saved_bytes = max_saved_bytes
        self.handles = collections.OrderedDict()  # handle -> (Pullback, rows, classes, bytes)
        self.saved_bytes = 0
        self.next_handle = 1

    # -- helpers ------------------------------------------------------------------------

    def _model(self, header):
        name = header.get("model")
        if name not in self.models:
            raise RequestError(f"unknown model {name!r} (serving: {', '.join(self.models)})")
        return name, self.models[name]

    def _rows(self, header):
        rows = header.get("rows")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise RequestError(f"'rows' must be an integer >= 1, got {rows!r}")
        return rows

    def _floats(self, payload, count, what):
        if len(payload) != 4 * count:
            raise RequestError(f"{what}: payload has {len(payload)} bytes, expected {count} float32 = {4 * count}")
        return self.np.frombuffer(payload, dtype="<f4")

    def _input(self, header, payload):
        name, model = self._model(header)
        rows = self._rows(header)
        c, h, w = model.input_shape
        x = self._floats(payload, rows * c * h * w, f"input [{rows}, {c}, {h}, {w}]")
        return name, model, x.reshape(rows, c, h, w)

    def _handle(self, header):
        handle = header.get("handle")
        if not isinstance(handle, int) or isinstance(handle, bool) or handle not in self.handles:
            raise RequestError(f"unknown handle {handle!r} (never issued, already used or released, "
                               f"or dropped as the oldest of more than {self.max_handles} / "
                               f"{self.max_saved_bytes >> 20} MB kept)")
        return handle

    def _drop(self, handle):
        entry = self.handles.pop(handle)
        self.saved_bytes -= entry[3]

    def _keep(self, pullback, rows, classes):
        handle = self.next_handle
        self.next_handle += 1
        size = pullback.nbytes()
        self.handles[handle] = (pullback, rows, classes, size)
        self.saved_bytes += size
        while len(self.handles) > 1 and (len(self.handles) > self.max_handles
                                         or self.saved_bytes > self.max_saved_bytes):
            oldest = next(iter(self.handles))
            log.info("dropping handle %d (oldest; %d kept, %.0f MB)", oldest, len(self.handles),
                     self.saved_bytes / 2**20)
            self._drop(oldest)
        return handle

    # -- ops ----------------------------------------------------------------------------

    def op_forward(self, header, payload):
        _, model, x = self._input(header, payload)
        logits, pullback = model.forward(x)
        handle = self._keep(pullback, x.shape[0], model.num_classes)
        return ({"ok": True, "handle": handle, "rows": x.shape[0], "classes": model.num_classes},
                logits.astype("<f4", copy=False).tobytes())

    def op_backward(self, header, payload):
        handle = self._handle(header)
        pullback, rows, classes, _ = self.handles[handle]
        cotangent = self._floats(payload, rows * classes, f"cotangent [{rows}, {classes}] for handle {handle}")
        grad = pullback(cotangent.reshape(rows, classes))
        self._drop(handle)
        return {"ok": True, "rows": rows}, grad.astype("<f4", copy=False).tobytes()

    def op_release(self, header, payload):
        self._drop(self._handle(header))
        return {"ok": True}, b""

    def op_logits(self, header, payload):
        _, model, x = self._input(header, payload)
        logits = model.logits(x)
        return {"ok": True, "rows": x.shape[0], "classes": model.num_classes}, logits.astype("<f4", copy=False).tobytes()

    OPS = {"forward": op_forward, "backward": op_backward, "release": op_release, "logits": op_logits}

    def handle(self, header, payload):
        if isinstance(header, str):  # the frame could not be decoded
            return {"ok": False, "error": header}, b""
        op = header.get("op")
        fn = self.OPS.get(op)
        if fn is None:
            return {"ok": False, "error": f"unknown op {op!r} (known: {', '.join(self.OPS)})"}, b""
        try:
            start = time.perf_counter()
            response = fn(self, header, payload)
            log.debug("%s %s in %.1f ms", op, header.get("model", header.get("handle")),
                      (time.perf_counter() - start) * 1e3)
            return response
        except RequestError as e:
            return {"ok": False, "error": str(e)}, b""
        except Exception as e:  # keep serving whatever one request did
            log.exception("%s failed", op)
            return {"ok": False, "error": f"{op} failed: {type(e).__name__}: {e}"}, b""


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=os.environ.get("GRADIENTS_LOG", "INFO"),
                        format="gradients %(asctime)s %(levelname)s %(message)s")

    # Frames go to the real stdout; anything else that writes to fd 1 (a library's print,
    # a C extension) lands on stderr instead of corrupting the stream.
    channel = Channel(sys.stdin.buffer, os.fdopen(os.dup(1), "wb"))
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def fail(message):
        log.error("%s", message)
        channel.write({"ok": False, "error": message})
        return 1

    threads = args.threads if args.threads is not None else available_cores()
    if threads < 1:
        return fail(f"--threads must be >= 1, got {threads}")
    configure_threads(threads)

    try:
        buckets = [int(b) for b in args.warmup.split(",") if b.strip()]
    except ValueError:
        return fail(f"--warmup takes comma-separated integers, got {args.warmup!r}")

    try:
        import jax

        if args.cache_dir:
            jax.config.update("jax_compilation_cache_dir", args.cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import onnx_jax

        bad = [b for b in buckets if b not in onnx_jax.BUCKETS]
        if bad:
            return fail(f"--warmup buckets must be among {list(onnx_jax.BUCKETS)}, got {bad}")

        models = {}
        for spec in args.model:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = os.path.splitext(os.path.basename(spec))[0], spec
            if not name or not path:
                return fail(f"--model takes NAME=PATH, got {spec!r}")
            if name in models:
                return fail(f"model name {name!r} given twice")
            start = time.perf_counter()
            models[name] = onnx_jax.Model(onnx_jax.load(path))
            log.info("loaded %s from %s in %.2f s: input %s, %d classes", name, path,
                     time.perf_counter() - start, list(models[name].input_shape), models[name].num_classes)
            if buckets:
                start = time.perf_counter()
                models[name].warmup(buckets)
                log.info("compiled %s for buckets %s in %.1f s", name, buckets, time.perf_counter() - start)
    except Exception as e:
        log.exception("startup failed")
        return fail(f"startup failed: {type(e).__name__}: {e}")

    server = Server(models, args.max_handles, int(args.max_saved_mb * 2**20))
    channel.write({"ok": True, "op": "ready",
                   "models": [{"name": n, "input": list(m.input_shape), "classes": m.num_classes}
                              for n, m in models.items()],
                   "jax": jax.__version__, "threads": threads})
    log.info("ready: %s, jax %s, %d thread(s)", ", ".join(models), jax.__version__, threads)

    while True:
        try:
            frame = channel.read()
        except Truncated as e:
            log.error("%s", e)
            return 1
        if frame is None:
            log.info("stdin closed, exiting")
            return 0
        header, payload = server.handle(*frame)
        try:
            channel.write(header, payload)
        except BrokenPipeError:
            log.info("stdout closed, exiting")
            return 0


if __name__ == "__main__":
    sys.exit(main())
