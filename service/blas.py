"""numpy's BLAS on one thread, for the life of the process.

NOTE: numpy's OpenBLAS runs a matrix product (or a long dot product) on a pool of one thread per
core, and between calls its threads spin, waiting for the next one: a drift fold every 50 ms kept
one of them spinning, a whole core burnt while requests flowed. Pinned with threadpoolctl,
process-wide, as OpenBLAS has one setting, which the server can afford: its own numpy work is
small (the drift folds, the request path's checks), and onnxruntime and torch run models on their
own thread pools, left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def pin_numpy_blas() -> list[dict[str, Any]]:
    """Limit numpy's BLAS to one thread (see the module's NOTE); threadpoolctl's description of
    the libraries pinned, as pinned. Another BLAS in the process (a model runtime's) is left
    alone, unless numpy uses a system BLAS outside its package: then every BLAS loaded."""
    from threadpoolctl import ThreadpoolController  # here: the import scans loaded libraries

    controller = ThreadpoolController()
    blas = [info for info in controller.info() if info.get("user_api") == "blas"]
    site = Path(np.__file__).resolve().parent.parent
    numpy_own = [info for info in blas if _inside_numpy(info.get("filepath"), site)]
    chosen = numpy_own or blas
    if not chosen:
        return []
    pinned = controller.select(filepath=[info["filepath"] for info in chosen])
    pinned.limit(limits=1)  # kept: never restored, for the life of the process
    described: list[dict[str, Any]] = pinned.info()
    return described


def _inside_numpy(filepath: object, site: Path) -> bool:
    """A library shipped in numpy's wheel: site-packages/numpy.libs/, numpy/.dylibs/, ..."""
    if not isinstance(filepath, str):
        return False
    path = Path(filepath).resolve()
    return path.is_relative_to(site) and path.relative_to(site).parts[0].startswith("numpy")
