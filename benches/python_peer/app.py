"""The Python peer of pandaguard's HTTP benchmark (benches/http_load.rs, `make bench`).

A FastAPI + onnxruntime service written to do the same work as pandaguard, as well as
a straightforward Python service can, so that the benchmark compares like with like:

  POST /classify?defense=none|fast|default&top_k=5   body: the raw image bytes
  GET  /health                                       200 once the models are loaded

- decode with PIL, preprocess exactly like models/convert/reference.py (shorter side to
  floor(size / crop_fraction), bilinear, centre crop, (x - mean) / std, NCHW), once per
  model at that model's input size;
- presets as in config/default.toml: `none` = Lite0 on the plain view (1 row), `fast` =
  Lite0/1/2 on their plain views (3 rows), `default` = each model on its plain view and
  16 noisy views, N(0, 0.05^2) in [0,1] pixel units, clipped to [0,1] (51 rows);
- ONE session.run per model per request (all of that model's views in one batch);
  softmax, mean over a model's views, mean over the models; raw = Lite0's plain view;
- one InferenceSession per model, intra-op threads = cores (PEER_THREADS), inter-op 1,
  thread spinning off so the three pools do not fight; one session.run at a time (a
  lock, like pandaguard's `runtime.max_concurrent_runs = 1`): decoding and views of other
  requests go on meanwhile. PEER_RUN_LOCK=0 lets runs overlap: on 2 cores no faster, and
  16 concurrent `default` requests then took the process past 7 GB (ORT's memory
  arena grows with the runs in flight);
- all CPU work in Starlette's thread pool, never on the event loop.

Run (the benchmark does this): benches/python_peer/.venv/bin/python -m uvicorn app:app
  --app-dir benches/python_peer --host 127.0.0.1 --port 8090 --loop uvloop --http httptools
"""

import io
import json
import math
import os
import threading
import tomllib
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

ROOT = Path(os.environ.get("PEER_PROJECT_ROOT", Path(__file__).resolve().parents[2]))
MODEL_NAMES = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
RAW_MODEL = "efficientnet-lite0"
THREADS = int(os.environ.get("PEER_THREADS", "0")) or os.cpu_count() or 1
RUN_LOCK = None if os.environ.get("PEER_RUN_LOCK", "1") == "0" else threading.Lock()
MAX_TOP_K = 20
SIGMA = 0.05
# preset -> (models, noisy views per model)
PRESETS = {
    "none": ([RAW_MODEL], 0),
    "fast": (MODEL_NAMES, 0),
    "default": (MODEL_NAMES, 16),
}


class Model:
    def __init__(self, name):
        with open(ROOT / "models" / f"{name}.toml", "rb") as f:
            card = tomllib.load(f)
        spec = card["input"]
        if spec["height"] != spec["width"] or spec["resize"] != "shorter_side_center_crop" \
                or spec["interpolation"] != "bilinear" or spec["layout"] != "NCHW" or spec["color"] != "RGB":
            raise SystemExit(f"{name}: unsupported [input] settings {spec}")
        self.name = name
        self.size = spec["width"]
        self.crop_fraction = spec["crop_fraction"]
        self.mean = np.array(spec["mean"], np.float32)
        self.inv_std = np.float32(1.0) / np.array(spec["std"], np.float32)
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(ROOT / "models" / card["file"]), sess_options=options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def pixels(self, image):
        """RGB PIL image -> HWC float32 in [0, 1] at the model's input size (reference.py)."""
        size = self.size
        if image.size != (size, size):
            width, height = image.size
            shorter = math.floor(size / self.crop_fraction)
            if width <= height:
                resized = (shorter, round(height * shorter / width))
            else:
                resized = (round(width * shorter / height), shorter)
            image = image.resize(resized, Image.Resampling.BILINEAR)
            left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.float32) / np.float32(255.0)

    def views(self, pixels, samples, rng):
        """The plain view and `samples` noisy views, normalized, as one NCHW batch."""
        batch = np.empty((1 + samples,) + pixels.shape, np.float32)
        batch[0] = pixels
        if samples:
            noisy = batch[1:]
            rng.standard_normal(out=noisy, dtype=np.float32)
            noisy *= np.float32(SIGMA)
            noisy += pixels
            np.clip(noisy, 0.0, 1.0, out=noisy)
        batch -= self.mean
        batch *= self.inv_std
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))

    def probabilities(self, batch):
        """One session.run over the batch; softmax per row."""
        if RUN_LOCK is None:
            logits = self.session.run(None, {self.input_name: batch})[0]
        else:
            with RUN_LOCK:
                logits = self.session.run(None, {self.input_name: batch})[0]
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)


