"""Tests of models/gradients: JAX evaluation of the ONNX graphs, its gradients, the server.

Run from the repository root, after `make setup` (models/*.onnx and testdata/imagenet/):

    .venv/bin/python -m unittest models/gradients/test_gradients.py -v

  parity     JAX logits == onnxruntime logits (max abs diff < 1e-3) on the sample photos,
             for Lite0/1/2; a tiny graph with every other supported op, against onnxruntime
  gradient   float64, for Lite0/1/2: directional derivatives of <w, logits> and of the
             cross-entropy of the true class == central finite differences (relative error < 1e-4);
             float32 gradient == float64 gradient (cosine > 0.999)
  protocol   server.py as a subprocess: ready/forward/backward/release/logits/error frames,
             gradient == the in-process one

Measured figures are printed to stderr (`-v` shows them next to the test names).
"""

import csv
import importlib.util
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
import unittest
import unittest.mock
from pathlib import Path

import jax

# float64 for the finite-difference checks. Everything in onnx_jax is dtype-explicit, so the
# float32 paths below stay float32 (the dtype checks in the tests make sure of it).
jax.config.update("jax_enable_x64", True)

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import onnx_jax  # noqa: E402
from client import Client, ServerError  # noqa: E402

MODELS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
IMAGES = ROOT / "testdata" / "imagenet"
PARITY_TOLERANCE = 1e-3
FD_TOLERANCE = 1e-4
COSINE_MIN = 0.999


def report(message):
    print(f"  [{message}]", file=sys.stderr, flush=True)


