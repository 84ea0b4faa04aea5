"""The `grpc_python` protoc plugin shim in python/tools/, run as buf runs it."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2

from junjo_backend._wire.ingestion import auth_pb2, ingestion_pb2

if TYPE_CHECKING:
    from pathlib import Path


def _run_plugin(
    repo_root: Path, request: plugin_pb2.CodeGeneratorRequest
) -> plugin_pb2.CodeGeneratorResponse:
    result = subprocess.run(
        [sys.executable, str(repo_root / "python" / "tools" / "protoc_gen_grpc_python.py")],
        input=request.SerializeToString(),
        capture_output=True,
        check=True,
        timeout=60,
    )
    return plugin_pb2.CodeGeneratorResponse.FromString(result.stdout)


@pytest.fixture(scope="module")
def proto_files(
    repo_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[descriptor_pb2.FileDescriptorProto]:
    """Our proto/ tree as buf hands it to plugins, comments (source info) included."""
    image = tmp_path_factory.mktemp("buf") / "image.binpb"
    buf = repo_root / "python" / ".venv" / "bin" / "buf"
    subprocess.run([str(buf), "build", "-o", str(image)], cwd=repo_root, check=True, timeout=120)
    return list(descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes()).file)


def _request(
    files: list[descriptor_pb2.FileDescriptorProto], *names: str
) -> plugin_pb2.CodeGeneratorRequest:
    return plugin_pb2.CodeGeneratorRequest(file_to_generate=list(names), proto_file=files)


def test_the_shim_generates_what_make_gen_generated(
    repo_root: Path, proto_files: list[descriptor_pb2.FileDescriptorProto]
) -> None:
    request = _request(proto_files, auth_pb2.DESCRIPTOR.name, ingestion_pb2.DESCRIPTOR.name)
    response = _run_plugin(repo_root, request)
    assert not response.error
    assert response.supported_features & plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    generated = {f.name: f.content for f in response.file}
    assert sorted(generated) == [
        "junjo_backend/_wire/ingestion/auth_pb2_grpc.py",
        "junjo_backend/_wire/ingestion/ingestion_pb2_grpc.py",
    ]
    for name, content in generated.items():
        assert content == (repo_root / "python" / "src" / name).read_text()
    assert (
        "class InternalIngestionServiceStub"
        in generated["junjo_backend/_wire/ingestion/ingestion_pb2_grpc.py"]
    )
    assert (
        "/ingestion.InternalAuthService/ValidateApiKey"
        in generated["junjo_backend/_wire/ingestion/auth_pb2_grpc.py"]
    )


def test_the_shim_reports_protoc_failure_as_a_plugin_error(
    repo_root: Path, proto_files: list[descriptor_pb2.FileDescriptorProto]
) -> None:
    response = _run_plugin(repo_root, _request(proto_files, "no/such/file.proto"))
    assert response.error
    assert not response.file
