"""The docs' shell commands run as written, so that none of them can rot.

Each test reads the commands from the doc's own shell blocks and runs them, changing only what
a test must: the virtual environment's path (this one's), the port (a free one on loopback) and
a scratch folder for the files the doc assumes the reader has (their module, checkpoint, data).
Commands that need what CI lacks (a container engine, a cluster, a GPU) are checked elsewhere:
the Dockerfiles by `tests/deploy/test_dockerfiles.py`, the manifests by
`tests/deploy/test_kubernetes.py` and `test_kserve.py`, `scripts/gpu-check --plan` by
`tests/deploy/test_gpu_check.py`.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.app import create_app
from service.settings import Settings
from service.store import list_versions
from tests.service.conftest import serve

ROOT = Path(__file__).resolve().parents[1]
FOLDSERVE = str(Path(sys.executable).parent / "foldserve")


def shell_blocks(doc: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S)


def commands(block: str) -> list[str]:
    """The block's command lines, continuations joined and comments dropped."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        command = line.split(" #")[0].strip()
        if command and not command.startswith("#"):
            found.append(command)
    return found


def block_with(doc: Path, needle: str) -> list[str]:
    matching = [b for b in shell_blocks(doc) if needle in b]
    assert len(matching) == 1, f"{doc.name}: expected one shell block with {needle!r}"
    return commands(matching[0])


def run(command: str, cwd: Path, **replace: str) -> subprocess.CompletedProcess[str]:
    command = command.replace(".venv/bin/foldserve", FOLDSERVE)
    for old, new in replace.items():
        command = command.replace(old, new)
    done = subprocess.run(
        shlex.split(command), cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


def test_the_command_reader_joins_continuations_and_drops_comments() -> None:
    block = "# a comment\nfoldserve a --b \\\n    --c d   # says why\n\nscripts/x\n"
    assert commands(block) == ["foldserve a --b      --c d", "scripts/x"]


# The files `docs/models.md` assumes: the reader's module (`mynets.py` with `build`, five classes
# by default as its checkpoint has), that checkpoint, labels, training data, and an ONNX file.
USER_MODULE = textwrap.dedent(
    """
    from torch import nn

    def build(classes: int = 5) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, classes),
        )
    """
)


def readers_files(folder: Path) -> None:
    import numpy as np
    import torch

    (folder / "mynets.py").write_text(USER_MODULE)
    sys.path.insert(0, str(folder))
    try:
        import mynets

        model = mynets.build()
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("mynets", None)
    model.train()
    with torch.no_grad():  # running statistics that are not the initial ones
        for seed in range(3):
            model(torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(seed)))
    torch.save(model.state_dict(), folder / "net.pt")
    (folder / "labels.txt").write_text("".join(f"class-{i}\n" for i in range(5)))
    rng = np.random.default_rng(0)
    np.save(folder / "train.npy", rng.normal(size=(64, 3, 64, 64)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, as others use
        torch.onnx.export(
            model.eval(),
            (torch.randn(2, 3, 64, 64),),
            folder / "their-net.onnx",
            dynamo=False,
            do_constant_folding=False,  # its BatchNormalization kept, for foldserve to fold
            opset_version=17,
            input_names=["image"],
            output_names=["scores"],
            dynamic_axes={"image": {0: "n"}, "scores": {0: "n"}},
        )


@pytest.mark.parametrize("doc", ["README.md", "docs/models.md"])
def test_the_bring_your_own_model_commands_run_as_shown(tmp_path: Path, doc: str) -> None:
    shown = block_with(ROOT / doc, "foldserve import")
    assert len(shown) == 3, shown  # export, export with population statistics, import
    readers_files(tmp_path)
    for command in shown:
        run(command, tmp_path)
    store = tmp_path / "model_store"
    assert list_versions(store, "my-net") == [1, 2]
    assert list_versions(store, "their-net") == [1]
    running, population = (manifest(store / "my-net" / v) for v in ("1", "2"))
    assert running["labels"] == [f"class-{i}" for i in range(5)]
    # The second command recomputed the statistics over train.npy: they moved from the
    # checkpoint's running ones, and the manifest says how far.
    assert running["batch_norm"][0]["stats_shift"] is None
    assert population["batch_norm"][0]["stats_shift"]["max_abs_log_var_ratio"] > 0
    assert population["batch_norm"][0]["stats_sha256"] != running["batch_norm"][0]["stats_sha256"]


def manifest(version: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads((version / "manifest.json").read_bytes())
    return loaded


def test_the_training_commands_run_as_shown(tmp_path: Path) -> None:
    shown = block_with(ROOT / "docs" / "models.md", "foldserve train")
    assert len(shown) == 3, shown
    elsewhere = tmp_path / "elsewhere"
    for command in shown:
        run(command, tmp_path, **{"/tmp/store": str(elsewhere)})
    assert list_versions(tmp_path / "model_store", "digits-mlp") == [1]
    assert list_versions(tmp_path / "model_store", "digits-cnn") == [1]
    assert list_versions(elsewhere, "cancer-mlp") == [1]


def test_the_management_commands_run_as_shown(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    shown = block_with(ROOT / "docs" / "operations.md", "repository/index")
    start, *calls = shown
    # The first line starts the server with two settings: the same settings, on a free port.
    variables = dict(re.findall(r"FOLDSERVE_([A-Z_]+)=(\S+)", start))
    assert start.endswith("scripts/serve") and set(variables) == {
        "MANAGEMENT_API",
        "MANAGEMENT_API_KEY",
    }
    settings = Settings(
        model_store=ROOT / "model_store",
        management_api=variables["MANAGEMENT_API"] == "true",
        management_api_key=variables["MANAGEMENT_API_KEY"],
    )
    with serve(create_app(settings)) as url:
        host = url.removeprefix("http://")
        answers = []
        for command in calls:
            assert command.startswith("curl -s ")
            status_last = command.replace("curl -s ", "curl -s -w %{http_code} ", 1)
            done = run(status_last, tmp_path, **{"localhost:8000": host})
            answers.append((done.stdout[:-3], int(done.stdout[-3:])))
        index, load, unload = answers
        assert index[1] == 200
        assert "digits-mlp" in {entry["name"] for entry in orjson.loads(index[0])}
        assert load[1] == 200 and unload[1] == 200
        # Without the key the same calls are refused.
        bare = calls[0].replace("-H 'Authorization: Bearer change-me'", "")
        status_only = bare.replace("curl -s ", "curl -s -o /dev/null -w %{http_code} ", 1)
        refused = run(status_only, tmp_path, **{"localhost:8000": host})
        assert refused.stdout == "401"


def test_the_benchmarks_parts_are_the_ones_it_has() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from load.main import PARTS
    finally:
        sys.path.remove(str(ROOT / "bench"))
    shown = block_with(ROOT / "docs" / "operations.md", "bench/run --only")
    only = next(c for c in shown if "--only" in c)
    text = (ROOT / "docs" / "operations.md").read_text()
    listed = re.search(r"bench/run --only \w+ +# one part: ([a-z0-9 ]+)", text)
    assert listed is not None and only.split()[2] in PARTS
    assert tuple(listed.group(1).split()) == PARTS


def test_the_training_report_command_names_a_module_with_a_main() -> None:
    shown = block_with(ROOT / "docs" / "training-report.md", "foldserve.demos.report")
    module = shown[0].split("-m ")[1].split()[0]
    path = ROOT / Path(*module.split(".")).with_suffix(".py")
    assert "__main__" in path.read_text()
