"""The ingestion client's errors: gRPC failures of ReadSpans as typed errors, and which to retry.

Callers of the ingestion client never see a raw `grpc.RpcError`: they get an
`IngestionError` (or a subclass) that carries the status code and details.
"""

from __future__ import annotations

import grpc

# Substrings of the details that grpc-core gives a stream cut by a dropped connection when it
# reports it with a code other than UNAVAILABLE (seen as INTERNAL or UNKNOWN in some versions).
_CONNECTION_LOSS_DETAILS = (
    "Socket closed",
    "Connection reset",
    "Stream removed",
    "RST_STREAM",
    "GOAWAY",
    "Broken pipe",
)


class IngestionError(Exception):
    """A ReadSpans call to the ingestion-service failed with `code`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class IngestionUnavailableError(IngestionError):
    """The ingestion-service stayed unreachable until the retry deadline ran out."""


class IngestionDeadlineError(IngestionError):
    """The ingestion-service sent nothing before the call's deadline."""


class IngestionMessageTooLargeError(IngestionError):
    """A WAL entry is larger than the client accepts (`INGESTION_MAX_MESSAGE_BYTES`)."""


class IngestionClosedError(IngestionError):
    """The client was closed while the call was under way, or before it started."""


def rpc_status(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a failed call (UNKNOWN when the error carries none)."""
    # A failed call's RpcError is also a grpc.Call, which the typing stubs cannot express.
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    if callable(code_of) and callable(details_of):
        code = code_of()
        details = details_of()
        if isinstance(code, grpc.StatusCode):
            return code, details if isinstance(details, str) else ""
    return grpc.StatusCode.UNKNOWN, str(error)


def is_connection_loss(code: grpc.StatusCode, details: str) -> bool:
    """Whether a status means the server could not be reached or the connection dropped.

    CANCELLED counts: the client maps its own cancellations to `IngestionClosedError` before
    asking, so a CANCELLED that reaches here came from a server going away.
    """
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return True
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return any(fragment in details for fragment in _CONNECTION_LOSS_DETAILS)
    return False


def answered_with(code: grpc.StatusCode, details: str) -> bool:
    """Whether a failed call's status came from the ingestion-service (it is reachable).

    A lost connection did not, and neither did a deadline that passed with nothing received.
    """
    return code is not grpc.StatusCode.DEADLINE_EXCEEDED and not is_connection_loss(code, details)


def ingestion_error(code: grpc.StatusCode, details: str) -> IngestionError:
    """The typed error for a ReadSpans failure with this status."""
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return IngestionDeadlineError(
            code, f"{details} (no message before INGESTION_CALL_TIMEOUT_SECONDS ran out)"
        )
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return IngestionMessageTooLargeError(
            code,
            f"{details}: a WAL entry is larger than INGESTION_MAX_MESSAGE_BYTES allows; "
            "raise that setting to read it",
        )
    if is_connection_loss(code, details):
        return IngestionUnavailableError(code, details)
    return IngestionError(code, details)
