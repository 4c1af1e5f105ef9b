"""Evaluate an ONNX classifier graph as a pure JAX function, so it can be differentiated.

    graph = onnx_jax.load("models/efficientnet-lite0.onnx")
    logits = graph.apply(graph.params, x)          # pure: jax.grad / jax.vjp / jax.jit work on it

    model = onnx_jax.Model(graph)                  # jit-compiled, batch padded to BUCKETS
    logits = model.logits(x)                       # x: float32 [N, 3, H, W], normalized
    logits, pullback = model.forward(x)            # keeps the VJP of this call
    grad_x = pullback(cotangent)                   # cotangent: [N, classes] -> d<ct, logits>/dx

The graph is interpreted node by node while JAX traces it, so the function that gets
compiled computes exactly the ONNX graph: the same weights (read from the file's
initializers, not from a second copy), the same padding, the same ops in the same order.
For speed on XLA:CPU, activations are kept channels-last between convolutions and
depthwise convolutions are evaluated as shifted multiply-adds with their own VJP (see
README.md); both are exact rewrites. Only the ops in SUPPORTED_OPS are implemented; a
graph with any other op is refused at load time with an error naming it.

Gradient conventions at kinks follow the usual deep-learning ones: Relu has gradient 0 at
0, Clip passes the gradient only strictly inside (min, max).
"""

import math
from dataclasses import dataclass, field
from functools import lru_cache, partial

import numpy as np
import onnx
from onnx import numpy_helper

import jax
import jax.numpy as jnp
from jax import lax

# Batch sizes the compiled functions are specialised for. A batch of N rows is padded with
# zero rows up to the smallest bucket >= N (the padded rows are dropped from the results;
# nothing in these graphs mixes rows), and a batch of more than the largest bucket is split
# into chunks of that size. So at most len(BUCKETS) shapes per model are ever compiled.
BUCKETS = (1, 2, 4, 8, 16, 32, 64)

HIGHEST = lax.Precision.HIGHEST


class UnsupportedGraph(ValueError):
    """The ONNX graph uses an op, attribute or structure this module does not implement."""


@dataclass
class Node:
    op: str
    name: str
    inputs: list  # value names; "" for an omitted optional input
    outputs: list
    attrs: dict


@dataclass
class Graph:
    """An ONNX graph with one data input [N, C, H, W] and one output [N, classes]."""

    path: str
    opset: int
    input_name: str
    input_shape: tuple  # (C, H, W), without the batch dimension
    output_name: str
    nodes: list
    params: dict  # float initializers (and float Constant nodes): name -> np.ndarray
    constants: dict = field(default_factory=dict)  # non-float initializers, used statically
    num_classes: int = 0
    # How depthwise convs (group == channels) are evaluated: "taps" (shifted multiply-adds,
    # fast on CPU) or "lax" (conv_general_dilated with feature_group_count). Same values.
    depthwise: str = "taps"

    def apply(self, params, x):
        """logits = f(params, x): the graph evaluated with JAX ops. Pure and traceable."""
        env = {self.input_name: x}

        def value(name):
            if name == "":
                return None
            if name in env:
                return env[name]
            if name in params:
                return params[name]
            if name in self.constants:
                return self.constants[name]
            raise UnsupportedGraph(f"{self.path}: value {name!r} is used before it is produced "
                                   "(graph not topologically sorted, or a missing initializer)")

        for node in self.nodes:
            inputs = [value(n) for n in node.inputs]
            if node.op not in LAYOUT_AWARE:
                inputs = [canonical(v) for v in inputs]
            results = OPS[node.op](self, node, inputs)
            for name, result in zip(node.outputs, results):
                if name:
                    env[name] = result
        return canonical(env[self.output_name])

    def cast_params(self, dtype):
        """The parameters as JAX arrays of `dtype` (float64 needs jax_enable_x64)."""
        dtype = np.dtype(dtype)
        if dtype == np.float64 and not jax.config.jax_enable_x64:
            raise ValueError("float64 parameters need jax.config.update('jax_enable_x64', True)")
        return {name: jnp.asarray(array, dtype) for name, array in self.params.items()}


# --------------------------------------------------------------------------------------
# Layout. ONNX tensors are channels-first (N, C, spatial...); XLA:CPU convolutions are much
# faster channels-last. Conv outputs are therefore kept as ChannelsLast values while they
# only flow through convolutions and elementwise ops, and are transposed back to the ONNX
# layout (canonical) for any op that depends on the axis order. Transposes are exact.
# --------------------------------------------------------------------------------------

