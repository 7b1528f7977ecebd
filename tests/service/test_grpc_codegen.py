"""The gRPC messages checked in under service/rpc/ are what scripts/grpc-codegen makes of the
.proto files beside them: a .proto edited without regenerating fails here."""

from __future__ import annotations

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
RPC = ROOT / "service" / "rpc"


def test_the_checked_in_messages_are_the_protos_output(tmp_path: Path) -> None:
    protos = sorted((RPC / "proto").glob("*.proto"))
    assert {p.stem for p in protos} == {"inference", "health"}
    args = ["protoc", f"--proto_path={RPC / 'proto'}", f"--python_out={tmp_path}"]
    args += [f"--pyi_out={tmp_path}", *map(str, protos)]
    assert protoc.main(args) == 0
    for made in sorted(tmp_path.iterdir()):
        checked_in = RPC / made.name
        assert checked_in.read_bytes() == made.read_bytes(), (
            f"run scripts/grpc-codegen: {made.name}"
        )
    assert len(list(tmp_path.iterdir())) == 4
