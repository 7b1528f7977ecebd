"""The report's prose: how each row was measured, and what the figures show (computed from them)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from bench.zoo import latency, measure, network


def method(options: dict[str, Any]) -> list[str]:
    image, scan, pair = network.IMAGE, network.SCAN, network.PAIR
    bitwise = options["bitwise_rows"]
    return [
        "## How each row is made",
        "",
        "- **Sizes** (one sample): 2-D classifiers "
        f"{_shape(image[2])}, 3-D classifiers {_shape(image[3])}; segmentation, reconstruction "
        f"{_shape(scan[2])} and {_shape(scan[3])}; registration (moving and fixed stacked) "
        f"{_shape(pair[2])} and {_shape(pair[3])}; HoVerNet 3x256x256 (fixed by its FAST mode); "
        "Generator a latent of 32. Configurable networks are built small (the JSON holds every "
        "argument); the ResNets use the usual stride-2 stem (`conv1_t_stride=2`).",
        f"- **Statistics**: {measure.STATS_PASSES} train-mode passes of {measure.STATS_BATCH} "
        "samples of N(0.5, 2²) (2 for HoVerNet), then `eval()`, as "
        "tests/foldserve/test_architectures.py does.",
        f"- **Export**: `foldserve.export(model, shape, store=<tmp>, name=..., calibration=...)` "
        f"with {options['check_samples']} generated N(0, 1) samples "
        "(`foldserve.calibration.Calibration(..., generated=True)`): it folds, writes ONNX and "
        "TorchScript, checks them on those samples, and probes batch invariance with batches of "
        "2, 7 and 32 wild batch mates.",
        (
            f"- **Bitwise batch invariance** is measured by foldserve up to {bitwise} rows (batch "
            "sizes 2 to {bitwise}), not up to its row cap of 64: foldserve.export has no "
            "parameter for it and its cost does not depend on the calibration size "
            "(sum(2..64) = 2,079 rows of inference per network, which alone would make this run "
            "last hours), so the zoo lowers `foldserve.pipeline.row_cap` during the call."
        ).replace("{bitwise}", str(bitwise))
        if bitwise
        else "- **Bitwise batch invariance** is measured by foldserve up to its own row cap.",
        "- **max abs Δ / rel Δ**: the largest |folded ONNX in onnxruntime - eval-mode torch| over "
        "foldserve's check samples and the zoo's own latency batch (fresh N(0, 1) inputs); rel "
        "is relative to each sample's largest |output|. **batch Δ**: the largest change of a "
        "sample's output alone vs among batch mates (foldserve's tolerance check).",
        "- **export s**: the whole `foldserve.export` call, and its fold+export step alone "
        "(fx trace, fold, ONNX and TorchScript export); the rest is mostly verification.",
        "- **Latency**: onnxruntime, CPUExecutionProvider, `intra_op_num_threads=1`, median of "
        f"{latency.MIN_RUNS} to {latency.RUNS} runs after a warm-up, at batch 1 and batch N = "
        f"{latency.LARGE_BATCH}, halved until one run takes at most "
        f"{latency.LARGE_RUN_SECONDS:g} s (so big 3-D networks use a smaller N: the column says "
        "which). *folded* is foldserve's file; *unfolded* is "
        "`foldserve.serialize.export_onnx(model.eval(), example, optimize=False)`, which keeps "
        "every BatchNormalization op, with one repair (`bench/zoo/unfolded.py`): unoptimized, "
        "torch 2.13's exporter gives every bias-free Conv a zero bias computed at run time, which "
        "onnxruntime refuses to run for Conv3d (wrong shape) and which stops it fusing Conv+BN "
        "for Conv2d; the zoo drops those computed biases. NOTE: onnxruntime's own optimizer "
        "fuses Conv+BatchNormalization at session creation, so the unfolded latency already has "
        "that fusion for BNs right after a convolution; it cannot fuse BNs after an activation, "
        "a concatenation, a sum or a Gemm. The column *not fused by ORT* counts, in the graph "
        "onnxruntime optimized, the BatchNormalization ops left plus the depthwise convolutions "
        "its 2-D NCHWc layout pass made of others.",
    ]


def observations(passed: list[dict[str, Any]], options: dict[str, Any]) -> list[str]:
    if not passed:
        return []
    return [
        "## Notes",
        "",
        *_placements(passed),
        *_onnx_path(passed),
        *_accuracy(passed, options),
        *_speed(passed),
        *_time(passed),
        "",
    ]


# What a failure message means, by a phrase it contains (checked against the code in use).
CAUSES = {
    "not one tensor": "The eval-mode forward returns a tuple, list or dict, which foldserve "
    "served as one output only before issue 18 (since then: every output, by name).",
    "not a tensor: return tensors only": "The eval-mode forward returns something other than "
    "tensors among its outputs; foldserve serves tensors only and names the value.",
    "takes its axes at run time": "**A limitation of the ONNX-level fold** (the fallback when "
    "torch.fx cannot trace the network), fixed since this run: unoptimized, torch's exporter "
    "writes a mean's axes as `Reshape(Constant, Constant)`, which foldserve now evaluates. "
    "Rerun alone on 2026-12-02 (`bench/model-zoo --only FlexibleUNet`, `--only RegUNet`, "
    "`--only LocalNet`), all three pass.",
    "reduces over axis 0, the batch axis": "**A false refusal of the ONNX-level fold**, fixed "
    "since this run: MONAI's `RegistrationExtractionBlock` averages its levels with "
    "`torch.mean(torch.stack(levels, dim=0), dim=0)`; axis 0 of that stack is the level, not "
    "the batch. foldserve now follows the batch axis through ONNX shape inference and, where "
    "inference loses it (here at a `Resize` whose sizes come from a `Shape`), runs the graph in "
    "onnxruntime at batch sizes 1, 2 and 3 to find it. Rerun alone on 2026-12-02, RegUNet-3d "
    "and LocalNet-3d pass.",
    "expected scalar type Float but found Double": "GlobalNet keeps its grid as a plain "
    "float32 attribute, which `.double()` does not convert, so the float64 run that measures "
    "the network's own rounding failed; since this run, foldserve skips that measurement "
    "(default tolerance) when the float64 copy cannot run; rerun alone, both GlobalNets pass.",
    "when it shares a batch of": "**Float32 rounding, not batch statistics**: the folded file "
    "holds no batch-statistics op (foldserve checked), but onnxruntime runs a batch of 32 with "
    "other kernel blocking than a single sample, and this deep, randomly initialized network "
    "amplifies that rounding just past the fixed 1e-4 of the batch-invariance check. The "
    "message of this run blamed batch statistics; since then it does so only for a change ten "
    "times the bound.",
}


def failure_causes(failed: list[dict[str, Any]]) -> list[str]:
    lines = []
    for phrase, cause in CAUSES.items():
        names = [f"`{r['name']}`" for r in failed if phrase in r["status"]]
        if names:
            lines.append(f"- {', '.join(names)}: {cause}")
    return ["What the failures mean:", "", *lines] if lines else []


def _placements(passed: list[dict[str, Any]]) -> list[str]:
    totals: Counter[str] = Counter()
    for r in passed:
        totals.update(r["placements"])
    frozen = [r for r in passed if r["placements"].get("frozen_affine")]
    static_pad = [
        f"`{r['name']}`"
        for r in frozen
        if r["factory"].startswith("efficientnet_pytorch")
        and r["placements"]["frozen_affine"] == r["recorded_batch_norms"]
    ]
    lines = [
        f"- **Where the {sum(totals.values())} BNs of the passing networks went**: "
        f"{totals['folded_into_previous']} folded_into_previous, "
        f"{totals['folded_into_next']} folded_into_next, {totals['frozen_affine']} "
        "frozen_affine (`x * scale + shift`). A BN stays a frozen affine when no neighbour can "
        "absorb it exactly: its input is not the exclusive output of a Conv/Linear module "
        "(pre-activation BNs after a concatenation, a residual sum or a pooling, as in "
        "DenseNet's BN-ReLU-Conv layers and transitions), and its output feeds an activation "
        "or a zero-padding convolution, which cannot take a per-channel shift on its input. "
        f"Networks with frozen affines: {_names(frozen, 'frozen_affine')}.",
    ]
    if static_pad:
        lines.append(
            "- **efficientnet-pytorch keeps every BN as a frozen affine** "
            f"({', '.join(static_pad)}): its convolutions are `Conv2dStaticSamePadding`, an "
            "`nn.Conv2d` subclass whose forward pads and then calls `F.conv2d` on its own "
            "weight. torch.fx traces into it (only torch.nn's own modules are leaves), so the "
            "BN's input is a `torch.conv2d` call on a `get_attr` weight, not a Conv module, and "
            "foldserve does not fold into that. The result is exact, but each BN costs a Mul "
            "and an Add at serving time. monai's EfficientNetBN pads with a separate module and "
            "folds fully."
        )
    return lines


def _onnx_path(passed: list[dict[str, Any]]) -> list[str]:
    onnx_path = [r for r in passed if r["fold_path"] == "onnx"]
    optimized = [r for r in onnx_path if "optimizer" in (r.get("fold_note") or "")]
    lines = [
        f"- **ONNX-level fold**: {len(onnx_path)} passing networks could not be traced "
        "faithfully by torch.fx and were folded in ONNX instead (ONNX file only, no "
        "TorchScript): " + (", ".join(f"`{r['name']}`" for r in onnx_path) or "none") + ".",
    ]
    if optimized:
        lines.append(
            f"- **Re-exported with torch's ONNX optimizer**: for {_list(optimized)} the "
            "unoptimized export did not run in onnxruntime (a Conv3d bias computed at run time "
            "with the wrong shape), so foldserve re-exported with the optimizer, which folds "
            "Conv+BN pairs itself: those BNs are gone before foldserve's fold and missing from "
            "its records (the BN column says how many were recorded)."
        )
    return lines


def _list(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"`{r['name']}`" for r in rows)


def _accuracy(passed: list[dict[str, Any]], options: dict[str, Any]) -> list[str]:
    worst = max(passed, key=lambda r: max(r["max_rel_diff"], r.get("own_max_rel_diff", 0.0)))
    bitwise_no = [f"`{r['name']}`" for r in passed if r["bitwise_batch_invariant"] is False]
    worst_batch = max(passed, key=lambda r: r["batch_invariance_max_diff"])
    bitwise = (
        f"not bitwise for {', '.join(bitwise_no)}; bitwise for the other "
        f"{len(passed) - len(bitwise_no)}."
        if bitwise_no
        else "every passing network is bitwise batch-invariant in onnxruntime."
    )
    return [
        f"- **Accuracy**: the largest relative difference is {_rel(worst)} (`{worst['name']}`), "
        "float32 rounding of the rewritten weights, well inside foldserve's 1e-4.",
        "- **Batch invariance**: the largest change of an output between alone and in a batch is "
        f"{worst_batch['batch_invariance_max_diff']:.1e} (`{worst_batch['name']}`). Bitwise (up "
        f"to {options['bitwise_rows'] or 'the row cap of'} rows): {bitwise}",
    ]


def _speed(passed: list[dict[str, Any]]) -> list[str]:
    timed = [r for r in passed if r.get("latency_ms")]
    if not timed:
        return []

    def ratio(batch_of: Any) -> float:
        times = [(r["latency_ms"], batch_of(r)) for r in timed]
        logs = [math.log(ms["unfolded"][batch] / ms["folded"][batch]) for ms, batch in times]
        return math.exp(sum(logs) / len(logs))

    kept = sum(r["unfolded_batchnorm_ops"] for r in timed)
    left = sum(r["unfolded_batchnorm_ops_unfused_by_ort"] for r in timed)
    unfused = [r for r in timed if r["unfolded_batchnorm_ops_unfused_by_ort"]]
    return [
        f"- **ORT's own fusion**: of the {kept} BatchNormalization ops in the unfolded files, "
        f"onnxruntime's session optimizer left {left} unfused, in {len(unfused)} networks: "
        f"{_unfused(unfused)}.",
        f"- **Latency, unfolded / folded** (geometric mean over {len(timed)} networks): "
        f"{ratio(lambda r: '1'):.2f}x at batch 1, "
        f"{ratio(lambda r: str(r['latency_batch'])):.2f}x at batch N. Where ORT fuses every BN "
        "itself the two files run the same kernels and the ratio is noise; the gain of folding "
        "comes from the BNs it cannot fuse. The machine is shared with other work, so single "
        "figures move by several percent between runs.",
    ]


def _time(passed: list[dict[str, Any]]) -> list[str]:
    export = sum(r["export_s"] for r in passed)
    fold = sum(r["steps_s"]["fold+export"] for r in passed)
    verify = sum(r["steps_s"].get("verify", 0.0) for r in passed)
    unfolded = sum(r.get("unfolded_export_s", 0.0) for r in passed)
    wall = sum(r["wall_s"] for r in passed)
    return [
        f"- **Where the time goes** (passing rows, {wall / 60:.0f} min in all): "
        f"`foldserve.export` {export / 60:.0f} min, of which fold+export (fx trace, fold, "
        f"dynamo ONNX export, TorchScript trace) {fold / 60:.0f} min and verification "
        f"{verify / 60:.0f} min; the zoo's unfolded export {unfolded / 60:.0f} min; the rest "
        "is building, statistics and latency runs.",
    ]


def _unfused(rows: list[dict[str, Any]]) -> str:
    return (
        ", ".join(
            f"`{r['name']}` ({r['unfolded_batchnorm_ops_unfused_by_ort']}"
            f"/{r['unfolded_batchnorm_ops']})"
            for r in rows
        )
        or "none"
    )


def _names(rows: list[dict[str, Any]], placement: str) -> str:
    return ", ".join(f"`{r['name']}` ({r['placements'][placement]})" for r in rows) or "none"


def _rel(row: dict[str, Any]) -> str:
    return f"{max(row['max_rel_diff'], row.get('own_max_rel_diff', 0.0)):.1e}"


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))
