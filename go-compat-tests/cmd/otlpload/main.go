// Command otlpload sends OTLP traces to an ingestion-service as fast as it accepts them:
// -streams concurrent exporters, each on its own connection (as separate apps are), each
// sending TraceService/Export requests of -batch spans one after another with the API key
// in the `x-junjo-api-key` metadata. It stops after -spans spans or -duration, whichever
// comes first, and prints one JSON object: spans sent and accepted, the accepted rate, the
// wall-clock times of the first send and the last acceptance, and errors by status code.
//
// With -rate R the streams together send at most R spans a second (each request waits for
// its turn on one schedule), still concurrently: a load a drain can keep up with, whose lag
// is then the drain's own and not its throughput's.
//
// The key is read from the environment variable named by -key-env, never from the command
// line (which other processes can read).
//
// With -follow ADDR it also reads the WAL at its head while the load runs, like a poller
// with nothing to catch up, moving its cursor only past keys older than -settle (its own
// clock against the key's ULID time: run it on the ingestion host). When the load is over
// it reads to the end, counts every entry of the WAL from the oldest, and reports how many
// the follower never saw: the entries whose commit landed behind a later key it had already
// passed. -settle 0 is the naive follower.
//
//	OTLPLOAD_API_KEY=... otlpload -addr 127.0.0.1:50051 -streams 4 -spans 1000000
package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	resourcepb "go.opentelemetry.io/proto/otlp/resource/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"

	"github.com/junjo-backend/go-compat-tests/internal/wire/ingestion"
)

const maxBatchSize = 1<<32 - 1 // ReadSpans' batch_size is a uint32

type report struct {
	Streams          int            `json:"streams"`
	Batch            int            `json:"batch"`
	SpansSent        int64          `json:"spans_sent"`
	SpansAccepted    int64          `json:"spans_accepted"`
	Requests         int64          `json:"requests"`
	Errors           map[string]int `json:"errors"`
	Seconds          float64        `json:"seconds"`
	AcceptedPerS     float64        `json:"accepted_per_s"`
	FirstSendUnixMs  int64          `json:"first_send_unix_ms"`
	LastAcceptUnixMs int64          `json:"last_accept_unix_ms"`
	Follower         *followReport  `json:"follower,omitempty"`
}

type followReport struct {
	SettleMs   int64 `json:"settle_ms"`
	Reads      int64 `json:"reads"`
	Seen       int64 `json:"seen"`
	WALEntries int64 `json:"wal_entries"`
	Missed     int64 `json:"missed"`
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "the ingestion-service's OTLP address")
	keyEnv := flag.String("key-env", "OTLPLOAD_API_KEY", "environment variable holding the API key")
	streams := flag.Int("streams", 4, "concurrent exporters, each on its own connection")
	batch := flag.Int("batch", 512, "spans per Export request")
	spans := flag.Int64("spans", 0, "stop after sending this many spans (0: no bound)")
	duration := flag.Duration("duration", 0, "stop after this long (0: no bound)")
	rate := flag.Float64("rate", 0, "spans a second over all streams at most (0: as fast as accepted)")
	services := flag.Int("services", 4, "distinct service.name values, one per stream in turn")
	timeout := flag.Duration("timeout", 10*time.Second, "deadline of each Export call")
	unique := flag.Bool("unique", false, "new span ids in every request (a span store keeps each id once); otherwise a stream resends the same spans")
	follow := flag.String("follow", "", "the internal (ReadSpans) address: also follow the WAL's head")
	settle := flag.Duration("settle", 0, "the follower passes only keys older than this")
	flag.Parse()
	key := os.Getenv(*keyEnv)
	if key == "" || *streams < 1 || *batch < 1 || *services < 1 || (*spans <= 0 && *duration <= 0) || *rate < 0 {
		fmt.Fprintln(os.Stderr, "otlpload: needs the key in $"+*keyEnv+", -streams, -batch >= 1, -rate >= 0, and -spans or -duration")
		flag.Usage()
		os.Exit(2)
	}
	out, err := run(*addr, key, *streams, *batch, *spans, *duration, *rate, *services, *timeout, *unique, *follow, *settle)
	if err != nil {
		fmt.Fprintln(os.Stderr, "otlpload:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(1)
	}
}

