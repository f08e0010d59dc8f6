"""What computes the network's forward on a worker: the device, the precision, and the runtime — torch, or
ONNX Runtime (``--runtime auto|torch|onnx``) — each resolved from ``auto`` here, in one place.

On a CPU without native bf16 (no AVX-512-BF16/AMX: most laptops, many servers) segpipe computes in
fp32, and there ONNX Runtime's CPU kernels run a Unet-resnet18 forward faster than torch's
(docs/benchmarks.md, "CPU forward"). The network is exported once per weights (``torch.onnx.export``,
cached on disk keyed by the weights' sha256, the opset and the exporter's torch version) and wrapped
in :class:`OnnxNetwork`, which the predictor calls exactly like the torch module: normalisation, TTA,
cropping, softmax and argmax stay in :mod:`segpipe.engine.predictor`, so the runtime changes nothing
but the logits' last bits.

The runtime is part of an output's identity like the precision (its settings and provenance), and is
resolved before an output is created (:func:`resolve_run_runtime`): ``auto`` may give onnx on one
machine and torch on another, and a resumed output must not mix them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from distributed import Client

    from segpipe.core.settings import InferenceSettings

log = logging.getLogger("segpipe.engine.runtime")

#: ONNX opset of the exported graph (every op of the smp networks exists in it; ONNX Runtime ≥ 1.14 runs it)
OPSET = 17
#: environment variable: the folder of segpipe's caches (default ``$XDG_CACHE_HOME/segpipe``)


#: environment variable: ``0`` makes segpipe treat this CPU as one without native bf16 (``auto`` then
#: resolves to fp32 and, with onnxruntime installed, the onnx runtime), to measure or reproduce what a
#: laptop computes; ``1`` claims native bf16. Unset: read from the CPU's flags.
CPU_BF16_ENV = "SEGPIPE_CPU_BF16"


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast pays off
    (``SEGPIPE_CPU_BF16=0|1`` overrides what the CPU's flags say)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; checks that a named CUDA device exists."""
    import torch

    from segpipe.core.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}", "CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}", f"only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def resolve_precision(precision: str, device: torch.device, cuda_without_bf16: str = "fp16",
                      what: str = "--precision") -> str:
    """``auto`` → bf16 where the device runs it natively (CUDA with bf16, AVX-512-BF16/AMX CPUs), fp32 elsewhere.

    On an older GPU without bf16, ``auto`` gives ``cuda_without_bf16`` (fp16 for inference; training
    passes fp32).
    """
    import torch

    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            from segpipe.core.errors import ConfigError

            raise ConfigError(f"{what} fp16", "fp16 autocast is for CUDA; use bf16 or fp32 on CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else cuda_without_bf16
    if device.type == "cpu" and cpu_supports_bf16():
        return "bf16"
    return "fp32"


@functools.cache
def onnxruntime_available() -> bool:
    """True when ``onnxruntime`` can be imported here (it is an optional dependency)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def resolve_runtime(runtime: str, precision: str, device: torch.device, what: str = "--runtime") -> str:
    """``auto`` → ``onnx`` on a CPU without native bf16 when onnxruntime is installed and ``precision``
    (already resolved) is fp32; ``torch`` everywhere else. An explicit ``onnx`` is checked: CPU, fp32,
    onnxruntime installed; anything else is one line naming what to change.
    """
    from segpipe.core.errors import ConfigError

    if runtime == "torch":
        return runtime
    if runtime == "onnx":
        problem = _onnx_problem(precision, device.type)
        if problem is None and not onnxruntime_available():
            problem = "onnxruntime is not installed: pip install onnxruntime"
        if problem is not None:
            raise ConfigError(f"{what} onnx", problem)
        return runtime
    if runtime != "auto":
        raise ConfigError(what, f"must be auto, torch or onnx, got {runtime!r}")
    if device.type == "cpu" and precision == "fp32" and not cpu_supports_bf16() and onnxruntime_available():
        return "onnx"
    return "torch"


def _onnx_problem(precision: str, device_type: str) -> str | None:
    """Why ``--runtime onnx`` cannot run with this (resolved) precision on this kind of device, or None."""
    if device_type not in ("cpu", "auto"):
        return f"runs on the CPU; this run's device is {device_type}: use --runtime torch"
    if precision != "fp32":
        return f"computes in fp32, the precision here is {precision}: pass --precision fp32"
    return None


def _worker_runtime(device: str, precision: str, runtime: str) -> str:
    dev = resolve_device(device)
    return resolve_runtime(runtime, resolve_precision(precision, dev), dev)


_run_runtime: dict[tuple[str, str, str, str], str] = {}
_run_runtime_lock = threading.Lock()


def resolve_run_runtime(client: Client, settings: InferenceSettings) -> str:
    """The runtime the workers will run, resolved before an output is created (``settings.precision``
    already resolved, as :func:`segpipe.engine.cluster.resolve_run_precision` gives it).

    An explicit runtime is what it says (a worker that cannot run it fails the image with one line);
    ``auto`` is asked of every worker once per client and settings, and workers that disagree are
    refused: an output is computed by one runtime, so a mixed fleet needs an explicit ``--runtime``.
    """
    from segpipe.core.errors import ConfigError

    if settings.runtime == "onnx":  # what can be checked here fails here, before any image
        problem = _onnx_problem(settings.precision, settings.device.split(":")[0])
        if problem is not None:
            raise ConfigError("--runtime onnx", problem)
    if settings.runtime != "auto":
        return settings.runtime
    if settings.precision != "fp32" or settings.device.startswith("cuda"):
        return "torch"  # onnx is only ever chosen for fp32 on a CPU: nothing to ask
    key = (str(getattr(client, "id", id(client))), settings.device, settings.precision, settings.runtime)
    with _run_runtime_lock:
        hit = _run_runtime.get(key)
    if hit is not None:
        return hit
    per_worker: dict[str, str] = client.run(_worker_runtime, settings.device, settings.precision, settings.runtime)
    found = sorted(set(per_worker.values()))
    if not found:
        raise ConfigError("--runtime auto", "no Dask worker is connected to resolve it; start workers first")
    if len(found) > 1:
        where = ", ".join(f"{r} on {next(w for w, v in per_worker.items() if v == r)}" for r in found)
        raise ConfigError("--runtime auto", f"the workers resolve it differently ({where}); an output must be "
                                            "computed by one runtime: pass --runtime explicitly")
    with _run_runtime_lock:
        if len(_run_runtime) > 64:
            _run_runtime.clear()
        _run_runtime[key] = found[0]
    return found[0]


def cache_dir() -> Path:
    """segpipe's cache folder (:func:`segpipe.io.storage.cache_root`: ``$SEGPIPE_CACHE``)."""
    from segpipe.io.storage import cache_root

    return Path(cache_root())


def onnx_cache_key(sha256: str, opset: int = OPSET) -> str:
    """File name of an exported graph: the weights, the opset and the exporter (torch's version) decide it."""
    import torch

    exporter = hashlib.sha256(f"torch-{torch.__version__}".encode()).hexdigest()[:8]
    return f"{sha256[:32]}-opset{opset}-{exporter}.onnx"


def export_onnx(net: torch.nn.Module, in_channels: int, path: Path, opset: int = OPSET) -> None:
    """Write the fp32 network to ``path`` as an ONNX graph with dynamic batch, height and width (input ``x``,
    output ``logits``)."""
    import torch

    x = torch.zeros(1, in_channels, 64, 64)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # the TorchScript exporter warns that it is deprecated (the dynamo exporter needs onnxscript and
        # torch.export of the network); its graph is what ONNX Runtime runs here, and it is tested
        warnings.simplefilter("ignore")
        torch.onnx.export(net.float().eval(), (x,), str(path), opset_version=opset, input_names=["x"],
                          output_names=["logits"], dynamo=False,
                          dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n", 2: "h", 3: "w"}})


def cached_onnx(net: torch.nn.Module, sha256: str, in_channels: int, opset: int = OPSET) -> bytes:
    """The exported graph of these weights: from the disk cache, else exported and stored there.

    The cache is a plain folder (:func:`cache_dir`/``onnx``) written atomically (temporary file, then
    rename), so workers of one machine exporting at once each write a whole file. A cache that
    cannot be written only costs the export again next time.
    """
    import tempfile

    path = cache_dir() / "onnx" / onnx_cache_key(sha256, opset)
    if sha256 and path.is_file():
        try:
            return path.read_bytes()
        except OSError:
            log.debug("could not read %s; exporting again", path, exc_info=True)
    with tempfile.TemporaryDirectory(prefix="segpipe-onnx-") as tmpdir:
        exported = Path(tmpdir) / "model.onnx"
        export_onnx(net, in_channels, exported, opset)
        graph = exported.read_bytes()
        if sha256:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(graph)
                os.replace(tmp, path)
            except OSError:
                log.info("could not cache the exported model at %s; it is kept in memory", path, exc_info=True)
                tmp.unlink(missing_ok=True)
    return graph


def session_options(threads: int) -> Any:
    """ONNX Runtime options for one worker's forward: ``threads`` intra-op threads (the forward's share of the
    worker's cores, as torch's would be), one inter-op thread, and no spinning.

    Spinning keeps idle pool threads busy-waiting after each operator; on a 2-core worker that steals
    the cores its reading and writing threads need (measured: docs/benchmarks.md, "CPU forward").
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    return so


class OnnxNetwork:
    """An exported network in an ONNX Runtime session, called like the torch module: a float32
    (N, C, H, W) tensor in, float32 logits (N, K, H, W) out, on the CPU.

    The session is created on the first call, on the predictor's compute thread, so its thread
    pool inherits that thread's core pinning (as torch's OpenMP pool does).
    """

    def __init__(self, graph: bytes, threads: int) -> None:
        self._graph: bytes | None = graph
        self.threads = threads
        self._session: Any = None
        self._lock = threading.Lock()

    def _start(self) -> Any:
        with self._lock:
            if self._session is None:
                import onnxruntime as ort

                self._session = ort.InferenceSession(self._graph, session_options(self.threads),
                                                     providers=["CPUExecutionProvider"])
                self._graph = None  # the session holds its own copy
            return self._session

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np
        import torch

        session = self._session or self._start()
        logits = session.run(None, {"x": np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(logits)


def onnx_network(net: torch.nn.Module, sha256: str, in_channels: int, threads: int) -> OnnxNetwork:
    """``net`` as an :class:`OnnxNetwork` (exported once per weights, see :func:`cached_onnx`)."""
    return OnnxNetwork(cached_onnx(net, sha256, in_channels), threads)
