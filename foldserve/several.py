"""Modules of several inputs or outputs, for ``foldserve export``.

A module's forward may take several tensors (an image and its metadata, a moving and a fixed
image) and return a tuple, list, dict or dataclass of tensors (deep supervision, a mask and a
class). The export sees such a module two ways:

- ``Packed``: one float32 row per sample in, one out, each sample's tensors side by side as the
  server batches them (``service.packing``). The steps that only run the model (the float32
  conversion check, population statistics, the reference outputs, the float32 noise) take it as
  they take a module of one input and one output.
- ``Named``: the tensors themselves in, a tuple of the outputs out, in the manifest's order. It is
  what is folded and written to ONNX and TorchScript, so the files take and give named tensors.

Outputs are named by where they come from: a dict's keys, a dataclass's fields, ``output<i>`` for
the items of a tuple or list (``output_names`` renames them), ``output`` for one tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from service.errors import FoldingError
from service.packing import Packing, Signature
from service.store import TensorSpec

BARE_OUTPUT = "output"  # the name of the one tensor a forward returns bare
Key = int | str | None  # where a forward's result holds an output: index, key or field; None: bare


@dataclass(frozen=True)
class Outputs:
    """A forward's outputs: where its result holds each one, and the name each is served by."""

    keys: tuple[Key, ...]
    specs: tuple[TensorSpec, ...]


def found_outputs(result: object) -> list[tuple[Key, torch.Tensor]]:
    """The tensors a forward returned, with where the result holds each, in a fixed order."""
    pairs: list[tuple[Key, object]]
    if isinstance(result, torch.Tensor):
        return [(None, result)]
    if isinstance(result, dict):
        pairs = list(result.items())
    elif dataclasses.is_dataclass(result) and not isinstance(result, type):
        pairs = [(field.name, getattr(result, field.name)) for field in dataclasses.fields(result)]
    elif isinstance(result, tuple | list):
        pairs = list(enumerate(result))
    else:
        raise FoldingError(
            f"the model returns a {type(result).__name__}: foldserve serves a tensor, or a "
            "tuple, list, dict or dataclass of tensors"
        )
    # NOTE: None is no output: what a model computes only in training (SegResNetVAE's VAE loss
    # is None in eval mode) is left out; the others keep their names.
    pairs = [(key, value) for key, value in pairs if value is not None]
    tensors: list[tuple[Key, torch.Tensor]] = []
    for key, value in pairs:
        if not isinstance(value, torch.Tensor) or not isinstance(key, int | str):
            raise FoldingError(
                f"the model's output {default_name(key)!r} is a {type(value).__name__}, not a "
                "tensor: return tensors only (drop the others in a wrapper's forward)"
            )
        tensors.append((key, value))
    if not tensors:
        raise FoldingError("the model returns no tensors")
    return tensors


def default_name(key: Key) -> str:
    """A dict's key or a dataclass's field as it is; ``output<i>`` for a tuple's item."""
    return BARE_OUTPUT if key is None else f"output{key}" if isinstance(key, int) else str(key)


def model_outputs(
    model: nn.Module, inputs: Packing, rows: np.ndarray, names: Sequence[str] | None = None
) -> Outputs:
    """The model's outputs from one run on ``rows``: where each is, its name (``names``
    renames them, in order), its shape per sample."""
    # In the model's own dtype: it is converted to float32 later, once its outputs are known.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tensors = [torch.from_numpy(np.ascontiguousarray(t)).to(dtype) for t in inputs.unpack(rows)]
    with torch.no_grad():
        found = found_outputs(model.eval()(*tensors))
    if names is not None and len(names) != len(found):
        shown = [default_name(key) for key, _ in found]
        raise FoldingError(
            f"{len(names)} output names for the model's {len(found)} outputs {shown}"
        )
    chosen = list(names) if names is not None else [default_name(key) for key, _ in found]
    for name, (_, tensor) in zip(chosen, found, strict=True):
        if tensor.dim() == 0 or len(tensor) != len(rows):
            raise FoldingError(
                f"output {name!r} is shaped {tuple(tensor.shape)} for {len(rows)} samples: "
                "every output needs one row per sample"
            )
    specs = tuple(
        TensorSpec(name=name, shape=tuple(tensor.shape[1:]))
        for name, (_, tensor) in zip(chosen, found, strict=True)
    )
    return Outputs(tuple(key for key, _ in found), specs)


class Named(nn.Module):
    """The model with its outputs as a tuple in the manifest's order: what is folded and
    exported (ONNX and TorchScript name its inputs and outputs from the manifest)."""

    PREFIX = "model."  # of the model's own module names inside this one

    def __init__(self, model: nn.Module, inputs: int, keys: Sequence[Key]) -> None:
        super().__init__()
        self.model = model
        self.input_count = inputs
        self.keys = tuple(keys)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # NOTE: by index, not ``*inputs``: torch.fx traces the group as one value whose length
        # it cannot know, and splatting it fails; an index is one getitem per input.
        result = self.model(*[inputs[i] for i in range(self.input_count)])
        if isinstance(result, torch.Tensor):
            return (result,)
        if isinstance(result, dict):
            return tuple(result[key] for key in self.keys)
        if isinstance(result, tuple | list):  # the keys are indices
            return tuple(result[key] for key in self.keys if isinstance(key, int))
        return tuple(getattr(result, str(key)) for key in self.keys)


class Packed(nn.Module):
    """A ``Named`` model on rows: each sample's inputs side by side in, its outputs side by
    side out."""

    PREFIX = "named." + Named.PREFIX  # of the model's own module names inside this one

    def __init__(self, named: nn.Module, signature: Signature) -> None:
        super().__init__()
        self.named = named
        self.signature = signature

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        inputs = self.signature.inputs
        flat = rows.reshape(len(rows), -1)
        tensors = [
            flat[:, start:stop].reshape(len(rows), *spec.shape)
            for (start, stop), spec in zip(inputs.bounds, inputs.specs, strict=True)
        ]
        outputs = self.named(*tensors)
        if self.signature.outputs.single:  # rows of one tensor keep its shape (service.packing)
            first: torch.Tensor = outputs[0]
            return first
        return torch.cat([output.reshape(len(rows), -1) for output in outputs], dim=1)