class ChannelsLast:
    """A tensor whose ONNX value is moveaxis(array, -1, 1)."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array


def canonical(v):
    """The value in ONNX (channels-first) layout."""
    return jnp.moveaxis(v.array, -1, 1) if isinstance(v, ChannelsLast) else v


def channels_last(v):
    """The value as a channels-last array [N, spatial..., C]."""
    return v.array if isinstance(v, ChannelsLast) else jnp.moveaxis(v, 1, -1)


def _size(v):
    return math.prod(v.array.shape if isinstance(v, ChannelsLast) else np.shape(v))


# --------------------------------------------------------------------------------------
# Ops. Each takes (graph, node, input values) and returns a tuple of output values. Ops in
# LAYOUT_AWARE may receive ChannelsLast values; all others get canonical values.
# --------------------------------------------------------------------------------------

def _attr(node, name, default):
    return node.attrs.get(name, default)


def _conv_pads(node, in_spatial, kernel, strides, dilations):
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    n = len(in_spatial)
    if auto_pad == "NOTSET":
        pads = list(_attr(node, "pads", [0] * (2 * n)))
        if len(pads) != 2 * n:
            raise UnsupportedGraph(f"Conv {node.name!r}: pads {pads} do not fit {n} spatial dims")
        return [(pads[i], pads[i + n]) for i in range(n)]
    if auto_pad == "VALID":
        return [(0, 0)] * n
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
            out = -(-size // s)  # ceil(size / stride)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto_pad == "SAME_UPPER" else (big, small))
        return pads
    raise UnsupportedGraph(f"Conv {node.name!r}: auto_pad {auto_pad!r}")


def _depthwise_taps(x, w, strides, dilations, pads):
    """Depthwise 2-D conv, channels-last, as a sum of kh*kw shifted slices times per-channel
    weights. x: [N, H, W, C]; w: [C, 1, kh, kw] (ONNX layout). Same result as
    conv_general_dilated(..., feature_group_count=C), but XLA:CPU runs grouped convolutions
    (and their transposes) 20-100x slower than these fused multiply-adds."""
    n, _, _, c = x.shape
    kh, kw = w.shape[2:]
    (sh, sw), (dh, dw) = strides, dilations
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    ho = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
    wo = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
    acc = None
    for i in range(kh):
        for j in range(kw):
            window = lax.slice(xp, (0, i * dh, j * dw, 0),
                               (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
            term = window * w[:, 0, i, j]
            acc = term if acc is None else acc + term
    return acc


def _depthwise_input_grad(g, w, strides, dilations, pads, in_hw):
    """The input gradient of _depthwise_taps: the cotangent, dilated by the stride and
    padded, correlated with the flipped kernel (again as shifted multiply-adds)."""
    n, ho, wo, c = g.shape
    kh, kw = w.shape[2:]
    (sh, sw), (dh, dw) = strides, dilations
    h, wd = in_hw
    hp, wp = h + pads[0][0] + pads[0][1], wd + pads[1][0] + pads[1][1]
    gp = lax.pad(g, jnp.zeros((), g.dtype), [(0, 0, 0), ((kh - 1) * dh, hp - (ho - 1) * sh - 1, sh - 1),
                                             ((kw - 1) * dw, wp - (wo - 1) * sw - 1, sw - 1), (0, 0, 0)])
    acc = None
    for i in range(kh):
        for j in range(kw):
            r, q = pads[0][0] + (kh - 1 - i) * dh, pads[1][0] + (kw - 1 - j) * dw
            term = lax.slice(gp, (0, r, q, 0), (n, r + h, q + wd, c)) * w[:, 0, i, j]
            acc = term if acc is None else acc + term
    return acc


def _depthwise_weight_grad(x, g, kernel, strides, dilations, pads):
    n, ho, wo, c = g.shape
    kh, kw = kernel
    (sh, sw), (dh, dw) = strides, dilations
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    taps = [jnp.sum(lax.slice(xp, (0, i * dh, j * dw, 0), (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c),
                              (1, sh, sw, 1)) * g, axis=(0, 1, 2))
            for i in range(kh) for j in range(kw)]
    return jnp.reshape(jnp.stack(taps, axis=1), (c, 1, kh, kw))


@lru_cache(maxsize=None)
def _depthwise_op(strides, dilations, pads, in_hw):
    """_depthwise_taps with a hand-written VJP (one op per conv configuration).

    Autodiff of the shifted slices builds the input gradient from kh*kw padded copies,
    which XLA:CPU runs 4-5x slower than the forward pass for 5x5 kernels; the VJP here
    costs about one forward pass. It keeps only the kernel, plus the input when the
    kernel itself is being differentiated (never, for gradients with respect to x)."""

    @jax.custom_vjp
    def op(x, w):
        return _depthwise_taps(x, w, strides, dilations, pads)

    def fwd(x, w):
        saved = (w.value, x.value if w.perturbed else None)
        return _depthwise_taps(x.value, w.value, strides, dilations, pads), saved

    def bwd(saved, g):
        w, x = saved
        gx = _depthwise_input_grad(g, w, strides, dilations, pads, in_hw)
        gw = None if x is None else _depthwise_weight_grad(x, g, w.shape[2:], strides, dilations, pads)
        return gx, gw

    op.defvjp(fwd, bwd, symbolic_zeros=True)
    return op


def op_conv(graph, node, inputs):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    x = channels_last(x)  # [N, spatial..., C]
    n = x.ndim - 2
    channels = x.shape[-1]
    group = _attr(node, "group", 1)
    kernel = list(_attr(node, "kernel_shape", w.shape[2:]))
    if tuple(kernel) != tuple(w.shape[2:]):
        raise UnsupportedGraph(f"Conv {node.name!r}: kernel_shape {kernel} != weight {w.shape}")
    if w.shape[1] * group != channels or w.shape[0] % group:
        raise UnsupportedGraph(f"Conv {node.name!r}: input channels {channels}, weight {w.shape}, group {group}")
    strides = list(_attr(node, "strides", [1] * n))
    dilations = list(_attr(node, "dilations", [1] * n))
    pads = _conv_pads(node, x.shape[1:-1], kernel, strides, dilations)
    if graph.depthwise == "taps" and n == 2 and group == channels == w.shape[0] and group > 1:
        op = _depthwise_op(tuple(strides), tuple(dilations), tuple(map(tuple, pads)), tuple(x.shape[1:3]))
        y = op(x, w)
    else:
        # Activations channels-last, weights in their ONNX layout [O, I/group, k...]: no
        # transposed copy of the weights is made (nor saved for the backward pass).
        lhs = (0, n + 1) + tuple(range(1, n + 1))  # where N, C, spatial... are in [N, spatial..., C]
        rhs = tuple(range(n + 2))
        y = lax.conv_general_dilated(
            x, w, window_strides=strides, padding=pads, rhs_dilation=dilations,
            dimension_numbers=lax.ConvDimensionNumbers(lhs, rhs, lhs),
            feature_group_count=group, precision=HIGHEST)
    if b is not None:
        y = y + b
    return (ChannelsLast(y),)


def op_clip(graph, node, inputs):
    v = inputs[0]
    x = v.array if isinstance(v, ChannelsLast) else v
    if graph.opset < 11:  # min/max are attributes before opset 11
        lo, hi = _attr(node, "min", None), _attr(node, "max", None)
    else:
        lo = inputs[1] if len(inputs) > 1 else None
        hi = inputs[2] if len(inputs) > 2 else None
    lo = -jnp.inf if lo is None else lo
    hi = jnp.inf if hi is None else hi
    lo = jnp.reshape(jnp.asarray(lo, x.dtype), ())
    hi = jnp.reshape(jnp.asarray(hi, x.dtype), ())
    return (_like(v, clip(x, lo, hi)),)


@jax.custom_vjp
def clip(x, lo, hi):
    """clamp(x, lo, hi) for scalar lo <= hi; d/dx is 1 strictly inside (lo, hi), else 0.

    The same values and derivative as lax.clamp, but the VJP keeps one byte per element
    (which region x fell in) where lax.clamp's keeps a bool mask plus a float32 array of
    zeros: 8x less memory held per saved forward pass."""
    return lax.clamp(lo, x, hi)


def _clip_fwd(x, lo, hi):
    region = jnp.where(x <= lo, jnp.uint8(1), jnp.where(x >= hi, jnp.uint8(2), jnp.uint8(0)))
    return lax.clamp(lo, x, hi), region


def _clip_bwd(region, g):
    zero = jnp.zeros((), g.dtype)
    return (jnp.where(region == 0, g, zero),
            jnp.sum(jnp.where(region == 1, g, zero)),
            jnp.sum(jnp.where(region == 2, g, zero)))


clip.defvjp(_clip_fwd, _clip_bwd)


def _relu(x):
    """max(x, 0) with derivative 0 at 0 (as jax.nn.relu), through clip's compact VJP."""
    return clip(x, jnp.zeros((), x.dtype), jnp.full((), jnp.inf, x.dtype))


