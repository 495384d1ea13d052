"""The engines that run a model on log-mel windows, and `auto`'s measured choice among them.

- `jax`: the jitted Flax model on JAX's device; bfloat16 computes with the config's
  `dtype="bfloat16"` (parameters stay float32).
- `onnx`: the graph of jaxtag/export.py (built in memory from the checkpoint) in onnxruntime on
  the CPU; float32 only.
- `openvino`: the same graph compiled by OpenVINO for the CPU (`pip install 'jaxtag[openvino]'`),
  with `INFERENCE_PRECISION_HINT` set to f32 (some CPUs would otherwise default to bf16) or,
  for bfloat16, bf16.

`auto` (`scoring.engine_for`, then `choose`) runs jax on an accelerator. On a CPU-only JAX
backend it times the installed engines that can run the output and precision
(`scoring.candidates`) on a batch of the size asked for, once per machine, model shape,
precision and batch size (jaxtag/autotune.py keeps the winner), and runs the fastest; an engine
that fails to build or run there is left out. With `JAXTAG_AUTOTUNE=off` it follows
`scoring.choose_engine`'s rule instead.

bfloat16 on the CPU needs the chip's native bf16 (AVX512-BF16 or AMX: Intel Cooper Lake,
Sapphire Rapids and later, AMD Zen 4 and later); elsewhere it is refused (`bf16_problem`)
rather than emulated slower than float32.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxtag import audio, autotune

if TYPE_CHECKING:
    from jaxtag.checkpoint import LoadedModel

Predictor = Callable[[np.ndarray], np.ndarray]
# The WindowScorer outputs the exported ONNX graph has (jaxtag/export.py OUTPUTS), by name.
GRAPH_OUTPUTS = {"probabilities": "probabilities", "pooled": "embedding"}
OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16"}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def import_openvino() -> Any:
    """The openvino module, imported without its usage telemetry: a plain `import openvino`
    starts a process that sends an "import" event to Google Analytics (openvino-telemetry, via
    openvino.tools.ovc), a fork beside JAX's threads and a network call jaxtag does not make.
    Hiding openvino_telemetry during the import makes OpenVINO take its own no-op stub."""
    if "openvino" not in sys.modules and "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # `import openvino_telemetry` raises ImportError
        try:
            import openvino
        finally:
            if sys.modules.get("openvino_telemetry", 0) is None:
                del sys.modules["openvino_telemetry"]  # the user's own import still works
    import openvino

    return openvino


def onnx_runtime_missing() -> str | None:
    """Why the onnx engine cannot run here (a one-line message), or None when it can."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        return f"the onnx engine needs onnx and onnxruntime ({err}): pip install 'jaxtag[export]'"
    return None


def openvino_missing() -> str | None:
    """Why the openvino engine cannot run here (a one-line message), or None when it can."""
    try:
        import onnx  # noqa: F401  (builds the graph OpenVINO reads)

        import_openvino()
    except ImportError as err:
        return (
            f"the openvino engine needs openvino and onnx ({err}): pip install 'jaxtag[openvino]'"
        )
    return None


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively: OpenVINO's CPU `OPTIMIZATION_CAPABILITIES`
    lists BF16 (where openvino is installed), or /proc/cpuinfo has avx512_bf16 or amx_bf16."""
    if set(BF16_CPU_FLAGS) & set(autotune.cpu_identity()["flags"]):
        return True
    try:
        core = import_openvino().Core()
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # not installed, or no CPU plugin: the flags have answered
        return False


def bf16_problem() -> str | None:
    """Why bfloat16 cannot run on this CPU (one line), or None where it has native bf16."""
    if native_bf16():
        return None
    name = autotune.cpu_identity()["model"] or "this CPU"
    return (
        f"--precision bfloat16: the CPU ({name}) has no native bfloat16 (AVX512-BF16 or "
        "AMX), so it would be emulated, slower than float32; use --precision float32 (the "
        "default), or a chip with it (Intel Sapphire Rapids or AMD Zen 4 and later, or a GPU)"
    )


# ----------------------------------------------------------------------------------------------
# The engines' predictors: (N, n_mels, 256) log-mel windows -> (N, D) float32


def jax_predictor(loaded: LoadedModel, output: str, precision: str = "float32") -> Predictor:
    """The jitted model on JAX's default device (one compilation per batch size)."""
    import jax
    import jax.numpy as jnp

    from jaxtag.model import MTSA, build_model

    model = build_model(dataclasses.replace(loaded.config, dtype=precision))
    if output == "probabilities":
        fn = lambda v, x: jax.nn.sigmoid(model.apply(v, x).astype(jnp.float32))  # noqa: E731
    elif output == "pooled":
        fn = lambda v, x: model.apply(v, x, method=MTSA.features)  # noqa: E731
    else:
        fn = lambda v, x: model.apply(v, x, method=MTSA.representations)[output]  # noqa: E731
    variables = jax.device_put(loaded.variables)
    jitted = jax.jit(lambda v, x: fn(v, x).astype(jnp.float32))
    return lambda windows: jitted(variables, windows)


