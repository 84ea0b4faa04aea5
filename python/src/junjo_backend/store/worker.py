"""A conversion worker process: `python -m junjo_backend.store.worker` (see process_pool.py).

It reads tasks from stdin and writes results to stdout, each an 8-byte big-endian length
and a pickle: a task is a list of (key, span, resource) bytes, its result the
`ConvertedBatch` of `convert_fields` (Arrow tables, which pickle as their buffers: the
backend takes them in without a Python object a value), or a `WorkerFailure`. It imports
the conversion and pyarrow only (no gRPC, no DuckDB, not the backend), and ends at the end
of its input.
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass
from typing import BinaryIO

from junjo_backend.store.convert import convert_fields, to_arrow
from junjo_backend.store.priority import yield_to_auth

HEADER_BYTES = 8


@dataclass(frozen=True, slots=True)
class WorkerFailure:
    """A task the worker could not do; `message` is one line."""

    message: str


def write_frame(stream: BinaryIO, payload: bytes) -> None:
    """One length-prefixed frame."""
    stream.write(len(payload).to_bytes(HEADER_BYTES, "big"))
    stream.write(payload)
    stream.flush()


def read_frame(stream: BinaryIO) -> bytes | None:
    """The next frame, or None at the end of the input."""
    header = stream.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        return None
    return stream.read(int.from_bytes(header, "big"))


def serve(tasks: BinaryIO, results: BinaryIO) -> None:
    """Answer every task until the input ends."""
    while (frame := read_frame(tasks)) is not None:
        try:
            # The tasks come from the backend that started this process, over its pipe.
            fields = pickle.loads(frame)  # noqa: S301
            result: object = to_arrow(convert_fields(fields))
        except Exception as error:  # noqa: BLE001 (reported to the backend, which retries)
            result = WorkerFailure(f"{type(error).__name__}: {error}".splitlines()[0])
        write_frame(results, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))


if __name__ == "__main__":
    yield_to_auth()  # one thread: the whole process
    serve(sys.stdin.buffer, sys.stdout.buffer)
