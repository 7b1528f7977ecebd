from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from foldserve.demos.data import Dataset
from foldserve.fold import fold_batch_norms
from foldserve.pipeline import onnx_opset
from foldserve.serialize import export_onnx, export_torchscript
from foldserve.tensors import predict
from foldserve.verify_export import ATOL, ExportedFile, verify_exports
from service.backends import BackendOptions
from service.backends.onnx import OnnxBackend
from service.errors import FoldingError, VerificationError


def _example(data: Dataset) -> torch.Tensor:
    return torch.from_numpy(data.x_train[:8])


@pytest.fixture(scope="module")
def folded_cnn_exports(trained_cnn: nn.Module, digits_images: Dataset) -> list[ExportedFile]:
    example = _example(digits_images)
    folded = fold_batch_norms(trained_cnn, example).module
    return [
        ExportedFile("onnx", "model.onnx", export_onnx(folded, example)),
        ExportedFile("torchscript", "model.ts", export_torchscript(folded, example)),
    ]


def test_folded_exports_hold_no_batch_norm_and_pass_verification(
    folded_cnn_exports: list[ExportedFile], trained_cnn: nn.Module, digits_images: Dataset
) -> None:
    onnx_file, torchscript_file = folded_cnn_exports
    ops = {node.op_type for node in onnx.load_model_from_string(onnx_file.content).graph.node}
    assert "BatchNormalization" not in ops
    assert {"Conv", "Mul", "Add"} <= ops  # the post-activation BN survives as a frozen affine
    assert b"batch_norm" not in torchscript_file.content

    verified = verify_exports(
        folded_cnn_exports, predict(trained_cnn, digits_images.x_test), digits_images.x_test
    )
    check = verified.verification
    assert check.batch_statistics_ops == 0
    assert check.samples_checked == len(digits_images.x_test)
    assert set(check.max_abs_diff) == {"onnx", "torchscript"}
    assert max(check.max_abs_diff.values()) < ATOL
    assert check.batch_invariance_max_diff < ATOL


def test_onnx_is_one_file_with_a_dynamic_batch(
    folded_cnn_exports: list[ExportedFile], tmp_path: Path
) -> None:
    content = folded_cnn_exports[0].content
    model = onnx.load_model_from_string(content)
    assert onnx_opset(content) >= 18
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    (graph_input,) = model.graph.input
    assert graph_input.name == "input"
    assert model.graph.output[0].name == "logits"
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed size
    path = tmp_path / "model.onnx"
    path.write_bytes(content)  # alone: there is no .data file beside it
    backend = OnnxBackend(path, BackendOptions(device="cpu"))
    for batch in (1, 3, 64):
        assert backend.run(np.zeros((batch, 1, 8, 8), np.float32)).shape == (batch, 10)


def test_bn_left_in_training_mode_and_unfolded_is_caught(
    trained_mlp: nn.Module, digits_flat: Dataset
) -> None:
    unfolded_training = copy.deepcopy(trained_mlp).train()
    example = _example(digits_flat)
    # The tracer itself only warns (about the BN's batch-size check), and keeps going.
    with pytest.warns(torch.jit.TracerWarning):
        traced = export_torchscript(unfolded_training, example)
    torchscript = ExportedFile("torchscript", "model.ts", traced)
    with pytest.raises(VerificationError) as caught:
        verify_exports([torchscript], predict(trained_mlp, digits_flat.x_test), digits_flat.x_test)
    print(f"TorchScript refused: {caught.value}")
    assert "batch-statistics ops" in str(caught.value)
    assert "BatchNorm1d" in str(caught.value)

    with pytest.warns(UserWarning, match="training mode"):  # the exporter's own warning
        onnx_bytes = export_onnx(unfolded_training, example)
    with pytest.raises(VerificationError, match="BatchNormalization") as caught:
        verify_exports(
            [ExportedFile("onnx", "model.onnx", onnx_bytes)],
            predict(trained_mlp, digits_flat.x_test),
            digits_flat.x_test,
        )
    print(f"ONNX refused: {caught.value}")


class _BatchCentered(nn.Module):
    """Normalizes with the batch mean and no BN op at all: only batch invariance can tell."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x - x.mean(dim=0, keepdim=True))


def test_batch_statistics_without_a_batch_norm_op_are_caught(
    trained_mlp: nn.Module, digits_flat: Dataset
) -> None:
    folded = fold_batch_norms(trained_mlp, _example(digits_flat)).module
    sneaky = _BatchCentered(folded).eval()
    exported = ExportedFile("onnx", "model.onnx", export_onnx(sneaky, _example(digits_flat)))
    assert "BatchNormalization" not in str(onnx.load_model_from_string(exported.content).graph)
    # As reference, the same module: on the whole held-out batch the outputs agree ...
    with pytest.raises(VerificationError, match="when it shares a batch") as caught:
        verify_exports([exported], predict(sneaky, digits_flat.x_test), digits_flat.x_test)
    # ... but a sample alone is centred differently than inside a batch.
    print(f"refused: {caught.value}")


def test_an_example_batch_of_one_is_refused(trained_mlp: nn.Module) -> None:
    with pytest.raises(FoldingError, match="a batch of at least 2 samples"):
        export_onnx(trained_mlp, torch.zeros(1, 64))


def test_exports_raise_no_warning_even_when_warnings_are_errors(
    trained_mlp: nn.Module, digits_flat: Dataset
) -> None:
    # Without pytest's ignore filters: the torch.jit deprecation and the exporter's internal
    # FutureWarning are silenced deliberately in foldserve.serialize, and nothing else leaks.
    folded = fold_batch_norms(trained_mlp, _example(digits_flat)).module
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_torchscript(folded, _example(digits_flat))
        export_onnx(folded, _example(digits_flat))
