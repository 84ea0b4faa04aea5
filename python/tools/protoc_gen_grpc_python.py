#!/usr/bin/env python3
"""protoc plugin `grpc_python`, built on grpcio-tools.

PyPI ships no `protoc-gen-grpc_python` executable; the generator only exists inside
grpcio-tools' bundled protoc. This plugin receives buf's CodeGeneratorRequest, hands the
already-parsed files to that protoc as a descriptor set, and returns what it wrote.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc


def generate(request: plugin_pb2.CodeGeneratorRequest) -> plugin_pb2.CodeGeneratorResponse:
    """Run grpcio-tools' gRPC Python generator over the request's files."""
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    with tempfile.TemporaryDirectory(prefix="protoc-gen-grpc_python-") as tmp:
        work = Path(tmp)
        descriptors = work / "request.binpb"
        out = work / "out"
        out.mkdir()
        descriptors.write_bytes(
            descriptor_pb2.FileDescriptorSet(file=request.proto_file).SerializeToString()
        )
        option = f"{request.parameter}:" if request.parameter else ""
        argv = [
            "grpc_tools.protoc",
            f"--descriptor_set_in={descriptors}",
            f"--grpc_python_out={option}{out}",
            *request.file_to_generate,
        ]
        if protoc.main(argv) != 0:
            response.error = "grpcio-tools' protoc failed; see its output above"
            return response
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            response.file.add(name=path.relative_to(out).as_posix(), content=path.read_text())
    return response


def main() -> None:
    """Read a CodeGeneratorRequest on stdin, write the response on stdout."""
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    # grpcio-tools' protoc writes its diagnostics to stdout; keep stdout for the response.
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        response = generate(request)
    finally:
        sys.stdout = real_stdout
    sys.stdout.buffer.write(response.SerializeToString())


if __name__ == "__main__":
    main()
