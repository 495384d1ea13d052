"""A model as an ONNX graph, for serving without JAX (`jaxtag export CHECKPOINT OUT.onnx`).

The ONNX graph takes `log_mel` (batch, n_mels, 256) float32, the output of
`jaxtag.audio.log_mel` cut into 256-frame chunks, and returns `probabilities` (batch, tags), the
sigmoid outputs, and `embedding` (batch, width), the pooled output the classifier reads
(`MTSA.features`). The batch dimension is dynamic.

The graph is written node by node from the checkpoint's parameters in the plain form of the
architecture in jaxtag/model/: per vertical branch Conv (valid in frequency, same in time),
BatchNormalization, Relu and the max over the remaining frequency rows; the horizontal branches
as 1D convolutions on the frequency mean; Concat; the 1x1 convolution; the BERT encoder (the
last layer computes only the CLS query, as in `MTSA`); the tanh pooler; the classifier. Branch
shapes are read off the kernels, so any conv width, depth or tag count exports. A generic
JAX-to-ONNX tracer was not used: jax2onnx (0.17) pins orbax-checkpoint below jaxtag's, pulls in
a dozen packages, and failed to trace the banded front end. Before the file is written the graph
is run with onnxruntime on random log-mel batches and compared with jaxtag (`--no-check` skips
this), so a file on disk is one that reproduced the model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxtag.errors import JaxtagError

if TYPE_CHECKING:
    from jaxtag.checkpoint import LoadedModel

OPSET = 17  # LayerNormalization; onnxruntime >= 1.12
FRAMES = 256  # audio.CHUNK_FRAMES: the positions of a model cover one chunk (+ CLS)
INPUT = "log_mel"
OUTPUTS = ("probabilities", "embedding")
CHECK_TOLERANCE = 1e-4  # largest |onnxruntime - jaxtag| accepted by the check before writing


class ExportError(JaxtagError):
    """The model cannot be exported or the exported graph disagrees with jaxtag."""


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as err:
        raise ExportError(
            "jaxtag export needs the onnx package: pip install 'jaxtag[export]'"
        ) from err
    return onnx


class _Graph:
    """Collects ONNX nodes and float32 constants; `op` returns the name of its output."""

    def __init__(self, onnx: Any):
        self.onnx = onnx
        self.nodes: list[Any] = []
        self.initializers: dict[str, Any] = {}
        self.count = 0

    def const(self, value: Any, name: str, dtype: Any = np.float32) -> str:
        """A named constant; a name already defined is reused (shared small constants)."""
        if name not in self.initializers:
            array = np.ascontiguousarray(np.asarray(value, dtype=dtype))
            self.initializers[name] = self.onnx.numpy_helper.from_array(array, name)
        return name

    def ints(self, values: list[int]) -> str:
        """A shared int64 constant (axes, shapes, slice bounds)."""
        return self.const(values, "i64_" + "_".join(str(v) for v in values), np.int64)

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        self.count += 1
        out = out or f"{op_type.lower()}_{self.count}"
        self.nodes.append(
            self.onnx.helper.make_node(op_type, inputs, [out], name=f"n{self.count}", **attrs)
        )
        return out


def _onnx_kernel(flax_kernel: np.ndarray) -> np.ndarray:
    """Flax (*spatial, in, out) -> ONNX/torch (out, in, *spatial)."""
    ndim = flax_kernel.ndim
    return np.transpose(flax_kernel, (ndim - 1, ndim - 2, *range(ndim - 2)))


def _batch_norm(g: _Graph, x: str, params: dict, stats: dict, name: str) -> str:
    """Eval-mode BatchNorm over axis 1 with the stored running statistics."""
    from jaxtag.model import BN_EPS

    inputs = [
        g.const(params["scale"], f"{name}.scale"),
        g.const(params["bias"], f"{name}.bias"),
        g.const(stats["mean"], f"{name}.mean"),
        g.const(stats["var"], f"{name}.var"),
    ]
    return g.op("BatchNormalization", [x, *inputs], epsilon=BN_EPS)


def _dense(g: _Graph, x: str, params: dict, name: str) -> str:
    y = g.op("MatMul", [x, g.const(params["kernel"], f"{name}.kernel")])
    return g.op("Add", [y, g.const(params["bias"], f"{name}.bias")])


def _layer_norm(g: _Graph, x: str, params: dict, name: str) -> str:
    from jaxtag.model import LN_EPS

    scale, bias = g.const(params["scale"], f"{name}.scale"), g.const(params["bias"], f"{name}.bias")
    return g.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=LN_EPS)


def _front_end(g: _Graph, mel: str, params: dict, stats: dict) -> str:
    """(B, F, T) log-mel -> (B, T, width)."""
    x = g.op("Unsqueeze", [mel, g.ints([1])])  # (B, 1, F, T)
    x = _batch_norm(g, x, params["input_bn"], stats["input_bn"], "input_bn")
    freq_mean = g.op("ReduceMean", [x], axes=[2], keepdims=0)  # (B, 1, T)
    outputs = []
    branches = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k[7:]))
    for name in branches:
        kernel = np.asarray(params[name]["conv"]["kernel"])
        if kernel.ndim == 4:  # vertical (h, w, 1, C): valid in frequency, same in time
            w = kernel.shape[1]
            y = g.op(
                "Conv",
                [
                    x,
                    g.const(_onnx_kernel(kernel), f"{name}.kernel"),
                    g.const(params[name]["conv"]["bias"], f"{name}.conv_bias"),
                ],
                pads=[0, w // 2, 0, w // 2],
            )
        else:  # horizontal (k, 1, C) on the frequency mean, same padding
            k = kernel.shape[0]
            y = g.op(
                "Conv",
                [
                    freq_mean,
                    g.const(_onnx_kernel(kernel), f"{name}.kernel"),
                    g.const(params[name]["conv"]["bias"], f"{name}.conv_bias"),
                ],
                pads=[k // 2, k // 2],
            )
        y = g.op("Relu", [_batch_norm(g, y, params[name]["bn"], stats[name]["bn"], name)])
        if kernel.ndim == 4:
            y = g.op("ReduceMax", [y], axes=[2], keepdims=0)  # max over the frequency rows
        outputs.append(y)  # (B, C_i, T)
    x = g.op("Concat", outputs, axis=1)
    conv = params["conv1x1"]
    x = g.op(
        "Conv",
        [
            x,
            g.const(_onnx_kernel(conv["kernel"]), "conv1x1.kernel"),
            g.const(conv["bias"], "conv1x1.bias"),
        ],
    )
    x = g.op("Relu", [_batch_norm(g, x, params["bn"], stats["bn"], "bn")])
    return g.op("Transpose", [x], perm=[0, 2, 1])


def _encoder_layer(g: _Graph, x: str, params: dict, num_heads: int, name: str, cls_only: bool):
    """A post-LN BERT layer on (B, S, width); with `cls_only`, only token 0 queries."""
    width = np.asarray(params["attention"]["self"]["query"]["kernel"]).shape[0]
    head_dim = width // num_heads
    split = g.ints([0, -1, num_heads, head_dim])
    attention = params["attention"]

    def heads(inputs: str, part: str, perm: list[int]) -> str:
        y = _dense(g, inputs, attention["self"][part], f"{name}.{part}")
        return g.op("Transpose", [g.op("Reshape", [y, split])], perm=perm)

    query_input = g.op("Slice", [x, g.ints([0]), g.ints([1]), g.ints([1])]) if cls_only else x
    q = heads(query_input, "query", [0, 2, 1, 3])  # (B, H, Q, D)
    k = heads(x, "key", [0, 2, 3, 1])  # (B, H, D, S)
    v = heads(x, "value", [0, 2, 1, 3])  # (B, H, S, D)
    scores = g.op("Div", [g.op("MatMul", [q, k]), g.const(math.sqrt(head_dim), f"{name}.sqrt_d")])
    context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])  # (B, H, Q, D)
    context = g.op("Transpose", [context], perm=[0, 2, 1, 3])
    context = g.op("Reshape", [context, g.ints([0, -1, width])])
    h = _dense(g, context, attention["output"]["dense"], f"{name}.attention_output")
    attended = _layer_norm(
        g, g.op("Add", [h, query_input]), attention["output"]["LayerNorm"], f"{name}.ln1"
    )
    h = _dense(g, attended, params["intermediate"]["dense"], f"{name}.intermediate")
    # The exact (erf) GELU: h * (erf(h / sqrt 2) + 1) / 2.
    erf = g.op("Erf", [g.op("Div", [h, g.const(math.sqrt(2.0), f"{name}.sqrt2")])])
    h = g.op("Mul", [h, g.op("Add", [erf, g.const(1.0, f"{name}.one")])])
    h = g.op("Mul", [h, g.const(0.5, f"{name}.half")])
    h = _dense(g, h, params["output"]["dense"], f"{name}.output")
    return _layer_norm(g, g.op("Add", [h, attended]), params["output"]["LayerNorm"], f"{name}.ln2")


def build_graph(config: Any, variables: dict[str, Any], tags: list[str]) -> Any:
    """The ONNX ModelProto of a model (float32, eval mode) with a dynamic batch dimension."""
    from jaxtag.model import cls_vector, sinusoidal_table

    onnx = _import_onnx()
    params, stats = variables["params"], variables.get("batch_stats", {})
    g = _Graph(onnx)
    x = _front_end(g, INPUT, params["front_end"], stats["front_end"])  # (B, T, width)

    # Prepend the fixed CLS vector: broadcast it to (B, 1, width) with the batch size of x.
    batch = g.op("Slice", [g.op("Shape", [x]), g.ints([0]), g.ints([1])])
    cls_shape = g.op("Concat", [batch, g.ints([1, config.width])], axis=0)
    cls = g.op("Expand", [g.const(cls_vector(config.width)[None, None], "cls"), cls_shape])
    x = g.op("Concat", [cls, x], axis=1)  # (B, S, width), S = FRAMES + 1
    seq_len = FRAMES + 1
    if config.positions == "learned":
        table = np.asarray(params["embedding"]["position_embeddings"])[:seq_len]
        x = g.op("Add", [x, g.const(table, "position_embeddings")])
        x = _layer_norm(g, x, params["embedding"]["LayerNorm"], "embedding")
    else:
        table = sinusoidal_table(config.positions_length, config.width)[:seq_len]
        x = g.op("Add", [x, g.const(table, "positions")])

    encoder = params["encoder"]
    for i in range(config.num_layers):
        last = i == config.num_layers - 1
        x = _encoder_layer(g, x, encoder[f"layer_{i}"], config.num_heads, f"layer_{i}", last)
    cls_state = g.op("Squeeze", [x, g.ints([1])])  # (B, width): the last layer left only token 0
    embedding = g.op("Tanh", [_dense(g, cls_state, params["pooler"], "pooler")], out=OUTPUTS[1])
    logits = _dense(g, embedding, params["classifier"], "classifier")
    g.op("Sigmoid", [logits], out=OUTPUTS[0])

    helper, f32 = onnx.helper, onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        g.nodes,
        "jaxtag",
        [helper.make_tensor_value_info(INPUT, f32, ["batch", config.n_mels, FRAMES])],
        [
            helper.make_tensor_value_info(OUTPUTS[0], f32, ["batch", config.num_tags]),
            helper.make_tensor_value_info(OUTPUTS[1], f32, ["batch", config.width]),
        ],
        list(g.initializers.values()),
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="jaxtag"
    )
    model.ir_version = 8  # readable by onnxruntime >= 1.10
    helper.set_model_props(model, {"tags": ",".join(tags), "frames": str(FRAMES)})
    onnx.checker.check_model(model)
    return model


def jaxtag_outputs(config: Any, variables: dict[str, Any], mel: np.ndarray) -> tuple:
    """jaxtag's (probabilities, embedding) of a log-mel batch, in float32."""
    import jax

    from jaxtag.model import MTSA, build_model

    model = build_model(config)

    @jax.jit
    def forward(mel: jax.Array) -> tuple[jax.Array, jax.Array]:
        pooled = model.apply(variables, mel, method=MTSA.features)
        return jax.nn.sigmoid(model.apply(variables, pooled, method=MTSA.head)), pooled

    return tuple(np.asarray(a) for a in forward(mel))


