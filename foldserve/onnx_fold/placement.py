"""Placing one BN: into the previous layer, else the next, else a frozen affine; and its record."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx

from foldserve.onnx_fold.frozen import _freeze
from foldserve.onnx_fold.graph import _Graph
from foldserve.onnx_fold.into_next import _fold_into_next
from foldserve.onnx_fold.into_previous import _fold_into_previous
from foldserve.onnx_fold.statistics import _BatchNorm, _statistics
from service.store import BatchNormRecord, Placement


def _fold_one(graph: _Graph, node: onnx.NodeProto) -> BatchNormRecord:
    name = node.name or node.output[0]
    (mean, var, eps, scale, bias), dtype = _statistics(graph, node, name)
    multiplier = scale / np.sqrt(var + eps)
    rank = graph.ranks.get(node.input[0], graph.ranks.get(node.output[0]))
    batch_norm = _BatchNorm(node, name, multiplier, bias - mean * multiplier, rank, dtype)
    placement, target = _place(graph, batch_norm)
    digest = hashlib.sha256()
    for values in (mean, var, eps, scale, bias):
        digest.update(values.astype("<f8").tobytes())
    return BatchNormRecord(
        name=name,
        features=batch_norm.features,
        placement=placement,
        target=target,
        stats_sha256=digest.hexdigest(),
    )


def _place(graph: _Graph, bn: _BatchNorm) -> tuple[Placement, str | None]:
    target = _fold_into_previous(graph, bn)
    if target is not None:
        return "folded_into_previous", target
    target = _fold_into_next(graph, bn)
    if target is not None:
        return "folded_into_next", target
    _freeze(graph, bn)
    return "frozen_affine", None
