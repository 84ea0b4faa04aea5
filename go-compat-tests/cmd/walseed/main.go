// Command walseed writes synthetic spans straight into a BadgerDB WAL directory, as the
// ingestion-service would have written them, then prints
// {"count":N,"first_key":hex,"last_key":hex}. The peer must not have the WAL open.
//
// With -corrupt C, a run of C entries that do not decode (alternately a value that is not a
// SpanDataContainer and a container whose span bytes are not a Span) follows the first
// -corrupt-after valid entries; count stays the number of valid entries, and the output
// adds "corrupt":C. With -census it writes nothing and prints {"entries":N}, the number of
// keys in the WAL (read without their values, so a few million take seconds).
//
// With -shape junjo the spans are shaped like the Junjo SDK's (junjo.go): a workflow span
// and its node spans, with `set_state` events and state JSON of a few hundred bytes. With
// -records FILE it writes every record of a golden batches file (JSONL, {"records": [{"span",
// "resource"}]}, base64) in order under new keys instead, and count is how many it wrote.
package main

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	badger "github.com/dgraph-io/badger/v4"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	resourcepb "go.opentelemetry.io/proto/otlp/resource/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"

	"github.com/junjo-backend/go-compat-tests/internal/wal"
)

// entriesPerBatch bounds the memory one write batch holds.
const entriesPerBatch = 10_000

type result struct {
	Count    int    `json:"count"`
	Corrupt  int    `json:"corrupt,omitempty"`
	FirstKey string `json:"first_key"`
	LastKey  string `json:"last_key"`
}

// Values the ingestion-service cannot decode: not a SpanDataContainer at all, and a
// container whose span bytes are not a Span (a truncated length-delimited field).
var corruptValues = [][]byte{
	[]byte("\xff\xff\xff not a SpanDataContainer"),
	{0x0a, 0x03, 0x0a, 0x05, 0x01},
}

func main() {
	path := flag.String("path", "", "the WAL directory (created if missing)")
	count := flag.Int("count", 1000, "how many entries to write")
	spanBytes := flag.Int("span-bytes", 600, "approximate size of each encoded span")
	resourceBytes := flag.Int("resource-bytes", 200, "approximate size of each encoded resource")
	services := flag.Int("services", 4, "how many distinct service.name values to cycle through")
	corrupt := flag.Int("corrupt", 0, "a run of this many undecodable entries")
	corruptAfter := flag.Int("corrupt-after", 0, "valid entries written before the corrupt run")
	census := flag.Bool("census", false, "count the WAL's entries (decodable or not), write nothing")
	shape := flag.String("shape", "synthetic", "synthetic (padded spans) or junjo (Junjo SDK-shaped)")
	records := flag.String("records", "", "write the records of this golden batches file instead")
	flag.Parse()
	if *path == "" || *count < 0 || *services < 1 || *corrupt < 0 || *corruptAfter < 0 || *corruptAfter > *count ||
		(*shape != "synthetic" && *shape != "junjo") {
		flag.Usage()
		os.Exit(2)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	var out any
	var err error
	switch {
	case *census:
		out, err = takeCensus(*path)
	case *records != "":
		out, err = seedRecords(*path, *records, logger)
	default:
		spanFor := func(i int) *tracepb.Span { return syntheticSpan(i, *spanBytes) }
		if *shape == "junjo" {
			spanFor = junjoSpans()
		}
		out, err = seed(*path, *count, spanFor, *resourceBytes, *services, *corrupt, *corruptAfter, logger)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "walseed:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(1)
	}
}

type censusResult struct {
	Entries int `json:"entries"`
}

// takeCensus counts the WAL's keys, without reading values.
func takeCensus(path string) (censusResult, error) {
	db, err := badger.Open(badger.DefaultOptions(path).WithLogger(nil).WithReadOnly(true))
	if err != nil {
		return censusResult{}, fmt.Errorf("open WAL %s: %w", path, err)
	}
	defer db.Close() //nolint:errcheck // read only
	var out censusResult
	err = db.View(func(txn *badger.Txn) error {
		opts := badger.DefaultIteratorOptions
		opts.PrefetchValues = false
		it := txn.NewIterator(opts)
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			out.Entries++
		}
		return nil
	})
	return out, err
}