def onnx_session(model_bytes: bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of an exported graph (`threads`: intra-op threads, default
    all cores). Creating one takes a fraction of a second: there is nothing to compile."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ExportError(
            "running the ONNX graph needs onnxruntime: pip install 'jaxtag[export]'"
        ) from err
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def onnx_predictor(
    loaded: LoadedModel, threads: int | None = None, output: str = OUTPUTS[0]
) -> Callable[[np.ndarray], np.ndarray]:
    """A loaded checkpoint as an onnxruntime predictor: (N, n_mels, 256) log-mel -> (N, tags)
    probabilities (or, with `output="embedding"`, the (N, width) pooled vectors), any N; the CPU
    engine of `jaxtag tag --engine onnx` (jaxtag/inference.py, bench/bench_engines.py)."""
    import dataclasses

    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")

    config = dataclasses.replace(loaded.config, dtype="float32")
    session = onnx_session(
        build_graph(config, loaded.variables, loaded.tags).SerializeToString(), threads
    )

    def predict(windows: np.ndarray) -> np.ndarray:
        return session.run([output], {INPUT: np.asarray(windows, np.float32)})[0]

    return predict


def max_difference(model_bytes: bytes, config: Any, variables: dict, batch: int = 3) -> float:
    """Largest |onnxruntime - jaxtag| over both outputs on a random log-mel-range batch."""
    rng = np.random.default_rng(0)
    mel = rng.uniform(-60.0, 40.0, (batch, config.n_mels, FRAMES)).astype(np.float32)
    session = onnx_session(model_bytes)
    got = session.run(list(OUTPUTS), {INPUT: mel})
    want = jaxtag_outputs(config, variables, mel)
    return max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True))


