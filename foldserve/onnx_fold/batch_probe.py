"""Where the batch went: run the graph at three batch sizes and see which axis follows.

ONNX shape inference loses a symbolic batch at ops whose output shape is computed at run time
(``Resize`` to sizes taken from a ``Shape``, say), and a reduction over axis 0 behind such an op
would be refused as mixing samples even when axis 0 is something else, e.g. the level axis of
``torch.stack(levels, dim=0)``. onnxruntime knows the real shapes: at batch sizes 1, 2 and 3 the
batch axis of a tensor is the one axis whose size is 1, 2 and 3.
"""

from __future__ import annotations

from copy import deepcopy

import numpy as np
import onnx
from onnx import helper

from foldserve.onnx_fold.graph import _real_inputs

_BATCH_SIZES = (1, 2, 3)
Shapes = dict[str, tuple[int, ...]]  # a data input's per-sample shape


def probed_batch_axes(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    """For each tensor in ``names``, the one axis whose size is the batch size when the graph
    runs in onnxruntime on generated inputs; tensors it cannot tell are left out (every data
    input needs a float type and fixed sizes after the batch axis)."""
    samples = _sample_shapes(model)
    if samples is None or not names:
        return {}
    probe = deepcopy(model)
    declared = {value.name for value in probe.graph.output}
    for name in names:
        if name not in declared:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    import onnxruntime as ort

    options = ort.SessionOptions()
    # The tensors asked for must survive as they are: no fusion may take them away.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    rng = np.random.default_rng(0)
    try:
        session = ort.InferenceSession(
            probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        runs = [
            session.run(
                names,
                {
                    name: rng.standard_normal((size, *shape)).astype(np.float32)
                    for name, shape in samples.items()
                },
            )
            for size in _BATCH_SIZES
        ]
    except Exception:  # onnxruntime raises its own untyped errors: nothing learned
        return {}
    axes: dict[str, int] = {}
    for index, name in enumerate(names):
        shapes = [np.shape(run[index]) for run in runs]
        if len({len(shape) for shape in shapes}) != 1:
            continue
        following = [
            axis
            for axis in range(len(shapes[0]))
            if [shape[axis] for shape in shapes] == list(_BATCH_SIZES)
        ]
        if len(following) == 1:
            axes[name] = following[0]
    return axes


def _sample_shapes(model: onnx.ModelProto) -> Shapes | None:
    """Each data input's shape after the batch axis, or None if one is not float32 with fixed
    sizes there (nothing to generate it from)."""
    shapes: Shapes = {}
    for value in _real_inputs(model.graph):
        tensor = value.type.tensor_type
        if tensor.elem_type != onnx.TensorProto.FLOAT or not tensor.HasField("shape"):
            return None
        dims = tensor.shape.dim[1:]
        if not all(dim.HasField("dim_value") and dim.dim_value > 0 for dim in dims):
            return None
        shapes[value.name] = tuple(dim.dim_value for dim in dims)
    return shapes or None
