"""The CPU image's recipe performed without a Docker engine, then run the way the image runs.

The Dockerfile is parsed, so a changed recipe changes what happens here: its build stage's
WORKDIR, COPY and RUN steps build a virtual environment; its final stage's COPY, ENV, USER,
WORKDIR, HEALTHCHECK, STOPSIGNAL and exec-form ENTRYPOINT say how the server starts. An
instruction this test cannot reproduce fails it. Image paths map into folders of this machine:

    /opt/foldserve  ->  <cache>/opt/foldserve  (the venv the RUN step makes, plus healthcheck.py)
    /src            ->  <cache>/src            (the build context's copied files)
    /srv            ->  <run>/srv              (WORKDIR and the baked model store, read-only)
    python          ->  this machine's python3.X of the base image's X, one any user can run

and the container's isolation becomes: the image's numeric user (setpriv: its uid and gid, no
supplementary groups, no new privileges), PID 1 of a new PID namespace (SIGTERM reaches the server
itself, and a signal it has no handler for does nothing, as in a container), and a new mount
namespace whose root filesystem is read-only, with /tmp a fresh tmpfs, read-only too unless a test
mounts it writable (``docker run --read-only [--tmpfs /tmp]``). The build runs with this machine's
pip configuration (its package index) where the image's build would use PyPI's. The port is
published as ``docker run -p`` would: FOLDSERVE_HOST and FOLDSERVE_PORT point at a free loopback
port (the image's 0.0.0.0:8000 would listen on every interface of this machine).

The built venv is cached under /var/tmp (outside /tmp, which the namespace replaces; readable by
the image's user) and keyed on the recipe and every file it copies; a fresh machine builds it in
about 30 s.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import grpc
import httpx
import numpy as np
import pytest

from service.rpc import health_pb2
from tests.deploy.conftest import DOCKERFILE, ROOT
from tests.deploy.dockerfile import (
    DockerIgnore,
    Instruction,
    Stage,
    copy_args,
    env_pairs,
    exec_form,
    expand,
    parse,
)

CACHE = Path("/var/tmp/foldserve-recipe")
KEEP_BUILDS = 2  # each build is a ~220 MB venv; older ones are removed
# The official python image's PATH, before the recipe's ENV prepends the venv.
BASE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
READY_TIMEOUT_S = 60.0

# Run inside the new namespaces as root, then become the image's user: $1 "rw" or "ro" for /tmp,
# $2 the working directory, $3 uid, $4 gid, then the entrypoint.
_CONTAINER = r"""
set -e
mount -t tmpfs -o "$1,mode=1777,size=64m,nosuid,nodev" tmpfs /tmp
mount -o remount,bind,ro /
cd "$2"
uid=$3 gid=$4
shift 4
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups --no-new-privs -- "$@"
"""


# ---------------------------------------------------------------- what this machine must offer


def _skip_unless_namespaces() -> None:
    if os.geteuid() != 0:
        pytest.skip(
            "the recipe test runs the server as the image's user in its own PID and mount "
            "namespaces, which needs root (CI runs as root)"
        )
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) is not installed")
    probe = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot make PID and mount namespaces here: {probe.stderr.strip()}")


def _usable_by_anyone(path: Path) -> bool:
    """The image's user (not root) can run it: every folder above it is searchable by all."""
    real = path.resolve()
    folders_ok = all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    return folders_ok and bool(real.stat().st_mode & stat.S_IXOTH)


