"""Plain gRPC calls to the peer, for what the OTLP exporter and our client do not show:
status codes and details, batch size 0, reflection."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_reflection.v1alpha import reflection_pb2  # type: ignore[import-untyped]
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from junjo_backend._wire.ingestion import ingestion_pb2

from .otlp_spans import API_KEY_HEADER

TRACE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
METRICS_EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
LOGS_EXPORT = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
READ_SPANS = "/ingestion.InternalIngestionService/ReadSpans"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a call ended."""

    code: grpc.StatusCode
    details: str


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return ((API_KEY_HEADER, api_key),) if api_key is not None else None


async def export_traces(
    address: str,
    request: trace_service_pb2.ExportTraceServiceRequest,
    api_key: str | None,
    timeout: float = 20.0,  # noqa: ASYNC109 (the call's gRPC deadline)
) -> Outcome:
    """TraceService/Export with the key header (none when `api_key` is None)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            TRACE_EXPORT,
            request_serializer=trace_service_pb2.ExportTraceServiceRequest.SerializeToString,
            response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString,
        )
        try:
            await call(request, metadata=_metadata(api_key), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            return Outcome(error.code(), error.details() or "")
    return Outcome(grpc.StatusCode.OK, "")


async def export_metrics_and_logs(address: str, api_key: str | None) -> list[Outcome]:
    """Empty metrics and logs exports; their outcomes in that order."""
    outcomes = []
    async with grpc.aio.insecure_channel(address) as channel:
        metrics = channel.unary_unary(
            METRICS_EXPORT,
            request_serializer=metrics_service_pb2.ExportMetricsServiceRequest.SerializeToString,
            response_deserializer=metrics_service_pb2.ExportMetricsServiceResponse.FromString,
        )
        logs = channel.unary_unary(
            LOGS_EXPORT,
            request_serializer=logs_service_pb2.ExportLogsServiceRequest.SerializeToString,
            response_deserializer=logs_service_pb2.ExportLogsServiceResponse.FromString,
        )
        for call, request in (
            (metrics, metrics_service_pb2.ExportMetricsServiceRequest()),
            (logs, logs_service_pb2.ExportLogsServiceRequest()),
        ):
            try:
                await call(request, metadata=_metadata(api_key), timeout=10)
            except grpc.aio.AioRpcError as error:
                outcomes.append(Outcome(error.code(), error.details() or ""))
            else:
                outcomes.append(Outcome(grpc.StatusCode.OK, ""))
    return outcomes


async def read_spans_raw(
    address: str, start_key: bytes, batch_size: int
) -> tuple[list[ingestion_pb2.ReadSpansResponse], grpc.StatusCode]:
    """ReadSpans with the generated messages and nothing of ours in between."""
    async with grpc.aio.insecure_channel(address) as channel:
        read = channel.unary_stream(
            READ_SPANS,
            request_serializer=ingestion_pb2.ReadSpansRequest.SerializeToString,
            response_deserializer=ingestion_pb2.ReadSpansResponse.FromString,
        )
        call = read(
            ingestion_pb2.ReadSpansRequest(start_key_ulid=start_key, batch_size=batch_size),
            timeout=10,
        )
        messages = [message async for message in call]
        return messages, await call.code()


async def list_services(address: str) -> set[str]:
    """The services the server at `address` lists through reflection."""
    async with grpc.aio.insecure_channel(address) as channel:
        reflect = channel.stream_stream(
            REFLECTION,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        call = reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names: set[str] = set()
        async for response in call:
            names.update(service.name for service in response.list_services_response.service)
        return names
