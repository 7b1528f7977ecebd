"""foldserve's offline side: freeze BatchNorm statistics, fold every BN away, export, verify and
store. Three entry points share one path: ``foldserve train`` (the demos), ``foldserve export``
(your ``nn.Module``; needs torch) and ``foldserve import`` (an ONNX file; onnx and numpy only).

The server (``service``) never imports this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from foldserve.from_module import export, load_module
    from foldserve.from_onnx import import_onnx

__all__ = ["export", "import_onnx", "load_module"]


def __getattr__(name: str) -> Any:
    # NOTE: lazy, so `import foldserve` costs nothing and works where torch is not installed.
    if name in ("export", "load_module"):
        from foldserve import from_module

        return getattr(from_module, name)
    if name == "import_onnx":
        from foldserve import from_onnx

        return from_onnx.import_onnx
    raise AttributeError(f"module 'foldserve' has no attribute {name!r}")