def _load_reference():
    """models/convert/reference.py, for its preprocessing (the project's reference one)."""
    spec = importlib.util.spec_from_file_location("reference", ROOT / "models" / "convert" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()


def card(name):
    with open(ROOT / "models" / f"{name}.toml", "rb") as f:
        return tomllib.load(f)


def onnx_file(name):
    return ROOT / "models" / card(name)["file"]


def samples():
    with open(IMAGES / "labels.csv", newline="") as f:
        return [(IMAGES / row["file"], int(row["class_id"])) for row in csv.DictReader(f)]


def photos(name, count=None):
    """(x [N, 3, H, W] float32 preprocessed as the model card says, labels [N])."""
    chosen = samples()[:count]
    x = np.stack([reference.preprocess(path, card(name)["input"]) for path, _ in chosen]).astype(np.float32)
    return x, np.array([label for _, label in chosen])


_models = {}


def model(name, dtype=np.float32):
    """One onnx_jax.Model per (name, dtype), shared by the tests (compiles are the slow part)."""
    key = (name, np.dtype(dtype))
    if key not in _models:
        graph = _models.get((name, "graph")) or onnx_jax.load(onnx_file(name))
        _models[(name, "graph")] = graph
        _models[key] = onnx_jax.Model(graph, dtype)
    return _models[key]


def ort_session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def ort_run(session, x):
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def cross_entropy_and_cotangent(logits, labels):
    """Summed cross-entropy of the true classes, and its gradient with respect to the logits."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_p = shifted - log_z
    rows = np.arange(len(labels))
    cotangent = np.exp(log_p)
    cotangent[rows, labels] -= 1.0
    return -log_p[rows, labels].sum(), cotangent


def switched_units(a, b):
    """How many Clip/Relu units are in a different region (below, inside, above) in two
    forward passes. Their VJPs keep exactly that: one uint8 region code per unit."""
    def regions(pullback):
        return [leaf for _, vjp in pullback.pieces for leaf in jax.tree_util.tree_leaves(vjp)
                if leaf.dtype == np.uint8]
    return int(sum((np.asarray(ra) != np.asarray(rb)).sum() for ra, rb in zip(regions(a), regions(b))))


_server = None
_server_stderr = None


def setUpModule():
    missing = [str(onnx_file(n)) for n in MODELS if not onnx_file(n).exists()]
    if not (IMAGES / "labels.csv").exists():
        missing.append(str(IMAGES / "labels.csv"))
    if missing:
        raise unittest.SkipTest(f"run `make setup` first; missing: {', '.join(missing)}")
    # The server for ProtocolTest starts now and compiles its buckets while the in-process
    # tests run (ProtocolTest reads its 'ready' frame).
    global _server, _server_stderr
    _server_stderr = tempfile.TemporaryFile()
    _server = Client({"lite0": onnx_file(MODELS[0])}, threads=2, extra_args=["--warmup", "1,2"],
                     stderr=_server_stderr, wait=False)


def tearDownModule():
    if _server is not None:
        _server.__exit__(None, None, None)
        _server_stderr.close()


# --------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------

class ParityTest(unittest.TestCase):
    def test_logits_match_onnxruntime_on_sample_photos(self):
        for name in MODELS:
            with self.subTest(model=name):
                x, labels = photos(name)
                m = model(name)
                start = time.perf_counter()
                ours = m.logits(x)
                elapsed = time.perf_counter() - start
                theirs = ort_run(ort_session(onnx_file(name)), x)
                self.assertEqual(ours.dtype, np.float32)
                self.assertEqual(ours.shape, (len(x), card(name)["num_classes"]))
                diff = float(np.abs(ours - theirs).max())
                report(f"{name}: {len(x)} photos, max |JAX - onnxruntime| = {diff:.2e} "
                       f"(max |logit| {np.abs(theirs).max():.1f}); compile+run {elapsed:.1f} s")
                self.assertLess(diff, PARITY_TOLERANCE)
                np.testing.assert_array_equal(ours.argmax(1), theirs.argmax(1))

    def test_chunks_and_padding_give_the_same_rows(self):
        # 3 rows (padded to the bucket of 4) and each row alone (bucket 1) agree.
        name = MODELS[0]
        x, _ = photos(name, 3)
        m = model(name)
        together = m.logits(x)
        alone = np.concatenate([m.logits(x[i:i + 1]) for i in range(3)])
        np.testing.assert_allclose(together, alone, rtol=0, atol=1e-4)
        self.assertEqual(onnx_jax._chunks(3), [(0, 3, 4)])
        self.assertEqual(onnx_jax._chunks(130), [(0, 64, 64), (64, 128, 64), (128, 130, 2)])

    def test_batches_larger_than_the_largest_bucket_are_split(self):
        # With buckets (1, 2), 3 rows run as a chunk of 2 and a chunk of 1; logits and the
        # gradient equal those of the 3 rows in one bucket of 4.
        name = MODELS[0]
        x, _ = photos(name, 3)
        m = model(name)
        ct = np.random.default_rng(6).standard_normal((3, m.num_classes)).astype(np.float32)
        whole_logits, whole = m.forward(x)
        with unittest.mock.patch.object(onnx_jax, "BUCKETS", (1, 2)):
            split_logits, split = m.forward(x)
            self.assertEqual([p[0] for p in split.pieces], [(0, 2, 2), (2, 3, 1)])
            split_grad = split(ct)
        np.testing.assert_allclose(split_logits, whole_logits, rtol=0, atol=1e-4)
        grad = whole(ct)
        np.testing.assert_allclose(split_grad, grad, rtol=0, atol=1e-5 * np.abs(grad).max())


def _tiny_graph(opset):
    """A small graph with every supported op the EfficientNets do not use, plus the Conv
    variants they do not use (explicit pads, dilations, grouped non-depthwise, SAME_LOWER)."""
    rng = np.random.default_rng(7)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)

    inits = [init("w1", 6, 3, 3, 3), init("b1", 6), init("w2", 6, 2, 3, 3), init("w3", 6, 1, 3, 3), init("b3", 6),
             init("w4", 6, 6, 1, 1), init("scale", 1), init("offset", 6, 1, 1), init("div", 1, 6, 1, 1),
             init("m", 6, 5), init("g", 4, 5), init("gc", 4),
             numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape")]
    inits[8] = numpy_helper.from_array(rng.uniform(1.0, 2.0, (1, 6, 1, 1)).astype(np.float32), "div")
    if opset >= 11:
        inits += [numpy_helper.from_array(np.array([-0.4], np.float32), "clip_lo"),
                  numpy_helper.from_array(np.array([0.7], np.float32), "clip_hi")]
    clip = (helper.make_node("Clip", ["c4"], ["k"], min=-0.4, max=0.7) if opset < 11
            else helper.make_node("Clip", ["c4", "clip_lo", "clip_hi"], ["k"]))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 2, 2, 1], dilations=[2, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], group=3, strides=[2, 1], pads=[1, 1, 0, 1], dilations=[1, 2]),
        # (onnxruntime supports no dilations with SAME_*; the depthwise dilation case is the next one)
        helper.make_node("Conv", ["c2", "w3", "b3"], ["c3"], group=6, strides=[2, 2], auto_pad="SAME_LOWER"),
        helper.make_node("Conv", ["c3", "w3"], ["c3b"], group=6, pads=[2, 1, 2, 1], dilations=[2, 1]),
        helper.make_node("Conv", ["c3b", "w4"], ["c4"], auto_pad="VALID"),
        clip,
        helper.make_node("Sigmoid", ["k"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["s2"]),
        helper.make_node("Sub", ["s2", "offset"], ["s3"]),
        helper.make_node("Div", ["s3", "div"], ["s4"]),
        helper.make_node("Add", ["s4", "c4"], ["s5"]),
        helper.make_node("GlobalAveragePool", ["s5"], ["p"]),
        helper.make_node("Reshape", ["p", "flat_shape"], ["f"]),
        helper.make_node("MatMul", ["f", "m"], ["mm"]),
        helper.make_node("Gemm", ["mm", "g", "gc"], ["gm"], transB=1, alpha=0.5, beta=2.0),
        # [4, 4]: not per-row, only for parity; C is optional from opset 11 on
        helper.make_node("Gemm", ["gm", "gm"] + (["gc"] if opset < 11 else []), ["gram"], transA=1),
        helper.make_node("Identity", ["gm"], ["i"]),
        helper.make_node("Softmax", ["i"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 13, 11])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("gram", TensorProto.FLOAT, [4, 4])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8 if opset >= 11 else 5)
    onnx.checker.check_model(m)
    return m


class TinyGraphTest(unittest.TestCase):
    def _check(self, opset, depthwise):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tiny.onnx"
            onnx.save(_tiny_graph(opset), path)
            graph = onnx_jax.load(path, depthwise=depthwise)
            x = np.random.default_rng(1).standard_normal((3, 3, 13, 11)).astype(np.float32)
            expected_y, expected_gram = ort_session(path).run(None, {"x": x})
            ours = onnx_jax.Model(graph).logits(x)
            np.testing.assert_allclose(ours, expected_y, rtol=0, atol=1e-5)
            # the second output (Gemm with transA) through a graph that returns it
            graph.output_name = "gram"
            gram = jax.jit(graph.apply)(graph.cast_params(np.float32), x)
            np.testing.assert_allclose(np.asarray(gram), expected_gram, rtol=1e-5, atol=1e-5)

            # gradient of the tiny graph, float64 vs central differences
            graph.output_name = "y"
            params64 = graph.cast_params(np.float64)
            x64 = x.astype(np.float64)
            w = np.random.default_rng(2).standard_normal((3, 4))
            v = np.random.default_rng(3).standard_normal(x.shape)
            f = jax.jit(lambda x: (graph.apply(params64, x) * w).sum())
            grad = np.asarray(jax.grad(f)(x64))
            h = 1e-6
            fd = (float(f(x64 + h * v)) - float(f(x64 - h * v))) / (2 * h)
            ad = float((grad * v).sum())
            self.assertLess(abs(fd - ad) / abs(ad), FD_TOLERANCE, (fd, ad))

    def test_opset17_ops_match_onnxruntime(self):
        self._check(17, "taps")

    def test_opset17_ops_with_lax_depthwise(self):
        self._check(17, "lax")

    def test_opset10_clip_and_softmax_attributes(self):
        self._check(10, "taps")

    def test_parameter_gradients_match_lax_depthwise(self):
        # The depthwise VJP is hand-written (onnx_jax._depthwise_op); with respect to the
        # weights as well as the input it must equal autodiff of conv_general_dilated.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tiny.onnx"
            onnx.save(_tiny_graph(17), path)
            taps, lax_graph = onnx_jax.load(path, depthwise="taps"), onnx_jax.load(path, depthwise="lax")
        x = np.random.default_rng(4).standard_normal((2, 3, 13, 11))
        params = taps.cast_params(np.float64)
        weights = np.random.default_rng(5).standard_normal((2, 4))
        (gp_taps, gx_taps), (gp_lax, gx_lax) = (
            jax.jit(jax.grad(lambda p, x, g=g: (jax.numpy.log(g.apply(p, x)) * weights).sum(), argnums=(0, 1)))(params, x)
            for g in (taps, lax_graph))
        np.testing.assert_allclose(gx_taps, gx_lax, rtol=1e-9, atol=1e-12)
        for name in ("w3", "b3", "w1", "w4"):
            np.testing.assert_allclose(gp_taps[name], gp_lax[name], rtol=1e-9, atol=1e-12, err_msg=name)
        self.assertGreater(float(np.abs(gp_taps["w3"]).max()), 0.0)

    def test_unsupported_op_is_named(self):
        node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2, 2])])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "maxpool.onnx"
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
            with self.assertRaisesRegex(onnx_jax.UnsupportedGraph, "unsupported ONNX op.*MaxPool"):
                onnx_jax.load(path)


# --------------------------------------------------------------------------------------
# gradient
# --------------------------------------------------------------------------------------

class GradientTest(unittest.TestCase):
    NAME = MODELS[0]
    ROWS = 2  # photos (the float64 passes are the slow part)
    FIRST_STEP = 1e-8  # central-difference step along a direction with N(0, 1) entries

    @classmethod
    def setUpClass(cls):
        cls.x, cls.labels = photos(cls.NAME, cls.ROWS)
        cls.m64 = model(cls.NAME, np.float64)
        cls.m32 = model(cls.NAME, np.float32)
        rng = np.random.default_rng(0)
        cls.w = rng.standard_normal((cls.ROWS, cls.m64.num_classes))
        cls.v = rng.standard_normal(cls.x.shape)  # one direction per row
        x64 = cls.x.astype(np.float64)
        start = time.perf_counter()
        cls.logits64, pullback = cls.m64.forward(x64)
        _, cls.ce_cotangent = cross_entropy_and_cotangent(cls.logits64, cls.labels)
        cls.grad_w64 = pullback(cls.w)
        cls.grad_ce64 = pullback(cls.ce_cotangent)  # a Pullback can be applied more than once

        # Central differences. The graphs are piecewise linear in x (ReLU6 kinks): a step
        # that moves any ReLU6 input across 0 or 6 measures a mix of two pieces (at h = 1e-6
        # about 20 of Lite0's 6 million units per photo switch, and the error is ~1e-2). So
        # the step is shrunk until no unit switches between x - h v and x + h v; within one
        # piece the difference is exact up to float64 rounding.
        cls.step = cls.FIRST_STEP
        for _ in range(4):
            cls.plus, plus_pullback = cls.m64.forward(x64 + cls.step * cls.v)
            cls.minus, minus_pullback = cls.m64.forward(x64 - cls.step * cls.v)
            cls.switched = switched_units(plus_pullback, minus_pullback)
            if cls.switched == 0:
                break
            cls.step /= 4
        report(f"{cls.NAME} float64 forward/backward/differences: {time.perf_counter() - start:.1f} s; "
               f"step {cls.step:.1e}, {cls.switched} ReLU6 units switch between x - h v and x + h v")

    def test_no_kink_inside_the_difference_step(self):
        self.assertEqual(self.switched, 0)

    def test_float64_is_float64(self):
        self.assertEqual(self.logits64.dtype, np.float64)
        self.assertEqual(self.grad_w64.dtype, np.float64)
        self.assertEqual(self.grad_w64.shape, self.x.shape)

    def _compare(self, what, ad, fd):
        rel = np.abs(fd - ad) / np.abs(ad)
        report(f"{self.NAME} {what}: directional derivative AD {ad} vs FD {fd}: relative error {rel.max():.1e}")
        self.assertTrue(np.all(rel < FD_TOLERANCE), rel)

    def test_linear_functional_matches_finite_differences(self):
        ad = (self.grad_w64 * self.v).sum(axis=(1, 2, 3))
        fd = ((self.plus - self.minus) * self.w).sum(axis=1) / (2 * self.step)
        self._compare("<w, logits>", ad, fd)

    def test_cross_entropy_matches_finite_differences(self):
        ad = (self.grad_ce64 * self.v).sum(axis=(1, 2, 3))
        fd = np.array([(cross_entropy_and_cotangent(self.plus[i:i + 1], self.labels[i:i + 1])[0]
                        - cross_entropy_and_cotangent(self.minus[i:i + 1], self.labels[i:i + 1])[0])
                       / (2 * self.step) for i in range(self.ROWS)])
        self._compare("cross-entropy of the true class", ad, fd)

    def test_float32_gradient_agrees_with_float64(self):
        logits32, pullback = self.m32.forward(self.x)
        self.assertEqual(logits32.dtype, np.float32)
        np.testing.assert_allclose(logits32, self.logits64, rtol=0, atol=1e-3)
        for what, ct, g64 in (("<w, logits>", self.w, self.grad_w64), ("cross-entropy", self.ce_cotangent, self.grad_ce64)):
            g32 = pullback(ct.astype(np.float32))
            self.assertEqual(g32.dtype, np.float32)
            a, b = g32.reshape(self.ROWS, -1).astype(np.float64), g64.reshape(self.ROWS, -1)
            cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
            report(f"{self.NAME} {what}: float32 vs float64 gradient cosine {cosine.min():.7f}, "
                   f"relative L2 difference {rel.max():.1e}")
            self.assertTrue(np.all(cosine > COSINE_MIN), cosine)


class GradientTestLite1(GradientTest):
    """The same checks on Lite1 (one photo: the float64 passes of the larger models are slow)."""
    NAME = MODELS[1]
    ROWS = 1


class GradientTestLite2(GradientTest):
    NAME = MODELS[2]
    ROWS = 1


# --------------------------------------------------------------------------------------
# protocol
# --------------------------------------------------------------------------------------

class ProtocolTest(unittest.TestCase):
    NAME = MODELS[0]
    ROWS = 2  # the same bucket as GradientTest's float32 pass, so its compile is reused

    @classmethod
    def setUpClass(cls):
        start = time.perf_counter()
        cls.client = _server
        try:
            cls.client.wait_ready()
        except (ServerError, EOFError):
            _server_stderr.seek(0)
            raise AssertionError(f"server failed to start:\n{_server_stderr.read().decode(errors='replace')}")
        report(f"server ready (started with the tests, --warmup 1,2) after {time.perf_counter() - start:.1f} s "
               f"more: {cls.client.ready}")
        cls.x, _ = photos(cls.NAME, cls.ROWS)

    def expect_error(self, header, payload=b"", match=""):
        with self.assertRaisesRegex(ServerError, match):
            self.client.request(header, payload)

    def test_ready_frame(self):
        ready = self.client.ready
        self.assertEqual(ready["op"], "ready")
        self.assertEqual(ready["jax"], jax.__version__)
        self.assertEqual(ready["threads"], 2)
        self.assertEqual(ready["models"], [{"name": "lite0", "input": [3, 224, 224], "classes": 1000}])

    def test_forward_backward_equal_in_process(self):
        start = time.perf_counter()
        handle, logits = self.client.forward("lite0", self.x)
        self.assertEqual(logits.shape, (self.ROWS, 1000))
        cotangent = np.random.default_rng(5).standard_normal(logits.shape).astype(np.float32)
        grad = self.client.backward("lite0", handle, cotangent)
        report(f"server forward+backward, {self.ROWS} rows: {time.perf_counter() - start:.2f} s")
        self.assertEqual(grad.shape, self.x.shape)

        ours_logits, pullback = model(self.NAME).forward(self.x)
        ours = pullback(cotangent)
        np.testing.assert_allclose(logits, ours_logits, rtol=0, atol=1e-5)
        scale = np.abs(ours).max()
        report(f"server vs in-process gradient: max abs diff {np.abs(grad - ours).max():.1e} (max |grad| {scale:.1e})")
        np.testing.assert_allclose(grad, ours, rtol=0, atol=1e-5 * scale)

        # the handle was freed by backward
        self.expect_error({"op": "backward", "handle": handle}, cotangent.tobytes(), "unknown handle")

    def test_logits_and_release(self):
        logits = self.client.logits("lite0", self.x[:1])
        self.assertEqual(logits.shape, (1, 1000))
        expected = ort_run(ort_session(onnx_file(self.NAME)), self.x[:1])
        self.assertLess(np.abs(logits - expected).max(), PARITY_TOLERANCE)

        handle, _ = self.client.forward("lite0", self.x[:1])
        self.client.release(handle)
        self.expect_error({"op": "release", "handle": handle}, match="unknown handle")

    def test_errors_keep_the_server_serving(self):
        good = self.x[:1].tobytes()
        self.expect_error({"op": "forward", "model": "nope", "rows": 1}, good, "unknown model 'nope'")
        self.expect_error({"op": "forward", "model": "lite0", "rows": 2}, good, "payload has 602112 bytes")
        self.expect_error({"op": "forward", "model": "lite0", "rows": 0}, b"", "rows")
        self.expect_error({"op": "logits", "model": "lite0"}, good, "rows")
        self.expect_error({"op": "fly"}, match="unknown op 'fly'")
        self.expect_error({"op": "backward", "handle": 10**9}, match="unknown handle")
        self.expect_error({"op": "backward", "handle": "x"}, match="unknown handle")
        # a header that is not JSON is answered too (the frame length is still known)
        self.client.proc.stdin.write(struct.pack("<I", 3) + b"{x}" + struct.pack("<Q", 0))
        self.client.proc.stdin.flush()
        answer, payload = self.client.read_frame()
        self.assertFalse(answer["ok"])
        self.assertIn("JSON", answer["error"])
        self.assertEqual(payload, b"")
        # a wrong cotangent size keeps the handle
        handle, logits = self.client.forward("lite0", self.x[:1])
        self.expect_error({"op": "backward", "handle": handle}, b"\0" * 8, "cotangent")
        self.client.backward("lite0", handle, np.zeros_like(logits))
        # and the server still answers
        self.assertEqual(self.client.logits("lite0", self.x[:1]).shape, (1, 1000))


class ServerProcessTest(unittest.TestCase):
    def run_server(self, args, stdin=b""):
        return subprocess.run([sys.executable, str(HERE / "server.py")] + args, input=stdin,
                              capture_output=True, timeout=120)

    def read_frames(self, data):
        frames = []
        while data:
            (n,) = struct.unpack("<I", data[:4])
            header = data[4:4 + n]
            (m,) = struct.unpack("<Q", data[4 + n:12 + n])
            frames.append((header, data[12 + n:12 + n + m]))
            data = data[12 + n + m:]
        return frames

    def test_eof_exits_0_and_stdout_has_only_frames(self):
        done = self.run_server(["--model", f"lite0={onnx_file(MODELS[0])}", "--threads", "1"])
        self.assertEqual(done.returncode, 0, done.stderr.decode())
        frames = self.read_frames(done.stdout)
        self.assertEqual(len(frames), 1)
        self.assertIn(b'"threads":1', frames[0][0])
        self.assertIn(b"stdin closed", done.stderr)

    def test_bad_model_file_fails_at_start(self):
        done = self.run_server(["--model", "x=/nonexistent.onnx"])
        self.assertEqual(done.returncode, 1)
        (header, payload), = self.read_frames(done.stdout)
        self.assertIn(b'"ok":false', header)
        self.assertIn(b"nonexistent", header)


if __name__ == "__main__":
    unittest.main()