def is_onnx_model(path: str | os.PathLike) -> bool | None:
    """Whether `path` holds an ONNX model (a ModelProto with an IR version and a graph); None
    when the onnx package is missing (then the export itself says so)."""
    try:
        import onnx
    except ImportError:
        return None
    with open(path, "rb") as f:
        if f.read(1) != b"\x08":  # onnx writes field 1, ir_version, first: no need to parse more
            return False
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError and friends: not an ONNX file
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0


def check_destination(out: str | os.PathLike, source: str | os.PathLike, overwrite: bool) -> None:
    """Refuses, before any work, an `out` that must not be written: not a `.onnx` path, a
    directory, the model's own file (`source`), an unwritable folder; an existing file without
    `overwrite`, or one that is not an ONNX model (it is left untouched).

    Raises:
      OutputError: one line naming `out` and what is wrong.
    """
    from jaxtag.fileio import OutputError, check_outputs

    out = os.fspath(out)
    if not out.lower().endswith(".onnx"):
        raise OutputError(f"{out}: the output must be a .onnx file")
    check_outputs([out], [source])
    if os.path.lexists(out):
        if not overwrite:
            raise OutputError(f"{out} already exists (pass --overwrite / overwrite=True)")
        if is_onnx_model(out) is False:
            raise OutputError(
                f"{out} is not an ONNX model; --overwrite replaces only an ONNX file, so it was "
                "left untouched (choose another output path)"
            )


def export(
    model: LoadedModel, out: str | Path, check: bool = True, overwrite: bool = False
) -> Path:
    """Writes the ONNX file of a loaded model to `out` (atomically); returns `out`.

    `out` is checked first (`check_destination`: an existing ONNX file is replaced only with
    `overwrite`). With `check`, the graph is first run with onnxruntime against jaxtag on random
    log-mel batches; a difference above CHECK_TOLERANCE raises ExportError and nothing is written.
    """
    import dataclasses

    from jaxtag.fileio import atomic_write

    check_destination(out, model.path, overwrite)
    config = dataclasses.replace(model.config, dtype="float32")  # ONNX graph is float32
    model_bytes = build_graph(config, model.variables, model.tags).SerializeToString()
    if check:
        diff = max_difference(model_bytes, config, model.variables)
        if not diff <= CHECK_TOLERANCE:
            raise ExportError(
                f"{model.path}: the ONNX graph differs from jaxtag by {diff:.2e} "
                f"(> {CHECK_TOLERANCE:g}); nothing written"
            )
    out = Path(out)
    with atomic_write(out, "wb") as f:
        f.write(model_bytes)
    return out
