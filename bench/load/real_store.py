"""A model store of two real networks, made by ``foldserve export`` once and then cached.

MONAI's ResNet-50 (2-D, 3x224x224, 1,000 classes) and a 2-D UNet (1x256x256, two output
channels, BatchNorm), random weights, BN in eval mode with its running statistics: stored by
foldserve's own CLI, so the server loads them as it loads a user's models. The store is cached
under bench/.cache/ (gitignored), keyed by the versions of what makes it (torch, monai, onnx,
onnxscript, onnxruntime, numpy, foldserve, the last commit of foldserve/ and service/store.py)
and by the recipe below; reruns reuse it.

NOTE: what makes an export of ResNet-50 at 224x224 slow here (9.5 to 12 minutes) is verification
at one thread: for each of 16 probes the batch-invariance check runs 42 rows (alone, in batches
of 2, 7 and 32), in onnxruntime and again in TorchScript (1,344 rows), and the bitwise check runs
every batch size up to the row cap in onnxruntime (sum(2..27) = 377 rows; 2,079 for the UNet's
64-row cap). Two cuts keep every kind of check: the CLI's own options check on 4 samples
(``--calibration`` with 4 generated N(0, 1) samples, ``--bn-stats ema`` so they only check and
never set statistics), so 4 probes; and, since the CLI has no option for it, ``python -m
load.real_store`` runs the CLI with the bitwise measurement capped at BITWISE_ROWS rows. The
manifest records both (``samples_checked: 4``, ``bitwise_max_rows: 8``); folding, the export,
the equivalence and tolerance checks and the batching row cap the server uses are the CLI's.

    python -m load.real_store export ...   (the CLI's arguments; what ensure_store runs)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from load.cases import BENCH, PY, ROOT

CACHE = BENCH / ".cache"
BITWISE_ROWS = 8
CHECK_SAMPLES = 4
PACKAGES = ("torch", "monai", "onnx", "onnxscript", "onnxruntime", "numpy", "foldserve")


@dataclass(frozen=True)
class Network:
    name: str
    factory: str
    kwargs: dict[str, Any] = field(hash=False)
    input_shape: tuple[int, ...]

    def argv(self, store: Path, checks: Path) -> list[str]:
        shape = ",".join(map(str, self.input_shape))
        return [
            "export", "--model", self.factory, "--model-kwargs", json.dumps(self.kwargs),
            "--input-shape", shape, "--store", str(store), "--name", self.name,
            "--calibration", str(checks), "--bn-stats", "ema",
        ]  # fmt: skip

    def check_inputs(self) -> Path:
        """CHECK_SAMPLES generated N(0, 1) inputs, in the cache beside the stores."""
        import numpy as np

        path = CACHE / f"checks-{self.name}-{CHECK_SAMPLES}.npy"
        if not path.exists():
            rng = np.random.default_rng(0)
            x = rng.standard_normal((CHECK_SAMPLES, *self.input_shape), dtype=np.float32)
            np.save(path, x)
        return path


NETWORKS = (
    Network(
        "resnet50",
        "monai.networks.nets:resnet50",
        {"spatial_dims": 2, "n_input_channels": 3, "num_classes": 1000},
        (3, 224, 224),
    ),
    Network(
        "unet2d",
        "monai.networks.nets:UNet",
        {
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 2,
            "channels": [16, 32, 64, 128],
            "strides": [2, 2, 2],
            "norm": "batch",
        },
        (1, 256, 256),
    ),
)


def cache_key() -> str:
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    commit = subprocess.run(
        ["git", "log", "-1", "--format=%H", "--", "foldserve", "service/store.py"],
        cwd=ROOT, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    recipe = [(n.name, n.factory, n.kwargs, n.input_shape) for n in NETWORKS]
    text = json.dumps([versions, commit, recipe, BITWISE_ROWS, CHECK_SAMPLES], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_store(log_dir: Path) -> dict[str, Any]:
    """The cached store's path, or a new one built (minutes) and cached; how it was made."""
    key = cache_key()
    path = CACHE / f"real-models-{key}"
    method = (
        f"`foldserve export` of each network, checked on {CHECK_SAMPLES} generated samples, "
        f"bitwise batch invariance measured up to {BITWISE_ROWS} rows (python -m load.real_store)"
    )
    if (path / "build.json").exists():
        built = json.loads((path / "build.json").read_text())
        return {"path": str(path), "cached": True, "method": method, **built}
    CACHE.mkdir(exist_ok=True)
    for stale in CACHE.glob("partial-*"):  # left by a run stopped mid-build
        shutil.rmtree(stale, ignore_errors=True)
    partial = CACHE / f"partial-{key}-{os.getpid()}"
    seconds: dict[str, float] = {}
    env = {**os.environ, "PYTHONPATH": str(BENCH)}
    for net in NETWORKS:
        log = log_dir / f"export-{net.name}.log"
        print(f"  exporting {net.name} {net.input_shape} (first run only; log {log}) ...")
        started = time.monotonic()
        with log.open("w") as out:
            done = subprocess.run(
                [PY, "-m", "load.real_store", *net.argv(partial, net.check_inputs())],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1800,
            )  # fmt: skip
        seconds[net.name] = time.monotonic() - started
        print(f"  exported {net.name} in {seconds[net.name]:.0f} s", flush=True)
        if done.returncode != 0:
            raise RuntimeError(f"foldserve export of {net.name} failed: {log.read_text()[-800:]}")
    built = {"build_seconds": sum(seconds.values()), "export_seconds": seconds, "key": key}
    (partial / "build.json").write_text(json.dumps(built, indent=1))
    partial.rename(path)  # NOTE: whole or absent: a run stopped mid-build leaves only partial-*
    for old in CACHE.glob("real-models-*"):  # made by other versions: ~200 MB each
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    return {"path": str(path), "cached": False, "method": method, **built}


def export_cli(argv: list[str]) -> int:
    """``foldserve export`` itself, with its bitwise measurement capped at BITWISE_ROWS rows."""
    from foldserve import pipeline
    from service.cli import main

    measure = pipeline.verify_exports

    def capped(*args: Any, bitwise_max_rows: int = 0, **kwargs: Any) -> Any:
        return measure(*args, bitwise_max_rows=min(bitwise_max_rows, BITWISE_ROWS), **kwargs)

    pipeline.verify_exports = capped
    return int(main(argv))


if __name__ == "__main__":
    sys.exit(export_cli(sys.argv[1:]))
