"""The generated Python modules describe exactly the Go services' wire contract.

The Go baseline (go-compat-tests/go-contract) is compiled here with grpcio-tools' protoc
and compared, element by element, with the FileDescriptorProtos embedded in our generated
modules. File paths differ on purpose and are not compared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_tools import protoc

from junjo_backend._wire.ingestion import auth_pb2, ingestion_pb2
from junjo_backend._wire.span_data_container import span_data_container_pb2

if TYPE_CHECKING:
    from pathlib import Path

    from google.protobuf.descriptor import FileDescriptor

OURS: list[FileDescriptor] = [
    auth_pb2.DESCRIPTOR,
    ingestion_pb2.DESCRIPTOR,
    span_data_container_pb2.DESCRIPTOR,
]

# One comparable row per wire-visible fact.
Fact = tuple[str, ...]


def _facts(
    files: list[descriptor_pb2.FileDescriptorProto], pool: descriptor_pool.DescriptorPool
) -> set[Fact]:
    facts: set[Fact] = set()
    for file in files:
        facts.add(("syntax", file.package, file.syntax))
        for message in file.message_type:
            full = f"{file.package}.{message.name}"
            facts.add(("message", full))
            assert not message.nested_type, "the contract has no nested messages"
            assert not message.oneof_decl, "the contract has no oneofs"
            runtime = pool.FindMessageTypeByName(full)
            for field in message.field:
                facts.add(
                    (
                        "field",
                        full,
                        field.name,
                        str(field.number),
                        descriptor_pb2.FieldDescriptorProto.Type.Name(field.type),
                        descriptor_pb2.FieldDescriptorProto.Label.Name(field.label),
                        field.type_name,
                        # json_name may be absent from a serialized descriptor; the pool
                        # computes it the way every runtime does.
                        runtime.fields_by_name[field.name].json_name,
                        str(field.proto3_optional),
                    )
                )
        for service in file.service:
            full = f"{file.package}.{service.name}"
            facts.add(("service", full))
            for method in service.method:
                facts.add(
                    (
                        "method",
                        f"/{full}/{method.name}",
                        method.input_type,
                        method.output_type,
                        f"client_streaming={method.client_streaming}",
                        f"server_streaming={method.server_streaming}",
                    )
                )
    return facts


def _pool_of(files: list[descriptor_pb2.FileDescriptorProto]) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for file in files:
        pool.Add(file)
    return pool


@pytest.fixture(scope="module")
def go_baseline(
    repo_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[descriptor_pb2.FileDescriptorProto]:
    contract = repo_root / "go-compat-tests" / "go-contract"
    out = tmp_path_factory.mktemp("go-contract") / "set.binpb"
    names = sorted(p.name for p in contract.glob("*.proto"))
    assert names == ["auth.proto", "ingestion.proto", "span_data_container.proto"]
    status = protoc.main(["protoc", f"-I{contract}", f"--descriptor_set_out={out}", *names])
    assert status == 0
    return list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)


@pytest.fixture(scope="module")
def ours() -> list[descriptor_pb2.FileDescriptorProto]:
    return [descriptor_pb2.FileDescriptorProto.FromString(d.serialized_pb) for d in OURS]


def test_generated_modules_match_the_go_contract_fact_for_fact(
    go_baseline: list[descriptor_pb2.FileDescriptorProto],
    ours: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    go_facts = _facts(go_baseline, _pool_of(go_baseline))
    our_facts = _facts(ours, _pool_of(ours))
    assert our_facts - go_facts == set(), "facts we have that Go does not"
    assert go_facts - our_facts == set(), "facts Go has that we lack"


def test_the_comparison_sees_the_facts_that_matter(
    go_baseline: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    facts = _facts(go_baseline, _pool_of(go_baseline))
    assert (
        "method",
        "/ingestion.InternalIngestionService/ReadSpans",
        ".ingestion.ReadSpansRequest",
        ".ingestion.ReadSpansResponse",
        "client_streaming=False",
        "server_streaming=True",
    ) in facts
    assert (
        "field",
        "ingestion.ReadSpansRequest",
        "batch_size",
        "2",
        "TYPE_UINT32",
        "LABEL_OPTIONAL",
        "",
        "batchSize",
        "False",
    ) in facts
    assert ("message", "span_data_container.SpanDataContainer") in facts
    assert len([f for f in facts if f[0] == "field"]) == 9


def test_a_changed_field_number_is_caught(
    go_baseline: list[descriptor_pb2.FileDescriptorProto],
    ours: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    # The comparison itself must bite: renumber one field in a copy of ours.
    mutated = [descriptor_pb2.FileDescriptorProto.FromString(f.SerializeToString()) for f in ours]
    ingestion = next(
        f for f in mutated if f.service and f.service[0].name == "InternalIngestionService"
    )
    ingestion.message_type[0].field[1].number = 7
    assert _facts(mutated, _pool_of(mutated)) != _facts(go_baseline, _pool_of(go_baseline))


def test_no_file_options_leak_into_our_descriptors(
    ours: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    # The Go protos carry only go_package; ours carry none (the Go import path is given to
    # protoc-gen-go on the command line), so reflection shows nothing Go does not have.
    for file in ours:
        assert file.options == descriptor_pb2.FileOptions(), file.name
