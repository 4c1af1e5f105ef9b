"""Does ONNX Runtime's thread spinning pay for a one-row run between requests?

Times Lite0 on one row, as a `none` request runs it: before each run a JPEG decode (the
bench's 512² body through PIL, which moves other data through the caches) and after it a
2.5 ms pause (the gap between requests at one client). Three settings of a session with
2 intra-op threads: `off` (spinning off, as pandaguard and the Python peer run), `during`
(threads spin between a run's operators and go to sleep as soon as it returns:
`session.force_spinning_stop`) and `always` (ONNX Runtime's default: spinning on, and
idle threads keep spinning for a while after a run). Prints the median run time and the
process CPU per iteration (decode, run and the pause's wake-up included).

This measures ONNX Runtime alone; whether a setting is worth it in a server depends on
what else wants the cores (docs/configuration.md, "Spinning is off": `during` was faster
here and lost every row of the HTTP bench with one core busy).

Run: benches/python_peer/.venv/bin/python benches/python_peer/spin_probe.py [RUNS]
"""

import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {
    "off": {"session.intra_op.allow_spinning": "0"},
    "during": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"},
    "always": {"session.intra_op.allow_spinning": "1"},
}


def body():
    """A 512² JPEG made from the first sample photo, like the HTTP bench's body."""
    photo = Image.open(sorted((ROOT / "testdata" / "imagenet").glob("*.jpg"))[0]).convert("RGB")
    out = io.BytesIO()
    photo.resize((512, 512), Image.Resampling.LANCZOS).save(out, "JPEG", quality=90)
    return out.getvalue()


def probe(name, entries, jpeg, runs):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    for key, value in entries.items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(ROOT / "models" / "efficientnet-lite0.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, 224, 224), np.float32)}
    for _ in range(20):
        session.run(None, feed)
    times = []
    cpu_started = time.process_time()
    for _ in range(runs):
        Image.open(io.BytesIO(jpeg)).convert("RGB").load()
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
        time.sleep(0.0025)
    cpu = (time.process_time() - cpu_started) / runs
    print(f"{name:7} run {statistics.median(times) * 1e3:.2f} ms (median of {runs}), CPU {cpu * 1e3:.2f} ms per iteration")


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    jpeg = body()
    for round_ in range(2):
        for name, entries in SETTINGS.items():
            probe(name, entries, jpeg, runs)


if __name__ == "__main__":
    main()
