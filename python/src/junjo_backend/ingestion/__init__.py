"""The ingestion-service's client: `ReadSpans` over gRPC, its errors, the span record."""
