"""A small Python client for server.py: the reference for the protocol, used by the tests
and the benchmark (the red team's real client is on the Rust side)."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

SERVER = Path(__file__).resolve().parent / "server.py"


class ServerError(Exception):
    """The server answered {"ok": false, "error": ...}."""


class Client:
    def __init__(self, models, threads=None, extra_args=(), python=sys.executable, env=None, stderr=None,
                 wait=True):
        """Start server.py with `models` ({name: path}) and wait for its 'ready' frame (or,
        with wait=False, leave that to wait_ready(), so the server starts in the background)."""
        cmd = [python, str(SERVER)]
        for name, path in models.items():
            cmd += ["--model", f"{name}={path}"]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        cmd += list(extra_args)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                     env=env if env is not None else os.environ.copy())
        self.ready = None
        if wait:
            self.wait_ready()

    def wait_ready(self):
        """Read the 'ready' frame (once) and return it; raises ServerError on a failed start."""
        if self.ready is None:
            self.ready, _ = self.read_frame()
            if not self.ready.get("ok"):
                raise ServerError(self.ready.get("error"))
            self.models = {m["name"]: m for m in self.ready["models"]}
        return self.ready

    # -- framing ------------------------------------------------------------------------

    def send_frame(self, header, payload=b""):
        data = json.dumps(header).encode("utf-8")
        self.proc.stdin.write(struct.pack("<I", len(data)) + data + struct.pack("<Q", len(payload)))
        self.proc.stdin.write(payload)
        self.proc.stdin.flush()

    def _read_exact(self, n):
        data = self.proc.stdout.read(n)
        if len(data) != n:
            raise EOFError(f"server closed stdout ({len(data)} of {n} bytes); exit code {self.proc.poll()}")
        return data

    def read_frame(self):
        (header_len,) = struct.unpack("<I", self._read_exact(4))
        header = json.loads(self._read_exact(header_len).decode("utf-8"))
        (payload_len,) = struct.unpack("<Q", self._read_exact(8))
        return header, self._read_exact(payload_len)

    def request(self, header, payload=b""):
        """Send one frame and return (header, payload) of the answer, raising on ok=false."""
        self.send_frame(header, payload)
        answer, data = self.read_frame()
        if not answer.get("ok"):
            raise ServerError(answer.get("error"))
        return answer, data

    # -- ops ----------------------------------------------------------------------------

    @staticmethod
    def _payload(x):
        return np.ascontiguousarray(x, dtype="<f4").tobytes()

    def forward(self, model, x):
        """-> (handle, logits [N, C])."""
        h, data = self.request({"op": "forward", "model": model, "rows": len(x)}, self._payload(x))
        return h["handle"], np.frombuffer(data, "<f4").reshape(h["rows"], h["classes"])

    def backward(self, model, handle, cotangent):
        """-> gradient [N, 3, H, W] of <cotangent, logits> with respect to the input."""
        h, data = self.request({"op": "backward", "handle": handle}, self._payload(cotangent))
        return np.frombuffer(data, "<f4").reshape([h["rows"]] + self.models[model]["input"])

    def release(self, handle):
        self.request({"op": "release", "handle": handle})

    def logits(self, model, x):
        h, data = self.request({"op": "logits", "model": model, "rows": len(x)}, self._payload(x))
        return np.frombuffer(data, "<f4").reshape(h["rows"], h["classes"])

    def close(self, timeout=60):
        """Close stdin (the server exits 0 on EOF) and return its exit code."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            try:
                self.close()
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