// seedRecords writes the records of a golden batches file.
func seedRecords(path, records string, logger *slog.Logger) (result, error) {
	store, err := wal.Open(path, logger)
	if err != nil {
		return result{}, err
	}
	defer store.Close() //nolint:errcheck // Sync below reports what matters
	var res result
	if err := writeRecords(store, records, &res); err != nil {
		return result{}, err
	}
	return res, store.Sync()
}

func seed(path string, count int, spanFor func(int) *tracepb.Span, resourceBytes, services, corrupt, corruptAfter int, logger *slog.Logger) (result, error) {
	store, err := wal.Open(path, logger)
	if err != nil {
		return result{}, err
	}
	defer store.Close() //nolint:errcheck // Sync below reports what matters

	resources := make([][]byte, services)
	for i := range resources {
		resources[i], err = proto.Marshal(syntheticResource(i, resourceBytes))
		if err != nil {
			return result{}, err
		}
	}
	res := result{Count: count, Corrupt: corrupt}
	if err := writeValid(store, 0, corruptAfter, spanFor, resources, &res); err != nil {
		return result{}, err
	}
	if corrupt > 0 {
		batch := store.NewBatch()
		for i := range corrupt {
			if _, err := batch.Add(corruptValues[i%len(corruptValues)]); err != nil {
				batch.Cancel()
				return result{}, err
			}
		}
		if err := batch.Flush(); err != nil {
			return result{}, err
		}
	}
	if err := writeValid(store, corruptAfter, count, spanFor, resources, &res); err != nil {
		return result{}, err
	}
	return res, store.Sync()
}

// writeValid writes valid entries number from..to-1, noting the first and last keys in res.
func writeValid(store *wal.WAL, from, to int, spanFor func(int) *tracepb.Span, resources [][]byte, res *result) error {
	services := len(resources)
	for start := from; start < to; start += entriesPerBatch {
		batch := store.NewBatch()
		for i := start; i < min(start+entriesPerBatch, to); i++ {
			span, err := proto.Marshal(spanFor(i))
			if err != nil {
				batch.Cancel()
				return err
			}
			value, err := wal.ContainerValue(span, resources[i%services])
			if err != nil {
				batch.Cancel()
				return err
			}
			key, err := batch.Add(value)
			if err != nil {
				batch.Cancel()
				return err
			}
			if i == 0 {
				res.FirstKey = hex.EncodeToString(key[:])
			}
			res.LastKey = hex.EncodeToString(key[:])
		}
		if err := batch.Flush(); err != nil {
			return err
		}
	}
	return nil
}

func stringAttr(key, value string) *commonpb.KeyValue {
	return &commonpb.KeyValue{Key: key, Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: value}}}
}

func syntheticResource(service, size int) *resourcepb.Resource {
	r := &resourcepb.Resource{Attributes: []*commonpb.KeyValue{
		stringAttr("service.name", fmt.Sprintf("seed-service-%d", service)),
		stringAttr("telemetry.sdk.language", "go"),
	}}
	pad(&r.Attributes, func() int { return proto.Size(r) }, size)
	return r
}

func syntheticSpan(i, size int) *tracepb.Span {
	traceID := make([]byte, 16)
	spanID := make([]byte, 8)
	_, _ = io.ReadFull(rand.Reader, traceID)
	_, _ = io.ReadFull(rand.Reader, spanID)
	start := uint64(time.Now().UnixNano())
	s := &tracepb.Span{
		TraceId:           traceID,
		SpanId:            spanID,
		Name:              fmt.Sprintf("seed-span-%d", i),
		Kind:              tracepb.Span_SPAN_KIND_INTERNAL,
		StartTimeUnixNano: start,
		EndTimeUnixNano:   start + 1_000_000,
		Attributes:        []*commonpb.KeyValue{stringAttr("seed.index", fmt.Sprint(i))},
		Status:            &tracepb.Status{Code: tracepb.Status_STATUS_CODE_OK},
	}
	pad(&s.Attributes, func() int { return proto.Size(s) }, size)
	return s
}

// pad appends a "seed.pad" attribute so that size() comes as close to target as it can.
func pad(attrs *[]*commonpb.KeyValue, size func() int, target int) {
	if size() >= target {
		return
	}
	attr := stringAttr("seed.pad", "")
	*attrs = append(*attrs, attr)
	// Length prefixes grow by a byte now and then, so settle in a few passes.
	for range 4 {
		missing := target - size()
		value := attr.Value.GetStringValue()
		n := max(len(value)+missing, 0)
		attr.Value = &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: strings.Repeat("x", n)}}
		if missing == 0 {
			return
		}
	}
}
