"""The worker's framing, in this process: tasks in, results (or failures) out, until EOF."""

from __future__ import annotations

import io
import pickle

from junjo_backend.store.convert import ConvertedBatch
from junjo_backend.store.worker import WorkerFailure, read_frame, serve, write_frame
from tests.store.records import record


def test_the_worker_answers_every_task_until_its_input_ends() -> None:
    tasks = io.BytesIO()
    good = [(r.key, r.span_bytes, r.resource_bytes) for r in (record(1), record(2))]
    write_frame(tasks, pickle.dumps(good))
    write_frame(tasks, b"not a pickle")
    write_frame(tasks, pickle.dumps([]))
    tasks.seek(0)
    results = io.BytesIO()
    serve(tasks, results)
    results.seek(0)
    answers = []
    while (frame := read_frame(results)) is not None:
        answers.append(pickle.loads(frame))  # noqa: S301 (our own test's frames)
    assert len(answers) == 3
    first, failure, empty = answers
    assert isinstance(first, ConvertedBatch)
    assert first.spans["service_name"].to_pylist() == ["svc", "svc"]
    assert isinstance(failure, WorkerFailure)
    assert failure.message.startswith("UnpicklingError")
    assert isinstance(empty, ConvertedBatch)
    assert empty.records == 0
