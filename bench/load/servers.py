"""The servers under test: how to start each, and which cases and concurrencies it runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from load.cases import BIN, PY, STORE


@dataclass(frozen=True)
class Server:
    name: str
    label: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cases: tuple[str, ...] | None = None  # case keys; None: all
    concurrency: tuple[int, ...] | None = None  # None: all
    checks_outputs: bool = True  # the bare endpoint answers a constant
    samples_in_answer: bool = True  # the bare endpoint answers one sample whatever it is sent
    speaks_v2: bool = False  # serves the KServe V2 protocol (the v2bin case)
    processes: int = 1  # foldserve workers that must each be ready before the load starts

    @property
    def is_foldserve(self) -> bool:
        return self.name.startswith("foldserve")


def servers() -> list[Server]:
    foldserve = [str(BIN / "foldserve"), "serve", "--model-store", str(STORE)]
    quiet = {"FOLDSERVE_LOG_LEVEL": "warning"}
    module = [PY, "-m"]
    return [
        Server("foldserve", "foldserve, 1 process", foldserve, quiet, speaks_v2=True),
        Server(
            "foldserve-w2",
            "foldserve --workers 2",
            [*foldserve, "--workers", "2"],
            quiet,
            cases=("mlpx1", "mlpx64", "cnnx1"),
            processes=2,
        ),
        Server(
            "foldserve-delay0",
            "foldserve, max_delay_ms=0",
            foldserve,
            {**quiet, "FOLDSERVE_MAX_DELAY_MS": "0"},
            cases=("mlpx1",),
            concurrency=(1, 64),
        ),
        Server(
            "bare",
            "bare FastAPI, no parse (web-stack limit)",
            [*module, "servers.bare"],
            cases=("mlpx1", "mlpx64"),
            checks_outputs=False,
            samples_in_answer=False,
        ),
        Server(
            "raw-asgi",
            "raw ASGI + orjson + onnxruntime inline, no batching",
            [*module, "servers.raw_asgi"],
            cases=("mlpx1", "mlpx64"),
        ),
        Server(
            "torch-eager",
            "naive FastAPI + pydantic + torch eager",
            [*module, "servers.torch_eager"],
        ),
        Server(
            "litserve",
            "LitServe + onnxruntime, batching 64 / 2 ms",
            [*module, "servers.litserve_onnx"],
        ),
    ]


def by_name() -> dict[str, Server]:
    return {s.name: s for s in servers()}
