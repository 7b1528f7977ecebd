"""Serialize a folded, eval-mode module as ONNX and TorchScript, in memory (bytes).

Nothing here checks the result: ``foldserve.verify_export`` loads the bytes with the server's own
backends and proves them before anything reaches the store.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from foldserve.fold import Examples, as_examples
from foldserve.tensors import INPUT_NAME, OUTPUT_NAME

log = logging.getLogger(__name__)

ONNX_OPSET = 18

_torchscript_deprecation_logged = False


def export_onnx(
    module: nn.Module,
    example: Examples,
    optimize: bool = True,
    input_names: Sequence[str] = (INPUT_NAME,),
    output_names: Sequence[str] = (OUTPUT_NAME,),
) -> bytes:
    """One self-contained ONNX file with a dynamic batch dimension (weights embedded).

    ``example``: one batch per input (a module of several takes them as positional arguments,
    named ``input_names``; it returns a tuple, named ``output_names``). ``optimize=False`` skips
    the exporter's own graph optimizer, which would fold some BatchNormalization ops into
    convolutions without telling us which.
    """
    examples = as_examples(example)
    # NOTE: the torch.export-based exporter (torch 2.13's default) handles the folded fx
    # GraphModule directly. It needs an example batch >= 2 to keep the batch dimension symbolic,
    # and it does not call eval() itself.
    batch = torch.export.Dim("batch")
    with _quiet_exporter_registry(), warnings.catch_warnings():
        # NOTE: torch.export deep-copies its own pytree specs, which trips torch's deprecation of
        # `isinstance(treespec, LeafSpec)` inside torch; it is attributed to copyreg, so the
        # test suite's torch.* filters miss it. Nothing we can change: silence exactly that one.
        warnings.filterwarnings(
            "ignore",
            message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
            category=FutureWarning,
        )
        # NOTE: every input's dim 0 is the one "batch" on purpose; the exporter warns that it
        # names that shared axis once, which is what is wanted.
        warnings.filterwarnings(
            "ignore",
            message=r"# The axis name: batch will not be used, since it shares",
            category=UserWarning,
        )
        program = torch.onnx.export(
            module,
            examples,
            dynamo=True,
            external_data=False,
            opset_version=ONNX_OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=_dynamic_batch(module, batch, len(examples)),
            optimize=optimize,
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    # Weights are initializers inside the proto; these models are far below protobuf's 2 GB cap.
    return bytes(program.model_proto.SerializeToString())


def export_torchscript(module: nn.Module, example: Examples) -> bytes:
    """A traced TorchScript program; the module must already be folded and in eval mode (one
    batch per input: a program of several takes them by position, returns a tuple)."""
    examples = as_examples(example)
    with warnings.catch_warnings():
        # NOTE: torch 2.13 deprecates torch.jit in favour of torch.export, but Triton's PyTorch
        # backend and libtorch users still load TorchScript, so we produce it on purpose and
        # silence only that deprecation, and only here (see docs/torchscript.md).
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
        )
        _log_torchscript_deprecation_once()
        with torch.no_grad():
            traced = torch.jit.trace(module, examples, check_trace=True)  # type: ignore[no-untyped-call]
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _dynamic_batch(module: nn.Module, batch: torch.export.Dim, inputs: int) -> tuple[Any, ...]:
    """dim 0 of every input is the one batch dimension (their rows are the same samples), in
    the structure of forward's arguments: ``*inputs`` (``foldserve.several.Named``) takes them
    as one group."""
    dims = tuple({0: batch} for _ in range(inputs))
    parameters = inspect.signature(module.forward).parameters.values()
    return (dims,) if any(p.kind is p.VAR_POSITIONAL for p in parameters) else dims


def _log_torchscript_deprecation_once() -> None:
    global _torchscript_deprecation_logged
    if not _torchscript_deprecation_logged:
        _torchscript_deprecation_logged = True
        log.info(
            "torch.jit is deprecated in torch %s; writing TorchScript anyway for Triton and "
            "libtorch users (DeprecationWarning silenced for the trace only)",
            torch.__version__,
        )


@contextlib.contextmanager
def _quiet_exporter_registry() -> Iterator[None]:
    """Hide the exporter's 'torchvision is not installed. Skipping torchvision::...' warnings.

    They are logged on every export and only say that torchvision ops cannot be exported; our
    models use none.
    """
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