def _like(v, array):
    """`array` in the layout of `v`."""
    return ChannelsLast(array) if isinstance(v, ChannelsLast) else array


def _unary(fn):
    def op(graph, node, inputs):
        v = inputs[0]
        return (_like(v, fn(v.array if isinstance(v, ChannelsLast) else v)),)
    return op


def _binary(fn):
    def op(graph, node, inputs):
        if "broadcast" in node.attrs or "axis" in node.attrs:
            raise UnsupportedGraph(f"{node.op} {node.name!r}: legacy broadcast attributes")
        a, b = inputs
        a_cl, b_cl = isinstance(a, ChannelsLast), isinstance(b, ChannelsLast)
        if a_cl and b_cl and a.array.shape == b.array.shape:
            return (ChannelsLast(fn(a.array, b.array)),)
        if a_cl and not b_cl and _size(b) == 1 and np.ndim(b) <= a.array.ndim:
            return (ChannelsLast(fn(a.array, jnp.reshape(b, ()))),)
        if b_cl and not a_cl and _size(a) == 1 and np.ndim(a) <= b.array.ndim:
            return (ChannelsLast(fn(jnp.reshape(a, ()), b.array)),)
        return (fn(canonical(a), canonical(b)),)
    return op


def op_global_average_pool(graph, node, inputs):
    v = inputs[0]
    if isinstance(v, ChannelsLast):
        x = v.array
        pooled = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))  # [N, C]
        return (jnp.reshape(pooled, pooled.shape + (1,) * (x.ndim - 2)),)
    return (jnp.mean(v, axis=tuple(range(2, v.ndim)), keepdims=True),)


