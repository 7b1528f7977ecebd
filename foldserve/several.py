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

Outputs are named by where they come from: a dict's keys, a dataclass's fields, ``output_<i>``
for the items of a tuple or list, ``output`` for one tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from service.errors import FoldingError
from service.packing import Packing, Signature, packing
from service.store import TensorSpec

BARE_OUTPUT = "output"  # the name of the one tensor a forward returns bare


def named_outputs(result: object) -> list[tuple[str, torch.Tensor]]:
    """What a forward returned, as (name, tensor) pairs in a fixed order."""
    if isinstance(result, torch.Tensor):
        return [(BARE_OUTPUT, result)]
    if isinstance(result, dict):
        pairs = list(result.items())
    elif dataclasses.is_dataclass(result) and not isinstance(result, type):
        pairs = [(field.name, getattr(result, field.name)) for field in dataclasses.fields(result)]
    elif isinstance(result, tuple | list):
        pairs = [(f"output_{i}", item) for i, item in enumerate(result)]
    else:
        raise FoldingError(
            f"the model returns a {type(result).__name__}: foldserve serves a tensor, or a "
            "tuple, list, dict or dataclass of tensors"
        )
    # NOTE: None is no output: what a model computes only in training (SegResNetVAE's VAE loss
    # is None in eval mode) is left out; the others keep their names.
    pairs = [(name, value) for name, value in pairs if value is not None]
    for name, value in pairs:
        if not isinstance(value, torch.Tensor) or not isinstance(name, str):
            raise FoldingError(
                f"the model's output {name!r} is a {type(value).__name__}, not a tensor: return "
                "tensors only (drop the others in a wrapper's forward)"
            )
    if not pairs:
        raise FoldingError("the model returns no tensors")
    return pairs


def output_specs(model: nn.Module, inputs: Packing, rows: np.ndarray) -> tuple[TensorSpec, ...]:
    """The model's outputs, named and shaped per sample, from one run on ``rows``."""
    # In the model's own dtype: it is converted to float32 later, once its outputs are known.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tensors = [torch.from_numpy(np.ascontiguousarray(t)).to(dtype) for t in inputs.unpack(rows)]
    with torch.no_grad():
        pairs = named_outputs(model.eval()(*tensors))
    for name, tensor in pairs:
        if tensor.dim() == 0 or len(tensor) != len(rows):
            raise FoldingError(
                f"output {name!r} is shaped {tuple(tensor.shape)} for {len(rows)} samples: "
                "every output needs one row per sample"
            )
    return tuple(TensorSpec(name=name, shape=tuple(t.shape[1:])) for name, t in pairs)


class Named(nn.Module):
    """The model with its outputs as a tuple in the manifest's order: what is folded and
    exported (ONNX and TorchScript name its inputs and outputs from the manifest)."""

    PREFIX = "model."  # of the model's own module names inside this one

    def __init__(self, model: nn.Module, inputs: int, outputs: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.input_count = inputs
        self.output_names = tuple(outputs)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # NOTE: by index, not ``*inputs``: torch.fx traces the group as one value whose length
        # it cannot know, and splatting it fails; an index is one getitem per input.
        result = self.model(*[inputs[i] for i in range(self.input_count)])
        if isinstance(result, torch.Tensor):
            return (result,)
        if isinstance(result, dict):
            return tuple(result[name] for name in self.output_names)
        if isinstance(result, tuple | list):
            return tuple(result[int(name.removeprefix("output_"))] for name in self.output_names)
        return tuple(getattr(result, name) for name in self.output_names)


class Packed(nn.Module):
    """The model on rows: each sample's inputs side by side in, its outputs side by side out."""

    PREFIX = "named." + Named.PREFIX  # of the model's own module names inside this one

    def __init__(self, model: nn.Module, signature: Signature) -> None:
        super().__init__()
        self.named = Named(model, len(signature.inputs.specs), signature.outputs.names)
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


def signature_of(model: nn.Module, inputs: tuple[TensorSpec, ...], rows: np.ndarray) -> Signature:
    """The model's inputs as given, and its outputs as one run on ``rows`` shows them."""
    packed_inputs = packing(inputs)
    return Signature(packed_inputs, packing(output_specs(model, packed_inputs, rows)))
