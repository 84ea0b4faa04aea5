"""The conversion's rules beyond the golden cases: Go's float text, JSON validity, bad input."""

from __future__ import annotations

import math
import uuid

import pytest
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from junjo_backend.ingestion.spans import NO_SERVICE_NAME, SpanRecord
from junjo_backend.store.convert import (
    PATCH_ID_NAMESPACE,
    convert_batch,
    is_patch_set_aside,
    micros,
    patch_id,
    service_name,
)
from junjo_backend.store.gojson import GoJsonError, duckdb_json_valid, go_float, go_json
from tests.store.records import RESOURCE, key, record, set_state


def kv(key_: str, **value: object) -> common_pb2.KeyValue:
    return common_pb2.KeyValue(key=key_, value=common_pb2.AnyValue(**value))  # type: ignore[arg-type]


# Go's encoding/json text of float64 values (strconv 'f' within [1e-6, 1e21), else 'e').
@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0"),
        (-0.0, "-0"),
        (1.0, "1"),
        (-2.5, "-2.5"),
        (0.1, "0.1"),
        (1e20, "100000000000000000000"),
        (1e21, "1e+21"),
        (1.5e21, "1.5e+21"),
        (1e-6, "0.000001"),
        (9.99e-7, "9.99e-7"),
        (1e-7, "1e-7"),
        (1e-100, "1e-100"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (9007199254740992.0, "9007199254740992"),
        (9007199254740994.0, "9007199254740994"),
        (1e16, "10000000000000000"),
        (12345678901234567000.0, "12345678901234567000"),
        (0.000123, "0.000123"),
        (1.5e-5, "0.000015"),
        (-3e-10, "-3e-10"),
        (123456789.125, "123456789.125"),
    ],
)
def test_floats_are_written_as_go_writes_them(value: float, text: str) -> None:
    assert go_float(value) == text


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_go_refuses_nan_and_infinities(value: float) -> None:
    with pytest.raises(GoJsonError):
        go_float(value)


def test_json_text_escapes_html_and_line_separators_and_sorts_keys() -> None:
    text = go_json({"b": "<&>\u2028\u2029", "a": [1, "x"], "c": {"z": None}}, has_floats=False)
    assert text == '{"a":[1,"x"],"b":"\\u003c\\u0026\\u003e\\u2028\\u2029","c":{"z":null}}'
    # The float path writes the same text for the same values.
    assert (
        go_json({"b": "<&>\u2028\u2029", "a": [1, "x"], "c": {"z": None}}, has_floats=True) == text
    )


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ('{"a": 1}', True),
        ("[1,]", True),  # DuckDB allows a trailing comma; Python's parser does not
        ('{"a": NaN}', True),
        ('"\\ud800"', False),  # a lone surrogate: Python's parser accepts it, DuckDB not
        ('"\\ud83d\\ude00"', True),
        ("{oops", False),
        ("", False),
        ("[" * 5000 + "]" * 5000, True),  # deeper than Python's recursion limit
    ],
)
def test_json_validity_is_duckdbs(text: str, *, valid: bool) -> None:
    assert duckdb_json_valid(text) is valid


def test_patch_id_matches_the_uuid_module() -> None:
    for trace_id, span_id, index in (("", "", 0), ("ab" * 16, "cd" * 8, 7), ("é", "/", 12345)):
        expected = uuid.uuid5(PATCH_ID_NAMESPACE, f"{trace_id}/{span_id}/{index}")
        assert patch_id(trace_id, span_id, index) == str(expected)


def test_times_floor_to_microseconds_and_wrap_as_int64() -> None:
    assert micros(1999) == 1
    assert micros(2**64 - 1) == -1
    assert micros(2**63) == -(2**63) // 1000


def resource(*attributes: common_pb2.KeyValue) -> bytes:
    return resource_pb2.Resource(attributes=list(attributes)).SerializeToString()