def op_flatten(graph, node, inputs):
    x = inputs[0]
    axis = _attr(node, "axis", 1)
    if axis < 0:
        axis += x.ndim
    return (jnp.reshape(x, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))),)


def op_gemm(graph, node, inputs):
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    # dot_general contracts the right axes directly (no transposed copy of a weight matrix).
    contract = ((0 if _attr(node, "transA", 0) else 1,), (1 if _attr(node, "transB", 0) else 0,))
    y = lax.dot_general(a, b, (contract, ((), ())), precision=HIGHEST)
    alpha, beta = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0)
    if alpha != 1.0:
        y = y * jnp.asarray(alpha, y.dtype)
    if c is not None:
        y = y + (c if beta == 1.0 else c * jnp.asarray(beta, y.dtype))
    return (y,)


def op_matmul(graph, node, inputs):
    return (jnp.matmul(inputs[0], inputs[1], precision=HIGHEST),)


def op_softmax(graph, node, inputs):
    x = inputs[0]
    if graph.opset >= 13:
        return (jax.nn.softmax(x, axis=_attr(node, "axis", -1)),)
    # Before opset 13 the input is seen as 2-D [prod(shape[:axis]), prod(shape[axis:])].
    axis = _attr(node, "axis", 1)
    if axis < 0:
        axis += x.ndim
    flat = jnp.reshape(x, (math.prod(x.shape[:axis]), -1))
    return (jnp.reshape(jax.nn.softmax(flat, axis=1), x.shape),)


def op_reshape(graph, node, inputs):
    x, shape = inputs
    if not isinstance(shape, np.ndarray) or shape.dtype.kind not in "iu":
        raise UnsupportedGraph(f"Reshape {node.name!r}: the shape must be a constant integer tensor")
    allowzero = _attr(node, "allowzero", 0)
    target = [x.shape[i] if (d == 0 and not allowzero) else int(d) for i, d in enumerate(shape.tolist())]
    return (jnp.reshape(x, target),)


OPS = {
    "Conv": op_conv,
    "Clip": op_clip,
    "Add": _binary(jnp.add),
    "Sub": _binary(jnp.subtract),
    "Mul": _binary(jnp.multiply),
    "Div": _binary(jnp.divide),
    "GlobalAveragePool": op_global_average_pool,
    "Flatten": op_flatten,
    "Gemm": op_gemm,
    "MatMul": op_matmul,
    "Relu": _unary(_relu),
    "Sigmoid": _unary(jax.nn.sigmoid),
    "Softmax": op_softmax,
    "Reshape": op_reshape,
    "Identity": _unary(lambda x: x),
}
SUPPORTED_OPS = tuple(sorted(OPS))
LAYOUT_AWARE = {"Conv", "Clip", "Add", "Sub", "Mul", "Div", "GlobalAveragePool", "Relu", "Sigmoid", "Identity"}


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

