"""Load any textcls model folder for inference: the one path used by evaluation and serving.

:func:`load_predictor` reads the folder's ``textcls.json`` and returns a
:class:`Predictor` for its format: ``pytorch`` (a transformers model) or
``onnx`` / ``onnx-fp16`` / ``onnx-int8`` (an ONNX Runtime session on
``model.onnx``). Every predictor tokenizes with the folder's own tokenizer and
:func:`pipeline.preprocess.encode`, exactly as training did.

The ONNX contract (names in :mod:`pipeline.contract`, checked by
:mod:`pipeline.export`): int64 inputs ``input_ids``, ``attention_mask``,
``token_type_ids`` of shape ``[batch, sequence]``; output ``logits``, float32
``[batch, num_labels]``.

Predictors are safe to call from several threads at once.
"""

from __future__ import annotations

import inspect
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common import StepError
from pipeline.contract import FORMATS, LOGITS, META_FILE, MODEL_INPUTS, ONNX_FILE, ModelMeta
from pipeline.modeling import load_model
from pipeline.preprocess import (
    Tokens,
    collate,
    encode,
    load_tokenizer,
    token_lengths,
    tokenize,
)

log = logging.getLogger(__name__)

# predict_logits splits long lists into length-sorted chunks of this size so a
# call with thousands of texts neither pads them all to one length nor
# allocates one giant batch.
DEFAULT_CHUNK = 64
# ORT graph optimizers left off for fp32/int8 graphs on the CPU provider. ORT
# 1.32's CPU SkipLayerNormalization kernel was slower than the Add +
# LayerNormalization it replaces: ~20% of the int8 student's kernel time, and
# batch-32 throughput 842 -> 1048 sent/s without it (bench/compression.py's
# student, one thread); logits agree within ~1e-3 (rounding of the int8
# activations). The fusion does not fire on the fp32 export, only on int8.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` torch CPU threads (``None``: as is), then restore the old count.

    On a CPU shared with other jobs, fewer threads than cores can be far faster:
    oversubscribed OpenMP threads spin and wait on each other (measured: one
    tiny-BERT epoch took 16 s with 1 thread, 258 s with 2, on 2 busy cores).
    """
    if not n:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    z = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def top_class(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(labels int64 [n], softmax probability of each label float32 [n])`` of ``logits``."""
    probs = softmax(logits)
    labels = probs.argmax(axis=-1).astype(np.int64)
    return labels, probs[np.arange(len(labels)), labels].astype(np.float32)


