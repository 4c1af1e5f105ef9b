"""How fast could any server answer a `default` request? ONNX Runtime alone, no server.

A `default` request is 51 rows: each of Lite0/1/2 on its plain view and 16 noisy views.
This times exactly those three session.run calls (17 rows each, random inputs of the
right shapes), with the Python peer's own sessions and settings (app.Model), and prints
the median per request, wall-clock and CPU. A server that spent nothing at all outside
ONNX Runtime would answer one client once per that wall time, and, when the cores are
saturated (4 or 16 clients), serve at most cores / that CPU time requests per second:
the peer's measured latency and CPU per request divided by these bound the speed-up
over the peer that serving code can reach, both servers running the same library on
the same rows (docs/benchmarks.md, "fp32 `default`").

Run: benches/python_peer/.venv/bin/python benches/python_peer/ort_floor.py [ROUNDS]
"""

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import app  # noqa: E402  (the peer's Model: its session options, thread counts)

ROWS = 17


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    models = [app.Model(name) for name in app.MODEL_NAMES]
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((ROWS, 3, m.size, m.size), dtype=np.float32) for m in models]
    for model, batch in zip(models, batches):  # warm-up: arena and kernels
        model.session.run(None, {model.input_name: batch})
    per_request = []
    per_model = {m.name: [] for m in models}
    cpu_started = time.process_time()
    for _ in range(rounds):
        total = 0.0
        for model, batch in zip(models, batches):
            started = time.perf_counter()
            model.session.run(None, {model.input_name: batch})
            took = time.perf_counter() - started
            per_model[model.name].append(took)
            total += took
        per_request.append(total)
    for name, times in per_model.items():
        print(f"{name}: {ROWS} rows in {statistics.median(times) * 1e3:.1f} ms (median of {rounds})")
    cpu = (time.process_time() - cpu_started) / rounds
    floor = statistics.median(per_request)
    print(f"default request, ONNX Runtime alone: {floor * 1e3:.1f} ms wall -> at most {1 / floor:.2f} req/s at one client")
    print(f"  and {cpu * 1e3:.1f} ms CPU -> at most {app.THREADS / cpu:.2f} req/s on {app.THREADS} saturated cores")


if __name__ == "__main__":
    main()
