package wal

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"testing"
	"time"

	"github.com/oklog/ulid/v2"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	resourcepb "go.opentelemetry.io/proto/otlp/resource/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func openTemp(t *testing.T) *WAL {
	t.Helper()
	w, err := Open(t.TempDir(), quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.Close() })
	return w
}

func testSpan(i int) *tracepb.Span {
	return &tracepb.Span{
		TraceId: bytes.Repeat([]byte{byte(i + 1)}, 16),
		SpanId:  bytes.Repeat([]byte{byte(i + 1)}, 8),
		Name:    "span-" + string(rune('a'+i)),
		Kind:    tracepb.Span_SPAN_KIND_SERVER,
	}
}

func testResource(service string) *resourcepb.Resource {
	return &resourcepb.Resource{Attributes: []*commonpb.KeyValue{{
		Key:   "service.name",
		Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: service}},
	}}}
}

// writeSpans writes n spans and returns their keys, in order.
func writeSpans(t *testing.T, w *WAL, n int) [][]byte {
	t.Helper()
	keys := make([][]byte, n)
	for i := range n {
		key, err := w.WriteSpan(testSpan(i), testResource("svc"))
		if err != nil {
			t.Fatal(err)
		}
		keys[i] = key[:]
	}
	return keys
}

func readAll(t *testing.T, w *WAL, start []byte, batch uint32) ([]Record, ReadStats) {
	t.Helper()
	var records []Record
	stats, err := w.Read(start, batch, func(r Record) error {
		records = append(records, r)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if int(stats.Sent) != len(records) {
		t.Fatalf("stats.Sent = %d, but send saw %d records", stats.Sent, len(records))
	}
	return records, stats
}

func recordKeys(records []Record) [][]byte {
	keys := make([][]byte, len(records))
	for i, r := range records {
		keys[i] = r.Key
	}
	return keys
}

func assertKeys(t *testing.T, got, want [][]byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d keys, want %d", len(got), len(want))
	}
	for i := range want {
		if !bytes.Equal(got[i], want[i]) {
			t.Fatalf("key %d = %x, want %x", i, got[i], want[i])
		}
	}
}

func TestEmptyStartKeyReadsFromTheOldestEntry(t *testing.T) {
	w := openTemp(t)
	keys := writeSpans(t, w, 5)
	for _, start := range [][]byte{nil, {}} {
		records, _ := readAll(t, w, start, 100)
		assertKeys(t, recordKeys(records), keys)
	}
}

func TestRecordsCarryTheSpanAndItsResource(t *testing.T) {
	w := openTemp(t)
	writeSpans(t, w, 3)
	records, _ := readAll(t, w, nil, 100)
	for i, r := range records {
		var span tracepb.Span
		if err := proto.Unmarshal(r.SpanBytes, &span); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(&span, testSpan(i)) {
			t.Fatalf("span %d = %v, want %v", i, &span, testSpan(i))
		}
		var resource resourcepb.Resource
		if err := proto.Unmarshal(r.ResourceBytes, &resource); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(&resource, testResource("svc")) {
			t.Fatalf("resource %d = %v", i, &resource)
		}
	}
}

func TestReadStartsStrictlyAfterTheStartKey(t *testing.T) {
	w := openTemp(t)
	keys := writeSpans(t, w, 5)
	records, _ := readAll(t, w, keys[1], 100)
	assertKeys(t, recordKeys(records), keys[2:])
	records, _ = readAll(t, w, keys[4], 100)
	assertKeys(t, recordKeys(records), nil)
}

func TestReadStopsAtTheBatchSize(t *testing.T) {
	w := openTemp(t)
	keys := writeSpans(t, w, 5)
	for _, tc := range []struct {
		batch uint32
		want  [][]byte
	}{{1, keys[:1]}, {2, keys[:2]}, {5, keys}, {6, keys}, {1 << 31, keys}} {
		records, _ := readAll(t, w, nil, tc.batch)
		assertKeys(t, recordKeys(records), tc.want)
	}
	records, _ := readAll(t, w, keys[0], 2)
	assertKeys(t, recordKeys(records), keys[1:3])
}

func TestBatchSizeZeroReadsNothing(t *testing.T) {
	w := openTemp(t)
	keys := writeSpans(t, w, 3)
	for _, start := range [][]byte{nil, keys[0]} {
		records, stats := readAll(t, w, start, 0)
		if len(records) != 0 || stats != (ReadStats{}) {
			t.Fatalf("batch 0 from %x: %d records, %+v", start, len(records), stats)
		}
	}
}

// between returns a 16-byte key that sorts strictly between a and b and exists in no WAL.
func between(t *testing.T, a, b []byte) []byte {
	t.Helper()
	n := new(big.Int).Add(new(big.Int).SetBytes(a), big.NewInt(1))
	if n.Cmp(new(big.Int).SetBytes(b)) >= 0 {
		t.Skip("adjacent ULIDs: no key between them (one in 2^32)")
	}
	return n.FillBytes(make([]byte, 16))
}

func TestAStartKeyThatDoesNotExistIsFine(t *testing.T) {
	w := openTemp(t)
	keys := writeSpans(t, w, 4)
	records, _ := readAll(t, w, between(t, keys[1], keys[2]), 100)
	assertKeys(t, recordKeys(records), keys[2:])

	records, _ = readAll(t, w, make([]byte, 16), 100) // older than every key
	assertKeys(t, recordKeys(records), keys)

	records, _ = readAll(t, w, bytes.Repeat([]byte{0xff}, 16), 100) // newer than every key
	assertKeys(t, recordKeys(records), nil)
}

func TestCorruptEntriesAreSkippedButCountTowardTheBatch(t *testing.T) {
	w := openTemp(t)
	good := writeSpans(t, w, 2)
	badSpan, err := ContainerValue([]byte{0xff, 0xff, 0xff}, nil)
	if err != nil {
		t.Fatal(err)
	}
	badResource, err := ContainerValue(nil, []byte{0x0a, 0x05, 0x01})
	if err != nil {
		t.Fatal(err)
	}
	for _, value := range [][]byte{{0xff, 0xff, 0xff, 0xff}, badSpan, badResource} {
		key, err := NewKey()
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Put(key[:], value); err != nil {
			t.Fatal(err)
		}
	}
	good = append(good, writeSpans(t, w, 2)...)

	records, stats := readAll(t, w, nil, 3)
	assertKeys(t, recordKeys(records), good[:2])
	if stats.Skipped != 1 {
		t.Fatalf("skipped = %d, want 1", stats.Skipped)
	}

	records, stats = readAll(t, w, nil, 5)
	assertKeys(t, recordKeys(records), good[:2])
	if stats.Skipped != 3 {
		t.Fatalf("skipped = %d, want 3", stats.Skipped)
	}

	records, stats = readAll(t, w, nil, 100)
	assertKeys(t, recordKeys(records), good)
	if stats.Skipped != 3 {
		t.Fatalf("skipped = %d, want 3", stats.Skipped)
	}
}

func TestSpanBytesAreReencoded(t *testing.T) {
	w := openTemp(t)
	// Fields in reverse number order: valid protobuf, but not the canonical encoding.
	var raw []byte
	raw = protowire.AppendTag(raw, 5, protowire.BytesType)
	raw = protowire.AppendString(raw, "out-of-order")
	raw = protowire.AppendTag(raw, 1, protowire.BytesType)
	raw = protowire.AppendBytes(raw, bytes.Repeat([]byte{7}, 16))
	value, err := ContainerValue(raw, nil)
	if err != nil {
		t.Fatal(err)
	}
	key, err := NewKey()
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Put(key[:], value); err != nil {
		t.Fatal(err)
	}
	records, _ := readAll(t, w, nil, 1)
	canonical, err := proto.Marshal(&tracepb.Span{Name: "out-of-order", TraceId: bytes.Repeat([]byte{7}, 16)})
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(raw, canonical) || !bytes.Equal(records[0].SpanBytes, canonical) {
		t.Fatalf("span bytes %x, want the canonical %x", records[0].SpanBytes, canonical)
	}
}

func TestAnErrorFromSendEndsTheRead(t *testing.T) {
	w := openTemp(t)
	writeSpans(t, w, 3)
	stop := errors.New("client went away")
	calls := 0
	stats, err := w.Read(nil, 10, func(Record) error {
		calls++
		return stop
	})
	if !errors.Is(err, stop) || calls != 1 || stats.Sent != 0 {
		t.Fatalf("err=%v calls=%d stats=%+v", err, calls, stats)
	}
}

func TestKeysAreStrictlyIncreasingAndCarryTheWriteTime(t *testing.T) {
	before := ulid.Timestamp(time.Now())
	previous, err := NewKey()
	if err != nil {
		t.Fatal(err)
	}
	for range 20_000 {
		key, err := NewKey()
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Compare(key[:], previous[:]) <= 0 {
			t.Fatalf("%x does not sort after %x", key, previous)
		}
		previous = key
	}
	after := ulid.Timestamp(time.Now())
	if previous.Time() < before || previous.Time() > after {
		t.Fatalf("key time %d outside [%d, %d]", previous.Time(), before, after)
	}
}

func TestBatchWritesAreReadBackInOrder(t *testing.T) {
	w := openTemp(t)
	value, err := EncodeValue(testSpan(0), testResource("svc"))
	if err != nil {
		t.Fatal(err)
	}
	batch := w.NewBatch()
	var keys [][]byte
	for range 50 {
		key, err := batch.Add(value)
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, key[:])
	}
	if err := batch.Flush(); err != nil {
		t.Fatal(err)
	}
	batch.Cancel()
	records, _ := readAll(t, w, nil, 1000)
	assertKeys(t, recordKeys(records), keys)
}

func TestEntriesSurviveSyncCloseAndReopen(t *testing.T) {
	dir := t.TempDir()
	w, err := Open(dir, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	keys := writeSpans(t, w, 3)
	if err := w.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	reopened, err := Open(dir, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = reopened.Close() })
	records, _ := readAll(t, reopened, nil, 10)
	assertKeys(t, recordKeys(records), keys)
}