class Predictor(ABC):
    """A loaded model: texts in, logits / labels and probabilities out."""

    format: str
    device: str
    num_labels: int
    label_names: list[str]
    max_length: int
    model_dir: Path

    def __init__(self, model_dir: Path, meta: ModelMeta, tokenizer: Any, device: str) -> None:
        self.model_dir = Path(model_dir)
        self.meta = meta
        self.format = meta.format
        self.num_labels = int(meta.num_labels)
        self.max_length = int(meta.max_length)
        # The name of each class id (``"0"``, ``"1"``... where the data had none).
        self.label_names = meta.names()
        self.device = device
        self.tokenizer = tokenizer
        # HF fast tokenizers mutate their Rust-side truncation/padding state on
        # every call, and concurrent calls fail with "Already borrowed"; the
        # model call itself runs outside this lock.
        self._tok_lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenize like training did (dynamic padding, truncation at ``max_length``)."""
        with self._tok_lock:
            return encode(self.tokenizer, texts, self.max_length)

    def tokenize(self, texts: Sequence[str]) -> list[Tokens]:
        """Each text's tokens, unpadded (:func:`pipeline.preprocess.tokenize`)."""
        with self._tok_lock:
            return tokenize(self.tokenizer, texts, self.max_length)

    def predict_tokens(self, tokens: Sequence[Tokens]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict` for texts :meth:`tokenize` already tokenized (padded here)."""
        if not tokens:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        return top_class(self.predict_encoded(collate(self.tokenizer, tokens)))

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Token counts (with specials, capped at ``max_length``), for length grouping."""
        with self._tok_lock:
            return token_lengths(self.tokenizer, texts, self.max_length)

    @abstractmethod
    def predict_encoded(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Logits (float32 ``[n, num_labels]``) for an already encoded batch."""

    def predict_logits(self, texts: Sequence[str], chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
        """Logits (float32 ``[n, num_labels]``) for ``texts``, in their order."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.num_labels), dtype=np.float32)
        if len(texts) <= chunk_size:
            return self.predict_encoded(self.encode(texts))
        # Character count is a good enough proxy for token count to group by.
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.num_labels), dtype=np.float32)
        for start in range(0, len(texts), chunk_size):
            idx = order[start : start + chunk_size]
            out[idx] = self.predict_encoded(self.encode([texts[i] for i in idx]))
        return out

    def predict(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(labels int64 [n], softmax probability of each predicted label float32 [n])``."""
        return top_class(self.predict_logits(texts))

    @abstractmethod
    def close(self) -> None:
        """Drop the model so its (GPU) memory can be freed once nothing else holds it."""

    def synchronize(self) -> None:
        """Wait for work still queued on the device, so a timer stops after it.

        ONNX Runtime's ``run`` returns when its outputs are ready, so only
        :class:`TorchPredictor` has anything to wait for.
        """
        return None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.model_dir}, format={self.format}, device={self.device})"
        )


class TorchPredictor(Predictor):
    """A transformers sequence classifier in eval mode."""

    def __init__(self, model_dir: Path, meta: ModelMeta, tokenizer: Any, device: str) -> None:
        import torch

        super().__init__(model_dir, meta, tokenizer, device)
        self._torch_device = torch.device(device)
        model = load_model(model_dir).float().eval().to(self._torch_device)
        params = inspect.signature(model.forward).parameters
        # Some architectures (DistilBERT...) take no token_type_ids.
        self._inputs = tuple(name for name in MODEL_INPUTS if name in params)
        self.model: Any = model
        got = int(model.config.num_labels)
        if got != self.num_labels:
            raise StepError(f"{META_FILE} says {self.num_labels} labels but the model has {got}")

    def predict_encoded(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        inputs = {
            k: torch.from_numpy(np.ascontiguousarray(batch[k], dtype=np.int64)).to(
                self._torch_device
            )
            for k in self._inputs
            if k in batch
        }
        with torch.inference_mode():
            logits = self.model(**inputs).logits
        return np.asarray(logits.float().cpu().numpy(), dtype=np.float32)

    def close(self) -> None:
        self.model = None
        if self._torch_device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def synchronize(self) -> None:
        # predict_encoded's .cpu() copy waits already; this makes the timing
        # independent of that detail.
        from pipeline.device import synchronize

        synchronize(self._torch_device)


class OnnxPredictor(Predictor):
    """An ONNX Runtime session on ``model.onnx``, fed only the inputs it declares."""

    def __init__(
        self,
        model_dir: Path,
        meta: ModelMeta,
        tokenizer: Any,
        *,
        want_cuda: bool | None,
        threads: int | None,
        disabled_optimizers: Sequence[str] | None = None,
        device_id: int | None = None,
        io_binding: bool = False,
    ) -> None:
        import onnxruntime as ort

        path = Path(model_dir) / ONNX_FILE
        if not path.is_file():
            raise StepError(f"{model_dir} is a {meta.format} model but has no {ONNX_FILE}")
        available = ort.get_available_providers()
        cuda = "CUDAExecutionProvider"
        if want_cuda and cuda not in available:
            raise StepError(
                "device cuda was requested but ONNX Runtime has no CUDAExecutionProvider here "
                f"(available: {available})"
            )
        use_cuda = want_cuda is not False and cuda in available
        providers: list[Any] = ["CPUExecutionProvider"]
        if use_cuda:
            providers.insert(0, (cuda, {"device_id": device_id or 0}))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = graph_optimization_level(meta.format)
        if disabled_optimizers is None:
            cpu_graph = not use_cuda and meta.format != "onnx-fp16"
            disabled_optimizers = CPU_DISABLED_OPTIMIZERS if cpu_graph else ()
        self.disabled_optimizers = tuple(disabled_optimizers)
        extra: dict[str, Any] = {}
        if disabled_optimizers:
            extra["disabled_optimizers"] = list(disabled_optimizers)
        try:
            session = ort.InferenceSession(str(path), opts, providers=providers, **extra)
        except Exception as exc:  # ORT raises its own exception types; the caller needs one
            raise StepError(f"ONNX Runtime could not load {path}: {exc}") from exc
        # ORT falls back to the CPU if the CUDA provider fails to initialise.
        device = "cpu"
        if session.get_providers()[0] == cuda:
            device = f"cuda:{device_id}" if device_id is not None else "cuda"
        super().__init__(model_dir, meta, tokenizer, device)
        self.session: Any = session
        # IO binding: inputs bound from host memory, logits bound to host
        # memory, one run_with_iobinding per call (a fresh binding per call
        # keeps the predictor thread-safe). Off by default: texts come from the
        # CPU tokenizer and logits go back to it, so run() makes the same two
        # copies; bench/gpu.py times both on the CUDA provider.
        self.io_binding = bool(io_binding)
        self._inputs = {i.name: _np_dtype(i.type) for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        self._output = LOGITS if LOGITS in outputs else outputs[0]
        missing = set(self._inputs) - set(MODEL_INPUTS)
        if missing:
            raise StepError(f"{path.name} wants inputs {sorted(missing)} outside the contract")

    def predict_encoded(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: np.asarray(batch[name], dtype=dtype) for name, dtype in self._inputs.items()}
        if self.io_binding:
            binding = self.session.io_binding()
            for name, value in feed.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            binding.bind_output(self._output, "cpu")
            self.session.run_with_iobinding(binding)
            (logits,) = binding.copy_outputs_to_cpu()
        else:
            (logits,) = self.session.run([self._output], feed)
        return np.asarray(logits, dtype=np.float32)

    def close(self) -> None:
        self.session = None


def graph_optimization_level(fmt: str) -> Any:
    """ORT_ENABLE_ALL, except for fp16 graphs, which the fp16 step has already fused.

    Measured on the CPU (ORT 1.32, a fused fp16 tiny BERT from
    :mod:`pipeline.optimize`): every level from DISABLE_ALL to ENABLE_ALL loads
    and gives the same logits, with no speed difference beyond noise. The fusion
    is already done, so the basic level (constant folding, redundant-node
    removal) is used: it cannot re-fuse or re-layout an fp16 graph in ways the
    fp16 check never saw. Not yet measured on CUDA.
    """
    import onnxruntime as ort

    if fmt == "onnx-fp16":
        return ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def _np_dtype(onnx_type: str) -> Any:
    # The contract says int64; a graph that declares int32 gets int32.
    return np.int32 if onnx_type == "tensor(int32)" else np.int64


def _want_cuda(device: str) -> bool | None:
    """``None``: use CUDA if available; ``True``: required; ``False``: never."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        return None
    if name == "cpu":
        return False
    if name in ("cuda", "gpu") or name.startswith("cuda:"):
        return True
    raise StepError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")


def _device_index(device: str) -> int | None:
    """The ``N`` of ``cuda:N`` (None without one)."""
    name = (device or "").strip().lower()
    if name.startswith("cuda:") and name[5:].isdigit():
        return int(name[5:])
    return None


def _torch_device(device: str) -> str:
    """``device`` resolved for torch (an error naming what this machine has if it lacks it)."""
    from pipeline.device import resolve_device

    _want_cuda(device)  # the same vocabulary for both runtimes
    return str(resolve_device(device))


def load_predictor(
    model_dir: Path,
    *,
    device: str = "auto",
    threads: int | None = None,
    disabled_optimizers: Sequence[str] | None = None,
    io_binding: bool = False,
) -> Predictor:
    """Load a textcls model folder of any format for inference.

    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``/``gpu``
    (an error if unavailable). ``threads`` sets ONNX Runtime's intra-op
    threads; for PyTorch it calls ``torch.set_num_threads``, which is
    process-wide. ``disabled_optimizers``: ORT graph optimizers to skip
    (``None``: :data:`CPU_DISABLED_OPTIMIZERS` for fp32/int8 graphs on the CPU,
    none otherwise; ``()``: ORT's full default set). ``io_binding``: run ONNX
    models on CUDA through ORT IO binding (see :class:`OnnxPredictor`).
    """
    model_dir = Path(model_dir)
    if not (model_dir / META_FILE).is_file():
        raise StepError(f"{model_dir} is not a textcls model folder (no {META_FILE})")
    meta = ModelMeta.load(model_dir)
    if meta.format not in FORMATS:
        raise StepError(f"unknown model format {meta.format!r} in {model_dir / META_FILE}")
    tokenizer = load_tokenizer(model_dir)
    predictor: Predictor
    if meta.format == "pytorch":
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        predictor = TorchPredictor(model_dir, meta, tokenizer, _torch_device(device))
    else:
        predictor = OnnxPredictor(
            model_dir,
            meta,
            tokenizer,
            want_cuda=_want_cuda(device),
            threads=threads,
            disabled_optimizers=disabled_optimizers,
            device_id=_device_index(device),
            io_binding=io_binding,
        )
    log.info("loaded %r", predictor)
    return predictor