def openvino_predictor(
    loaded: LoadedModel,
    output: str = "probabilities",
    precision: str = "float32",
    threads: int | None = None,
) -> Predictor:
    """The exported graph compiled by OpenVINO for the CPU (dynamic batch: any N), computing in
    `precision`; `threads`: inference threads (default: OpenVINO's, the cores it may use)."""
    from jaxtag.export import INPUT, build_graph

    openvino = import_openvino()

    config = dataclasses.replace(loaded.config, dtype="float32")
    graph = build_graph(config, loaded.variables, loaded.tags).SerializeToString()
    core = openvino.Core()
    properties: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision],
        "PERFORMANCE_HINT": "LATENCY",  # one batch at a time, every thread on it
    }
    if threads:
        properties["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(core.read_model(graph), "CPU", properties)
    port = compiled.output(GRAPH_OUTPUTS[output])
    request, lock = compiled.create_infer_request(), threading.Lock()

    def predict(windows: np.ndarray) -> np.ndarray:
        with lock:  # one request object: the server's batcher and a caller may share it
            result = request.infer({INPUT: np.ascontiguousarray(windows, np.float32)})
            return np.array(result[port], np.float32)  # a copy: the request reuses its buffers

    return predict


def predictor(loaded: LoadedModel, engine: str, output: str, precision: str) -> Predictor:
    """The predictor of an engine named explicitly ("jax", "onnx" or "openvino")."""
    if engine == "onnx":
        from jaxtag import export

        return export.onnx_predictor(loaded, output=GRAPH_OUTPUTS[output])
    if engine == "openvino":
        return openvino_predictor(loaded, output, precision)
    return jax_predictor(loaded, output, precision)


# ----------------------------------------------------------------------------------------------
# auto


def tuning_key(loaded: LoadedModel, precision: str, batch_size: int, backend: str) -> dict:
    """What the measured winner depends on besides the CPU and jaxtag's version: the model's
    shape, the precision, the batch size and the engines' own versions."""
    versions = {}
    for package in ("jax", "onnxruntime", "openvino"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "architecture": loaded.config.architecture(),
        "precision": precision,
        "batch_size": batch_size,
        "backend": backend,
        "versions": versions,
    }


def choose(
    loaded: LoadedModel,
    names: list[str],
    default: str,
    output: str,
    precision: str,
    batch_size: int,
    backend: str,
) -> tuple[str, Predictor]:
    """The fastest of the engines `names` for `output` (measured, or stored: see the module
    doc; `default` when measuring is off or only one can run) and its predictor, built."""
    if len(names) == 1 or autotune.cache_file() is None:
        return default, predictor(loaded, default, output, precision)

    built: dict[str, Predictor] = {}
    rng = np.random.default_rng(0)
    shape = (batch_size, loaded.config.n_mels, audio.CHUNK_FRAMES)
    windows = rng.uniform(-60.0, 40.0, shape).astype(np.float32)  # the range of log-mel dB

    def run(name: str) -> Callable[[], None]:
        def call() -> None:
            if name not in built:  # the warm-up call builds it (and jax compiles)
                built[name] = predictor(loaded, name, output, precision)
            np.asarray(built[name](windows))  # np.asarray waits for JAX's asynchronous result

        return call

    key = tuning_key(loaded, precision, batch_size, backend)
    chosen = autotune.fastest("engine", {n: run(n) for n in names}, key, default=default)
    return chosen, built.get(chosen) or predictor(loaded, chosen, output, precision)
