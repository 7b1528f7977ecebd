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
from typing import cast

import numpy as np
import torch
from torch import nn

from service.errors import FoldingError
from service.packing import Packing, Signature
from service.store import TensorSpec

BARE_OUTPUT = "output"  # the name of the one tensor a forward returns bare
# Where a forward's result holds an output: the indices, keys or fields down to it (nested
# tuples, lists, dicts and dataclasses); () for a tensor returned bare.
Key = tuple[int | str, ...]


@dataclass(frozen=True)
class Outputs:
    """A forward's outputs: where its result holds each one, and the name each is served by."""

    keys: tuple[Key, ...]
    specs: tuple[TensorSpec, ...]


def found_outputs(result: object, key: Key = ()) -> list[tuple[Key, torch.Tensor]]:
    """The tensors a forward returned, with where the result holds each, in a fixed order (a
    dict's, a dataclass's, a sequence's), nested containers walked depth first."""
    if isinstance(result, torch.Tensor):
        return [(key, result)]
    items = _items(result, key)
    # NOTE: None is no output: what a model computes only in training (SegResNetVAE's VAE loss
    # is None in eval mode) is left out; the others keep their names.
    found = [
        pair
        for step, value in items
        if value is not None
        for pair in found_outputs(value, (*key, step))
    ]
    if not key and not found:
        raise FoldingError("the model returns no tensors")
    return found


def _items(result: object, key: Key) -> list[tuple[int | str, object]]:
    if isinstance(result, dict) and all(isinstance(k, str) for k in result):
        return list(result.items())
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return [(field.name, getattr(result, field.name)) for field in dataclasses.fields(result)]
    if isinstance(result, tuple | list):
        return list(enumerate(result))
    what = f"output {default_name(key)!r}" if key else "model's result"
    raise FoldingError(
        f"the {what} is a {type(result).__name__}, not a tensor: foldserve serves tensors, "
        "alone or in tuples, lists, dicts (by string key) and dataclasses; drop the others in "
        "a wrapper's forward"
    )


def default_name(key: Key) -> str:
    """A dict's key or a dataclass's field as it is, ``output<i>`` for a sequence's item;
    nested ones joined by ``_`` (``output0_2``)."""
    if not key:
        return BARE_OUTPUT
    first, *rest = key
    parts = [f"output{first}" if isinstance(first, int) else first, *map(str, rest)]
    return "_".join(parts)


def pick(result: object, key: Key) -> torch.Tensor:
    """The output at ``key`` in a forward's result."""
    for step in key:
        if isinstance(result, dict):
            result = result[step]
        elif isinstance(result, tuple | list):
            result = result[int(step)]
        else:
            result = getattr(result, str(step))
    # NOTE: no isinstance check: while torch.fx traces, the output is a Proxy for a tensor.
    return cast(torch.Tensor, result)


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
        return tuple(pick(result, key) for key in self.keys)


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