def load(path, depthwise="taps"):
    """Read an ONNX file into a Graph. Raises UnsupportedGraph naming any unsupported op."""
    if depthwise not in ("taps", "lax"):
        raise ValueError(f"depthwise must be 'taps' or 'lax', not {depthwise!r}")
    path = str(path)
    model = onnx.load(path)
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise UnsupportedGraph(f"{path}: no default-domain opset import")

    unsupported = set()
    for n in g.node:
        if n.domain not in ("", "ai.onnx"):
            unsupported.add(f"{n.domain}::{n.op_type}")
        elif n.op_type not in OPS and n.op_type != "Constant":
            unsupported.add(n.op_type)
    if unsupported:
        unsupported = sorted(unsupported)
        raise UnsupportedGraph(f"{path}: unsupported ONNX op(s) {', '.join(unsupported)} "
                               f"(supported: {', '.join(SUPPORTED_OPS)}, Constant)")

    params, constants = {}, {}

    def keep(name, array):
        if array.dtype.kind == "f":
            params[name] = array
        else:
            constants[name] = array

    for init in g.initializer:
        keep(init.name, numpy_helper.to_array(init))
    nodes = []
    for n in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        if n.op_type == "Constant":
            if "value" not in attrs:
                raise UnsupportedGraph(f"{path}: Constant {n.name!r} without a 'value' tensor")
            keep(n.output[0], numpy_helper.to_array(attrs["value"]))
            continue
        nodes.append(Node(n.op_type, n.name, list(n.input), list(n.output), attrs))
    del model  # the protobuf copy of the weights is not needed any more

    data_inputs = [i for i in g.input if i.name not in params and i.name not in constants]
    if len(data_inputs) != 1 or len(g.output) < 1:
        raise UnsupportedGraph(f"{path}: expected one data input and an output, got "
                               f"{[i.name for i in data_inputs]} -> {[o.name for o in g.output]}")
    dims = data_inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(shape) != 4 or None in shape[1:]:
        raise UnsupportedGraph(f"{path}: input {data_inputs[0].name!r} must be [N, C, H, W] with "
                               f"static C, H, W; it is {[d.dim_param or d.dim_value for d in dims]}")

    graph = Graph(path=path, opset=opset, input_name=data_inputs[0].name, input_shape=tuple(shape[1:]),
                  output_name=g.output[0].name, nodes=nodes, params=params, constants=constants,
                  depthwise=depthwise)
    out = jax.eval_shape(graph.apply, {k: jax.ShapeDtypeStruct(v.shape, np.float32) for k, v in params.items()},
                         jax.ShapeDtypeStruct((1,) + graph.input_shape, np.float32))
    if len(out.shape) != 2 or out.shape[0] != 1:
        raise UnsupportedGraph(f"{path}: output {graph.output_name!r} must be [N, classes], it is "
                               f"{list(out.shape)} for N = 1")
    graph.num_classes = out.shape[1]
    return graph


# --------------------------------------------------------------------------------------
# Compiled, batch-bucketed evaluation
# --------------------------------------------------------------------------------------

def bucket_for(rows):
    """The smallest bucket holding `rows` rows (rows <= BUCKETS[-1])."""
    return next(b for b in BUCKETS if b >= rows)


def _chunks(rows):
    """(start, stop, bucket) pieces covering range(rows), each padded to a bucket."""
    step = BUCKETS[-1]
    return [(s, min(s + step, rows), bucket_for(min(s + step, rows) - s)) for s in range(0, rows, step)]


def _pad(a, rows):
    if a.shape[0] == rows:
        return a
    return np.concatenate([a, np.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)])