def _interpreter(base_image: str) -> Path:
    """This machine's Python of the base image's minor version, runnable by any user."""
    match = re.match(r"python:(\d+\.\d+)", base_image)
    assert match, f"FROM {base_image}: the recipe test knows the official python images only"
    minor = match.group(1)
    candidates = [shutil.which(f"python{minor}"), f"/usr/bin/python{minor}", sys.executable]
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if not path.is_file() or not _usable_by_anyone(path):
            continue
        version = subprocess.run(
            [str(path), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if version == minor:
            return path
    pytest.skip(f"no python{minor} that a non-root user can run (the image's is {base_image})")


# ---------------------------------------------------------------- the recipe, performed


@dataclass
class Image:
    """What the final stage says about running the image, with paths mapped to this machine."""

    env: dict[str, str]
    uid: int
    gid: int
    workdir: Path
    entrypoint: list[str]
    healthcheck: list[str]
    stop_signal: signal.Signals
    port: int
    grpc_port: int
    venv: Path
    store: Path


@dataclass
class PathMap:
    """Image paths to folders here, longest prefix first."""

    folders: dict[str, Path] = field(default_factory=dict)

    def path(self, image_path: str, cwd: Path | None = None) -> Path:
        if not image_path.startswith("/"):
            assert cwd is not None, f"relative path {image_path!r} before any WORKDIR"
            return cwd / image_path
        for prefix in sorted(self.folders, key=len, reverse=True):
            if image_path == prefix or image_path.startswith(prefix + "/"):
                return self.folders[prefix] / image_path[len(prefix) :].lstrip("/")
        raise AssertionError(
            f"{image_path}: the recipe uses a path the recipe test does not map; add its top "
            f"folder to the PathMap in {Path(__file__).name}"
        )

    def text(self, text: str) -> str:
        """Every mapped image path inside a command line or an ENV value, replaced."""
        pattern = "|".join(re.escape(p) for p in sorted(self.folders, key=len, reverse=True))
        return re.sub(
            rf"(?<![\w/.-])({pattern})(?=[/\s:\"']|$)",
            lambda m: str(self.folders[m.group(1)]),
            text,
        )


def _copy(instruction: Instruction, paths: PathMap, cwd: Path | None, ignore: DockerIgnore) -> None:
    copy = copy_args(instruction)
    assert set(copy.flags) <= {"from"}, f"{instruction}: flags the recipe test does not reproduce"
    dest = paths.path(copy.dest, cwd)
    into_folder = copy.dest.endswith("/") or len(copy.sources) > 1
    for source in copy.sources:
        origin = ROOT / source
        assert not ignore.ignored(PurePosixPath(source)), f"{instruction}: {source} is ignored"
        if origin.is_dir():  # Docker copies a folder's contents into the destination
            for path in sorted(origin.rglob("*")):
                relative = PurePosixPath(source) / path.relative_to(origin).as_posix()
                if path.is_file() and not any(
                    ignore.ignored(PurePosixPath(*relative.parts[:n]))
                    for n in range(1, len(relative.parts) + 1)
                ):
                    target = dest / path.relative_to(origin)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
        else:
            target = dest / origin.name if into_folder else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)


def _build_key(stages: list[Stage], interpreter: Path, ignore: DockerIgnore) -> str:
    """The recipe, the interpreter and every file the build stage copies."""
    digest = hashlib.sha256(DOCKERFILE.read_bytes())
    digest.update(f"{interpreter.resolve()}\0".encode())
    build = stages[0]
    for instruction in build.all("COPY"):
        for source in copy_args(instruction).sources:
            origin = ROOT / source
            files = sorted(origin.rglob("*")) if origin.is_dir() else [origin]
            for path in files:
                relative = PurePosixPath(path.relative_to(ROOT).as_posix())
                if path.is_file() and not any(
                    ignore.ignored(PurePosixPath(*relative.parts[:n]))
                    for n in range(1, len(relative.parts) + 1)
                ):
                    digest.update(f"{relative}\0".encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _trusted_cache() -> bool:
    """Our cache folder, not one another user of /var/tmp could have planted."""
    info = CACHE.stat()
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _perform_build(build: Stage, paths: PathMap, interpreter: Path, folder: Path) -> None:
    """The build stage's steps, as stated, in ``folder``."""
    ignore = DockerIgnore(ROOT / ".dockerignore")
    shim = folder / "shim"
    shim.mkdir(parents=True)
    # The image's `python` is its base's interpreter: a script, not a symlink, so that a venv
    # made with it points at the real interpreter.
    (shim / "python").write_text(f'#!/bin/sh\nexec {interpreter} "$@"\n')
    (shim / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ.get('PATH', BASE_PATH)}"}
    cwd: Path | None = None
    for instruction in build.instructions:
        if instruction.keyword == "WORKDIR":
            cwd = paths.path(instruction.args, cwd)
            cwd.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            _copy(instruction, paths, cwd, ignore)
        elif instruction.keyword == "ENV":
            env.update((k, paths.text(expand(v, env))) for k, v in env_pairs(instruction))
        elif instruction.keyword == "RUN":
            command = paths.text(instruction.args)
            done = subprocess.run(
                ["/bin/sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True
            )
            assert done.returncode == 0, (
                f"{instruction} failed ({done.returncode}) as\n{command}\n"
                f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        else:
            raise AssertionError(f"{instruction}: the recipe test cannot reproduce this step")


def _build(stages: list[Stage], interpreter: Path) -> Path:
    """The build stage's result, cached; returns the folder that /opt/foldserve and /src map to."""
    CACHE.mkdir(mode=0o755, exist_ok=True)
    if not _trusted_cache():
        pytest.fail(f"{CACHE} is not owned by this user or is writable by others: remove it")
    key = _build_key(stages, interpreter, DockerIgnore(ROOT / ".dockerignore"))
    folder = CACHE / key
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run building the same key waits
        done = folder / ".built"
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(mode=0o755)
            paths = PathMap({"/opt/foldserve": folder / "opt/foldserve", "/src": folder / "src"})
            _perform_build(stages[0], paths, interpreter, folder)
            done.write_text(key)
        os.utime(done)
        builds = sorted(CACHE.glob("*/.built"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in builds[KEEP_BUILDS:]:
            shutil.rmtree(old.parent, ignore_errors=True)
    return folder


def _read_only_copy(instruction: Instruction, paths: PathMap, cwd: Path | None) -> None:
    _copy(instruction, paths, cwd, DockerIgnore(ROOT / ".dockerignore"))
    dest = paths.path(copy_args(instruction).dest, cwd)
    # COPY without --chown leaves root the owner; the image's user may read, never write.
    for path in [dest, *dest.rglob("*")] if dest.is_dir() else [dest]:
        path.chmod(0o555 if path.is_dir() else 0o444)


def _final_stage(final: Stage, paths: PathMap, build_paths: PathMap) -> Image:
    env = {"PATH": BASE_PATH, "HOME": "/"}  # Docker's HOME for a user without a passwd entry
    cwd: Path | None = None
    uid = gid = port = grpc_port = -1
    entrypoint: list[str] = []
    healthcheck: list[str] = []
    stop = signal.SIGTERM
    for instruction in final.instructions:
        key = instruction.keyword
        if key == "COPY" and "from" in copy_args(instruction).flags:
            copy = copy_args(instruction)
            assert copy.flags["from"] == "build", str(instruction)
            for source in copy.sources:
                # A venv cannot move: the build's output must land where it was built.
                assert build_paths.path(source) == paths.path(copy.dest), str(instruction)
        elif key == "COPY":
            _read_only_copy(instruction, paths, cwd)
        elif key == "ENV":
            env.update((k, expand(v, env)) for k, v in env_pairs(instruction))
        elif key == "USER":
            user, _, group = instruction.args.partition(":")
            uid, gid = int(user), int(group or user)
        elif key == "WORKDIR":
            cwd = paths.path(instruction.args, cwd)
        elif key == "EXPOSE":
            port, grpc_port = (int(p.split("/")[0]) for p in instruction.args.split())
        elif key == "HEALTHCHECK":
            healthcheck = exec_form(instruction, instruction.args.partition("CMD ")[2])
        elif key == "STOPSIGNAL":
            stop = signal.Signals[instruction.args]
        elif key == "ENTRYPOINT":
            entrypoint = exec_form(instruction)
        else:
            raise AssertionError(f"{instruction}: the recipe test cannot reproduce this step")
    assert uid > 0 and gid > 0 and cwd is not None and entrypoint and healthcheck
    mapped = {k: paths.text(v) for k, v in env.items()}
    return Image(
        env=mapped,
        uid=uid,
        gid=gid,
        workdir=cwd,
        entrypoint=entrypoint,
        healthcheck=[paths.text(arg) for arg in healthcheck],
        stop_signal=stop,
        port=port,
        grpc_port=grpc_port,
        venv=paths.path("/opt/foldserve"),
        store=Path(mapped["FOLDSERVE_MODEL_STORE"]),
    )


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    _skip_unless_namespaces()
    stages = parse(DOCKERFILE)
    assert [s.name for s in stages] == ["build", None], "a build stage, then the image"
    assert stages[0].base == stages[1].base, "the venv runs on the interpreter it was built with"
    interpreter = _interpreter(stages[0].base)
    folder = _build(stages, interpreter)
    run = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    run.chmod(0o755)  # mkdtemp's 0700 would keep the image's user out
    try:
        build_paths = PathMap({"/opt/foldserve": folder / "opt/foldserve", "/src": folder / "src"})
        paths = PathMap({**build_paths.folders, "/srv": run / "srv"})
        yield _final_stage(stages[1], paths, build_paths)
    finally:
        shutil.rmtree(run, ignore_errors=True)


# ---------------------------------------------------------------- the image, running


@dataclass
class Container:
    process: subprocess.Popen[bytes]
    pid: int  # the server's pid here; inside its namespace it is 1
    base: str
    log: Path
    grpc_port: int

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n{self.output()}") from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _namespace_init(launcher: int, timeout: float = 10.0) -> int:
    """The pid (as seen here) of the process unshare forked: PID 1 of the new namespace."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = children.read_text().split() if children.exists() else []
        if found:
            return int(found[0])
        time.sleep(0.01)
    raise AssertionError("unshare started no process")


@contextlib.contextmanager
def running(
    image: Image, tmp_path: Path, *, writable_tmp: bool, env: dict[str, str] | None = None
) -> Iterator[Container]:
    """``docker run --read-only [--tmpfs /tmp] -p PORT:8000 [-e ...] image``, here."""
    port, grpc_port = _free_port(), _free_port()
    environ = {
        **image.env,
        **(env or {}),
        "FOLDSERVE_HOST": "127.0.0.1",
        "FOLDSERVE_PORT": str(port),
        "FOLDSERVE_GRPC_PORT": str(grpc_port),
    }
    environ.pop("FOLDSERVE_GRPC", None)  # the image's own choice (on): not the test suite's
    log = tmp_path / f"container-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *("unshare", "--mount", "--pid", "--fork", "--kill-child"),
                *("--propagation", "private", "--", "/bin/sh", "-c", _CONTAINER, "sh"),
                "rw" if writable_tmp else "ro",
                str(image.workdir),
                str(image.uid),
                str(image.gid),
                *image.entrypoint,
            ],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        yield Container(process, _namespace_init(process.pid), base, log, grpc_port)
    finally:
        if process.poll() is None:
            process.kill()  # unshare --kill-child takes the server with it
            process.wait(10)


def wait_ready(container: Container) -> float:
    """Seconds until /readyz answered 200."""
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S:
        assert container.process.poll() is None, f"exited early:\n{container.output()}"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{container.base}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"not ready after {READY_TIMEOUT_S} s:\n{container.output()}")


def healthcheck(image: Image, port: int) -> int:
    """The image's HEALTHCHECK command, as its user, with its environment."""
    env = {**image.env, "FOLDSERVE_PORT": str(port)}
    done = subprocess.run(
        image.healthcheck, env=env, user=image.uid, group=image.gid, extra_groups=[], timeout=10
    )
    return done.returncode


def _ids(pid: int, field_name: str) -> list[str]:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith(f"{field_name}:"))
    return line.split()[1:]


def _golden(store: Path, model: str) -> tuple[list[list[float]], np.ndarray]:
    version = max(int(p.name) for p in (store / model).iterdir() if p.name.isdigit())
    manifest = json.loads((store / model / str(version) / "manifest.json").read_text())
    golden = manifest["golden"]
    return golden["inputs"], np.asarray(golden["outputs"], dtype=np.float32)


# ---------------------------------------------------------------- the checks


def test_the_lock_pins_every_distribution_the_recipe_installed(image: Image) -> None:
    frozen = subprocess.run(
        [str(image.venv / "bin/python"), "-m", "pip", "freeze", "--exclude", "foldserve"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    lock = (ROOT / "docker/requirements.lock").read_text().split("\n")
    pinned = [line for line in lock if line and not line.startswith("#")]

    def normal(pins: list[str]) -> set[str]:
        return {re.sub(r"[-_.]+", "-", pin.lower()) for pin in pins}

    assert normal(frozen) == normal(pinned), "run docker/update-lock"


def test_serves_read_only_as_its_user_and_drains_a_request_in_flight(
    image: Image, tmp_path: Path
) -> None:
    model = "digits-mlp"  # the Settings default the image keeps
    inputs, expected = _golden(image.store, model)
    body = json.dumps({"inputs": inputs}).encode()
    with running(image, tmp_path, writable_tmp=False) as container:
        ready_s = wait_ready(container)
        port = int(container.base.rsplit(":", 1)[1])
        alive = httpx.get(f"{container.base}/healthz").json()
        assert alive["pid"] == 1, "exec-form entrypoint: the server itself is PID 1"
        assert _ids(container.pid, "Uid") == [str(image.uid)] * 4
        assert _ids(container.pid, "Gid") == [str(image.gid)] * 4
        assert _ids(container.pid, "Groups") == []
        # /readyz waits for the default model only; the others finish loading meanwhile.
        deadline = time.monotonic() + 30
        while True:
            models = httpx.get(f"{container.base}/models").json()["models"]
            statuses = [v["status"] for m in models for v in m["versions"]]
            if "loading" not in statuses or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        shipped = sorted(p.name for p in image.store.iterdir())
        assert sorted(m["name"] for m in models) == shipped
        assert all(v["status"] == "ready" for m in models for v in m["versions"]), models
        answer = httpx.post(f"{container.base}/predict", content=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == model
        np.testing.assert_allclose(answer.json()["outputs"], expected, atol=1e-4)
        assert healthcheck(image, port) == 0
        # The gRPC service, on its published port, called with grpcio (the image has none).
        with grpc.insecure_channel(f"127.0.0.1:{container.grpc_port}") as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            status = check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        # The status page and its modules come with the installed package (package data).
        page = httpx.get(f"{container.base}/")
        assert page.status_code == 200 and 'src="ui/status.js"' in page.text
        script = httpx.get(f"{container.base}/ui/status.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith(
            "text/javascript"
        )

        # A request in flight: its headers and half its body are in when SIGTERM arrives.
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        half = len(body) // 2
        client.sendall(
            b"POST /predict HTTP/1.1\r\nHost: foldserve\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:half]
        )
        time.sleep(0.5)  # the server has read the headers: the request is in flight
        os.kill(container.pid, image.stop_signal)
        time.sleep(0.5)
        assert container.process.poll() is None, (
            f"did not wait for the request:\n{container.output()}"
        )
        with pytest.raises(OSError):  # no new connections while draining
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        client.sendall(body[half:])
        response = http.client.HTTPResponse(client)
        response.begin()
        drained = json.loads(response.read())
        client.close()
        assert response.status == 200, drained
        np.testing.assert_allclose(drained["outputs"], expected, atol=1e-4)
        code = container.wait(30)
        assert code == 0, f"exit code {code} after the drain:\n{container.output()}"
        assert "Traceback" not in container.output(), container.output()
    assert healthcheck(image, port) == 1  # nothing listens any more
    # For the Kubernetes startup probe's budget (deploy/kubernetes/base/deployment.yaml).
    print(f"ready {ready_s:.2f} s after start")


def test_workers_need_a_writable_tmp_and_nothing_else(image: Image, tmp_path: Path) -> None:
    workers = {"FOLDSERVE_WORKERS": "2"}
    with running(image, tmp_path, writable_tmp=False, env=workers) as container:
        code = container.wait(30)
        assert code != 0, "--workers cannot pool its metrics without a writable /tmp"
        assert "/tmp" in container.output(), container.output()
    with running(image, tmp_path, writable_tmp=True, env=workers) as container:
        wait_ready(container)
        # The pooled gauge is 1 once every worker serves the model (the one that answered
        # /readyz may have been first): the pooled metrics live in the tmpfs.
        loaded = 'foldserve_model_loaded{model="digits-mlp",version="1"} 1.0'
        deadline = time.monotonic() + READY_TIMEOUT_S
        while loaded not in (metrics := httpx.get(f"{container.base}/metrics").text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.1)
        os.kill(container.pid, image.stop_signal)
        code = container.wait(60)
        assert code == 0, f"exit code {code} after the drain:\n{container.output()}"