// budget hands out spans to the streams until the total or the deadline is reached.
type budget struct {
	left     atomic.Int64 // spans not yet handed out; unbounded when limited is false
	limited  bool
	deadline time.Time // zero: none
	rate     float64   // spans a second at most; 0: no pacing
	start    time.Time // when the schedule of a paced budget starts
	handed   atomic.Int64
}

// take reserves up to n spans; 0 means stop.
func (b *budget) take(n int) int {
	if !b.deadline.IsZero() && !time.Now().Before(b.deadline) {
		return 0
	}
	if !b.limited {
		b.pace(int64(n))
		return n
	}
	for {
		left := b.left.Load()
		if left <= 0 {
			return 0
		}
		got := min(int64(n), left)
		if b.left.CompareAndSwap(left, left-got) {
			b.pace(got)
			return int(got)
		}
	}
}

// pace waits until the schedule allows n more spans: the k-th span is due k/rate seconds
// after the start.
func (b *budget) pace(n int64) {
	if b.rate <= 0 {
		return
	}
	before := b.handed.Add(n) - n
	due := b.start.Add(time.Duration(float64(before) / b.rate * float64(time.Second)))
	if wait := time.Until(due); wait > 0 {
		time.Sleep(wait)
	}
}

type tally struct {
	mu         sync.Mutex
	sent       int64
	accepted   int64
	requests   int64
	errors     map[string]int
	lastAccept time.Time
}

func run(addr, key string, streams, batch int, spans int64, duration time.Duration, rate float64,
	services int, timeout time.Duration, unique bool, follow string, settle time.Duration) (report, error) {
	var plan budget
	if spans > 0 {
		plan.limited = true
		plan.left.Store(spans)
	}
	start := time.Now()
	plan.rate, plan.start = rate, start
	if duration > 0 {
		plan.deadline = start.Add(duration)
	}
	var followed chan followResult
	followCtx, stopFollowing := context.WithCancel(context.Background())
	defer stopFollowing()
	if follow != "" {
		followed = make(chan followResult, 1)
		go func() { followed <- followHead(followCtx, follow, settle) }()
	}

	counts := tally{errors: map[string]int{}}
	var wg sync.WaitGroup
	var firstErr error
	var errOnce sync.Once
	for s := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := stream(addr, key, batch, fmt.Sprintf("otlpload-%d", s%services), timeout, unique, &plan, &counts); err != nil {
				errOnce.Do(func() { firstErr = err })
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return report{}, firstErr
	}
	elapsed := time.Since(start).Seconds()
	out := report{
		Streams: streams, Batch: batch, SpansSent: counts.sent, SpansAccepted: counts.accepted,
		Requests: counts.requests, Errors: counts.errors, Seconds: elapsed,
		FirstSendUnixMs: start.UnixMilli(),
	}
	if !counts.lastAccept.IsZero() {
		out.LastAcceptUnixMs = counts.lastAccept.UnixMilli()
	}
	if elapsed > 0 {
		out.AcceptedPerS = float64(counts.accepted) / elapsed
	}
	if followed != nil {
		stopFollowing()
		result := <-followed
		if result.err != nil {
			return report{}, result.err
		}
		out.Follower = &result.report
	}
	return out, nil
}

// stream is one exporter: Export calls one after another until the budget says stop.
func stream(addr, key string, batch int, service string, timeout time.Duration, unique bool, plan *budget, counts *tally) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close() //nolint:errcheck // done with the connection
	client := coltracepb.NewTraceServiceClient(conn)
	full := request(service, batch)
	base := metadata.AppendToOutgoingContext(context.Background(), "x-junjo-api-key", key)
	for {
		n := plan.take(batch)
		if n == 0 {
			return nil
		}
		req := full
		if n < batch || unique {
			req = request(service, n)
		}
		ctx, cancel := context.WithTimeout(base, timeout)
		_, err := client.Export(ctx, req, grpc.WaitForReady(true))
		cancel()
		counts.mu.Lock()
		counts.requests++
		counts.sent += int64(n)
		if err != nil {
			counts.errors[status.Code(err).String()]++
		} else {
			counts.accepted += int64(n)
			counts.lastAccept = time.Now()
		}
		counts.mu.Unlock()
	}
}