def test_service_name_is_the_first_string_service_name() -> None:
    assert service_name(RESOURCE) == "svc"
    assert (
        service_name(
            resource(kv("service.name", int_value=1), kv("service.name", string_value="b"))
        )
        == "b"
    )
    assert service_name(resource(kv("service.name", string_value=""))) == NO_SERVICE_NAME
    assert service_name(resource(kv("service.name", string_value="a\0b"))) == "a"
    assert service_name(b"\xff\xff") == NO_SERVICE_NAME


def only_row(records: list[SpanRecord]) -> dict[str, object]:
    rows = convert_batch(records).spans.to_pylist()
    assert len(rows) == 1
    row: dict[str, object] = rows[0]
    return row


def test_a_valueless_key_is_left_out_wherever_it_is() -> None:
    nested = common_pb2.KeyValueList(values=[common_pb2.KeyValue(key="none"), kv("k", int_value=1)])
    attributes = [
        common_pb2.KeyValue(key="x"),
        kv("kvl", kvlist_value=nested),
        common_pb2.KeyValue(key="junjo.id"),
    ]
    row = only_row([record(1, attributes=attributes)])
    assert row["attributes_json"] == '{"kvl":{"k":1}}'
    assert row["junjo_id"] == ""


def test_nan_anywhere_encoded_sets_the_span_aside() -> None:
    in_array = kv(
        "a", array_value=common_pb2.ArrayValue(values=[common_pb2.AnyValue(double_value=math.nan)])
    )
    event = trace_pb2.Span.Event(name="e", attributes=[kv("x", double_value=math.inf)])
    converted = convert_batch([record(1, attributes=[in_array]), record(2, events=[event])])
    assert converted.spans.num_rows == 0
    assert [row.key for row in converted.set_aside] == [key(1), key(2)]
    assert not any(is_patch_set_aside(row) for row in converted.set_aside)


def test_nan_replaced_by_a_later_duplicate_key_is_not_encoded() -> None:
    row = only_row(
        [record(1, attributes=[kv("x", double_value=math.nan), kv("x", double_value=0.5)])]
    )
    assert row["attributes_json"] == '{"x":0.5}'


def test_workflow_json_is_validated_after_the_nul_cut() -> None:
    attributes = [
        kv("junjo.span_type", string_value="workflow"),
        kv("junjo.workflow.state.start", string_value='{"a":1}\0 garbage'),
    ]
    row = only_row([record(1, attributes=attributes)])
    assert row["junjo_wf_state_start"] == '{"a":1}'
    assert row["junjo_wf_store_id"] == "{}"


def test_a_span_that_does_not_decode_is_set_aside() -> None:
    bad = SpanRecord(key(1), b"\xff\xff\xff", RESOURCE)
    converted = convert_batch([bad, record(2)])
    assert converted.spans.num_rows == 1
    (aside,) = converted.set_aside
    assert (aside.key, aside.trace_id, aside.reason) == (key(1), "", "span does not decode")
    assert converted.last_key == key(2)
    assert converted.records == 2


def test_each_bad_patch_is_set_aside_and_the_good_ones_kept() -> None:
    events = [set_state("{bad"), set_state('{"ok":1}'), set_state("[1,2")]
    converted = convert_batch([record(1, events=events)])
    assert converted.spans.num_rows == 1
    assert converted.patches.column("patch_json").to_pylist() == ['{"ok":1}']
    assert converted.patches.column("patch_id").to_pylist() == [patch_id(*ids(1), 1)]
    reasons = [row.reason for row in converted.set_aside]
    assert reasons == [
        "patch of event 0: junjo.state_json_patch is not valid JSON",
        "patch of event 2: junjo.state_json_patch is not valid JSON",
    ]


def ids(n: int) -> tuple[str, str]:
    span = record(n).span()
    return span.trace_id.hex(), span.span_id.hex()


def test_unknown_kinds_and_status_codes() -> None:
    span = trace_pb2.Span(trace_id=b"\x01" * 16, span_id=b"\x01" * 8, kind=-3)  # type: ignore[arg-type]
    span.status.code = 9  # type: ignore[assignment]
    row = only_row([SpanRecord(key(1), span.SerializeToString(), RESOURCE)])
    assert (row["kind"], row["status_code"], row["status_message"]) == ("UNSPECIFIED", "9", "")