MODELS = {}
LABELS = []


class InvalidImage(Exception):
    pass


def top_k(probs, k):
    best = np.argpartition(-probs, k - 1)[:k]
    best = best[np.argsort(-probs[best], kind="stable")]
    return [{"class_id": int(i), "label": LABELS[i], "probability": float(probs[i])} for i in best]


def prediction(probs, k):
    ranking = top_k(probs, k)
    first = ranking[0]
    return {"class_id": first["class_id"], "label": first["label"], "confidence": first["probability"],
            "top_k": ranking}


def member(name, probs):
    best = int(np.argmax(probs))
    return {"model": name, "class_id": best, "label": LABELS[best], "confidence": float(probs[best])}


def classify(body, preset, k):
    try:
        with Image.open(io.BytesIO(body)) as image:
            image = image.convert("RGB")
    except Exception as error:  # PIL raises many kinds for bad data
        raise InvalidImage(str(error)) from error
    names, samples = PRESETS[preset]
    rng = np.random.default_rng()
    members = []
    raw = None
    for name in names:
        model = MODELS[name]
        probs = model.probabilities(model.views(model.pixels(image), samples, rng))
        if name == RAW_MODEL:
            raw = probs[0]
        members.append((name, probs.mean(axis=0)))
    rows = len(names) * (1 + samples)
    answer = {"request_id": str(uuid.uuid4()), "model": RAW_MODEL, "raw": prediction(raw, k)}
    if preset == "none":
        defended = raw
        answer["defended"] = dict(prediction(raw, k), abstained=False, method="none (raw)")
        answer["defenses"] = []
    else:
        defended = np.mean([p for _, p in members], axis=0)
        answer["defended"] = dict(prediction(defended, k), abstained=False, method="mean of ensemble")
        answer["defenses"] = [{
            "name": "ensemble", "views": rows,
            "members": [member(name, p) for name, p in members],
        }]
    squeeze = float(np.abs(raw - defended).sum())
    answer["suspicious"] = bool(int(np.argmax(raw)) != int(np.argmax(defended)) or squeeze > 0.97)
    answer["squeeze_score"] = squeeze
    answer["preset"] = preset
    answer["rows"] = rows
    return answer


def error(status, code, message):
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


@asynccontextmanager
async def lifespan(_app):
    LABELS.extend((ROOT / "models" / "imagenet_labels.txt").read_text().splitlines())
    for name in MODEL_NAMES:
        model = Model(name)
        # Warm-up, as pandaguard does at start-up: one run per model.
        model.probabilities(np.zeros((1, 3, model.size, model.size), np.float32))
        MODELS[name] = model
    yield


app = FastAPI(lifespan=lifespan)


@app.get("/health")
async def health():
    return {"status": "ready" if len(MODELS) == len(MODEL_NAMES) else "loading"}


@app.post("/classify")
async def classify_route(request: Request, defense: str = "default", top_k: int = 5):
    if defense not in PRESETS:
        return error(422, "invalid_parameter", f"defense: one of {', '.join(PRESETS)}")
    if not 1 <= top_k <= MAX_TOP_K:
        return error(422, "invalid_parameter", f"top_k: 1 to {MAX_TOP_K}")
    body = await request.body()
    if not body:
        return error(400, "invalid_image", "empty body")
    try:
        answer = await run_in_threadpool(classify, body, defense, top_k)
    except InvalidImage as e:
        return error(400, "invalid_image", f"not a recognised image: {e}")
    return Response(json.dumps(answer), media_type="application/json")