// request is one Export request of n spans from one service; its spans are the same each
// time it is sent (the WAL gives every one its own key anyway).
func request(service string, n int) *coltracepb.ExportTraceServiceRequest {
	str := func(k, v string) *commonpb.KeyValue {
		return &commonpb.KeyValue{Key: k, Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: v}}}
	}
	spans := make([]*tracepb.Span, n)
	now := uint64(time.Now().UnixNano())
	for i := range spans {
		traceID, spanID := make([]byte, 16), make([]byte, 8)
		_, _ = rand.Read(traceID)
		_, _ = rand.Read(spanID)
		spans[i] = &tracepb.Span{
			TraceId: traceID, SpanId: spanID, Name: fmt.Sprintf("GET /load/%d", i),
			Kind: tracepb.Span_SPAN_KIND_SERVER, StartTimeUnixNano: now, EndTimeUnixNano: now + 1_500_000,
			Attributes: []*commonpb.KeyValue{str("http.route", "/load/{n}"), str("load.pad", string(make([]byte, 400)))},
			Status:     &tracepb.Status{Code: tracepb.Status_STATUS_CODE_OK},
		}
	}
	return &coltracepb.ExportTraceServiceRequest{ResourceSpans: []*tracepb.ResourceSpans{{
		Resource:   &resourcepb.Resource{Attributes: []*commonpb.KeyValue{str("service.name", service), str("telemetry.sdk.language", "go")}},
		ScopeSpans: []*tracepb.ScopeSpans{{Scope: &commonpb.InstrumentationScope{Name: "otlpload"}, Spans: spans}},
	}}}
}

type followResult struct {
	report followReport
	err    error
}

// followHead reads from its cursor to the end of the WAL again and again until ctx ends,
// then settles, reads to the end once more and counts the whole WAL.
func followHead(ctx context.Context, addr string, settle time.Duration) followResult {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	if err != nil {
		return followResult{err: err}
	}
	defer conn.Close() //nolint:errcheck // done with the connection
	client := ingestion.NewInternalIngestionServiceClient(conn)
	out := followReport{SettleMs: settle.Milliseconds()}
	var cursor []byte
	pass := func() error {
		out.Reads++
		cutoff := time.Now().Add(-settle).UnixMilli()
		n, last, err := readFrom(client, cursor, func(key []byte) bool {
			return settle == 0 || keyMillis(key) <= cutoff
		})
		out.Seen += n
		if last != nil {
			cursor = last
		}
		return err
	}
	for ctx.Err() == nil {
		if err := pass(); err != nil {
			return followResult{err: fmt.Errorf("follower: %w", err)}
		}
		time.Sleep(2 * time.Millisecond)
	}
	// The load is over: whatever is still being committed lands within the settle window.
	time.Sleep(settle + time.Second)
	if err := pass(); err != nil {
		return followResult{err: fmt.Errorf("follower: %w", err)}
	}
	total, _, err := readFrom(client, nil, func([]byte) bool { return true })
	if err != nil {
		return followResult{err: fmt.Errorf("count: %w", err)}
	}
	out.WALEntries = total
	out.Missed = total - out.Seen
	return followResult{report: out}
}

// readFrom streams every entry after start (from the oldest when nil) and takes them while
// take says so; it returns how many it took and the last key taken.
func readFrom(client ingestion.InternalIngestionServiceClient, start []byte, take func([]byte) bool) (int64, []byte, error) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	call, err := client.ReadSpans(ctx, &ingestion.ReadSpansRequest{StartKeyUlid: start, BatchSize: maxBatchSize}, grpc.WaitForReady(true))
	if err != nil {
		return 0, nil, err
	}
	var n int64
	var last []byte
	for {
		msg, err := call.Recv()
		if errors.Is(err, io.EOF) {
			return n, last, nil
		}
		if err != nil {
			return n, last, err
		}
		if !take(msg.GetKeyUlid()) {
			return n, last, nil // cancelling the stream: the rest is not settled yet
		}
		n++
		last = msg.GetKeyUlid()
	}
}

// keyMillis is the 48-bit millisecond timestamp at the front of a ULID.
func keyMillis(key []byte) int64 {
	var ms int64
	for _, b := range key[:6] {
		ms = ms<<8 | int64(b)
	}
	return ms
}