class Pullback:
    """The VJP of one Model.forward call: cotangent on the logits -> gradient w.r.t. x."""

    def __init__(self, model, pieces, rows):
        self.model, self.pieces, self.rows = model, pieces, rows

    def __call__(self, cotangent):
        m = self.model
        cotangent = np.asarray(cotangent, m.dtype).reshape(self.rows, m.graph.num_classes)
        grads = [np.asarray(m._backward(vjp, jnp.asarray(_pad(cotangent[start:stop], bucket))))[:stop - start]
                 for (start, stop, bucket), vjp in self.pieces]
        return np.concatenate(grads) if len(grads) > 1 else grads[0]

    def nbytes(self):
        """Bytes held by this pullback alone (residuals that are the model's weights excluded)."""
        shared = {id(p) for p in self.model.params.values()}
        return sum(leaf.nbytes for _, vjp in self.pieces for leaf in jax.tree_util.tree_leaves(vjp)
                   if id(leaf) not in shared)


class Model:
    """A Graph with its parameters on the device and jit-compiled, bucketed entry points."""

    def __init__(self, graph, dtype=np.float32):
        self.graph = graph
        self.dtype = np.dtype(dtype)
        self.params = graph.cast_params(self.dtype)
        self._logits = jax.jit(graph.apply)
        self._backward = jax.jit(lambda vjp, ct: vjp(ct)[0])
        self._plans = {}  # bucket -> (jitted forward, output treedef, forwarded-input map)

    @property
    def input_shape(self):
        return self.graph.input_shape

    @property
    def num_classes(self):
        return self.graph.num_classes

    def _check(self, x):
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1:] != self.graph.input_shape or x.shape[0] < 1:
            raise ValueError(f"input must be [N>=1, {', '.join(map(str, self.graph.input_shape))}], "
                             f"got {list(x.shape)}")
        return x.astype(self.dtype, copy=False)

    def _plan(self, bucket):
        """The forward pass with VJP for one bucket size.

        jax.vjp's pullback is a pytree holding the residuals, so it can be returned from a
        jitted function and passed into another. Some residuals are just the weights (a
        conv's input gradient needs its kernel); a jitted function would return those as
        fresh copies, ~20 MB per call. So the forward returns only the residuals that are
        not inputs, and the pullback is reassembled with the parameter arrays themselves.
        """
        plan = self._plans.get(bucket)
        if plan is None:
            def fwd(params, x):
                return jax.vjp(partial(self.graph.apply, params), x)

            x_spec = jax.ShapeDtypeStruct((bucket,) + self.graph.input_shape, self.dtype)
            closed, out_shape = jax.make_jaxpr(fwd, return_shape=True)(self.params, x_spec)
            invars = {id(v): i for i, v in enumerate(closed.jaxpr.invars)}
            forwarded = [invars.get(id(v)) for v in closed.jaxpr.outvars]
            keep = [i for i, j in enumerate(forwarded) if j is None]

            def fwd_pruned(params, x):
                leaves = jax.tree_util.tree_leaves(fwd(params, x))
                return [leaves[i] for i in keep]

            plan = (jax.jit(fwd_pruned), jax.tree_util.tree_structure(out_shape), forwarded)
            self._plans[bucket] = plan
        return plan

    def _forward_bucket(self, x):
        jitted, treedef, forwarded = self._plan(x.shape[0])
        x = jnp.asarray(x)
        computed = iter(jitted(self.params, x))
        inputs = jax.tree_util.tree_leaves((self.params, x))
        leaves = [next(computed) if j is None else inputs[j] for j in forwarded]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def logits(self, x):
        """[N, C, H, W] -> [N, classes] logits, as numpy."""
        x = self._check(x)
        out = [np.asarray(self._logits(self.params, jnp.asarray(_pad(x[start:stop], bucket))))[:stop - start]
               for start, stop, bucket in _chunks(x.shape[0])]
        return np.concatenate(out) if len(out) > 1 else out[0]

    def forward(self, x):
        """[N, C, H, W] -> ([N, classes] logits, Pullback) for reverse-mode gradients."""
        x = self._check(x)
        logits, pieces = [], []
        for start, stop, bucket in _chunks(x.shape[0]):
            out, vjp = self._forward_bucket(_pad(x[start:stop], bucket))
            logits.append(np.asarray(out)[:stop - start])
            pieces.append(((start, stop, bucket), vjp))
        return (np.concatenate(logits) if len(logits) > 1 else logits[0]), Pullback(self, pieces, x.shape[0])

    def warmup(self, buckets=BUCKETS, gradients=True):
        """Compile logits (and, with gradients, forward and backward) for the given bucket
        sizes now rather than on first use."""
        for b in buckets:
            x = np.zeros((b,) + self.graph.input_shape, self.dtype)
            self.logits(x)
            if gradients:
                out, pullback = self.forward(x)
                pullback(np.zeros_like(out))
