package peer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	collogspb "go.opentelemetry.io/proto/otlp/collector/logs/v1"
	colmetricspb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	resourcepb "go.opentelemetry.io/proto/otlp/resource/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/junjo-backend/go-compat-tests/internal/wal"
	"github.com/junjo-backend/go-compat-tests/internal/wire/ingestion"
)

const validKey = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZab"

// syncBuffer collects log output from several goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// fakeBackend is a real gRPC InternalAuthService on a loopback port, answering from a
// fixed set of keys (or with failCode, when set) and counting the calls it gets. With
// hold set, every call waits for hold to close (or for its own end) before answering.
type fakeBackend struct {
	ingestion.UnimplementedInternalAuthServiceServer
	valid    map[string]bool
	failCode codes.Code
	hold     chan struct{}
	calls    atomic.Int32
	keysSeen chan string
}

func (f *fakeBackend) ValidateApiKey(ctx context.Context, req *ingestion.ValidateApiKeyRequest) (*ingestion.ValidateApiKeyResponse, error) {
	f.calls.Add(1)
	select {
	case f.keysSeen <- req.GetApiKey():
	default:
	}
	if f.hold != nil {
		select {
		case <-f.hold:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	if f.failCode != codes.OK {
		return nil, status.Error(f.failCode, "database unavailable")
	}
	return &ingestion.ValidateApiKeyResponse{IsValid: f.valid[req.GetApiKey()]}, nil
}

func serveBackend(t *testing.T, lis net.Listener, backend *fakeBackend) *grpc.Server {
	t.Helper()
	server := grpc.NewServer()
	ingestion.RegisterInternalAuthServiceServer(server, backend)
	go func() { _ = server.Serve(lis) }()
	t.Cleanup(server.Stop)
	return server
}

func startBackend(t *testing.T, backend *fakeBackend) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveBackend(t, lis, backend)
	return lis.Addr().String()
}

func newBackend() *fakeBackend {
	return &fakeBackend{valid: map[string]bool{validKey: true}, keysSeen: make(chan string, 100)}
}

func dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

type publicFixture struct {
	store  *wal.WAL
	trace  coltracepb.TraceServiceClient
	conn   *grpc.ClientConn
	logs   *syncBuffer
	client *Backend
}

// startPublic runs the public server, with a WAL in a temp dir, against the backend at addr.
func startPublic(t *testing.T, backendAddr string) *publicFixture {
	t.Helper()
	logs := &syncBuffer{}
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	store, err := wal.Open(t.TempDir(), logger)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	backend, err := DialBackend(backendAddr, logger)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = backend.Close() })
	server := NewPublicServer(store, backend, logger)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = server.Serve(lis) }()
	t.Cleanup(server.Stop)
	conn := dial(t, lis.Addr().String())
	return &publicFixture{store: store, trace: coltracepb.NewTraceServiceClient(conn), conn: conn, logs: logs, client: backend}
}

func withKey(key string) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), APIKeyHeader, key)
}

func stringValue(s string) *commonpb.AnyValue {
	return &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: s}}
}

// exportRequest has two resources: the first with two scopes of one span each, the second with one span.
func exportRequest() *coltracepb.ExportTraceServiceRequest {
	resource := func(name string) *resourcepb.Resource {
		return &resourcepb.Resource{Attributes: []*commonpb.KeyValue{{Key: "service.name", Value: stringValue(name)}}}
	}
	span := func(name string) *tracepb.Span {
		return &tracepb.Span{TraceId: bytes.Repeat([]byte{1}, 16), SpanId: bytes.Repeat([]byte{2}, 8), Name: name}
	}
	return &coltracepb.ExportTraceServiceRequest{ResourceSpans: []*tracepb.ResourceSpans{
		{Resource: resource("svc-a"), ScopeSpans: []*tracepb.ScopeSpans{
			{Spans: []*tracepb.Span{span("a1")}},
			{Spans: []*tracepb.Span{span("a2")}},
		}},
		{Resource: resource("svc-b"), ScopeSpans: []*tracepb.ScopeSpans{{Spans: []*tracepb.Span{span("b1")}}}},
	}}
}

func readRecords(t *testing.T, store *wal.WAL) []wal.Record {
	t.Helper()
	var records []wal.Record
	if _, err := store.Read(nil, 1000, func(r wal.Record) error {
		records = append(records, r)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return records
}

func assertCode(t *testing.T, err error, code codes.Code, message string) {
	t.Helper()
	if status.Code(err) != code || (message != "" && status.Convert(err).Message() != message) {
		t.Fatalf("got %v, want %v %q", err, code, message)
	}
}

func TestAValidKeyIsAcceptedAndEverySpanIsWrittenWithItsResource(t *testing.T) {
	backend := newBackend()
	p := startPublic(t, startBackend(t, backend))
	if _, err := p.trace.Export(withKey(validKey), exportRequest()); err != nil {
		t.Fatal(err)
	}
	records := readRecords(t, p.store)
	want := []struct{ span, service string }{{"a1", "svc-a"}, {"a2", "svc-a"}, {"b1", "svc-b"}}
	if len(records) != len(want) {
		t.Fatalf("%d WAL entries, want %d", len(records), len(want))
	}
	for i, r := range records {
		var span tracepb.Span
		var resource resourcepb.Resource
		if err := proto.Unmarshal(r.SpanBytes, &span); err != nil {
			t.Fatal(err)
		}
		if err := proto.Unmarshal(r.ResourceBytes, &resource); err != nil {
			t.Fatal(err)
		}
		if span.GetName() != want[i].span || resource.GetAttributes()[0].GetValue().GetStringValue() != want[i].service {
			t.Fatalf("entry %d: span %q of %v, want %+v", i, span.GetName(), &resource, want[i])
		}
	}
	if strings.Contains(p.logs.String(), validKey) {
		t.Fatal("the API key appears in the log")
	}
}

func TestValidKeysAreCachedSoTheBackendIsAskedOnce(t *testing.T) {
	backend := newBackend()
	p := startPublic(t, startBackend(t, backend))
	for range 3 {
		if _, err := p.trace.Export(withKey(validKey), exportRequest()); err != nil {
			t.Fatal(err)
		}
	}
	if n := backend.calls.Load(); n != 1 {
		t.Fatalf("backend called %d times, want 1", n)
	}
}

func TestAnUnknownKeyIsUnauthenticatedAndNeverCached(t *testing.T) {
	backend := newBackend()
	p := startPublic(t, startBackend(t, backend))
	for range 3 {
		_, err := p.trace.Export(withKey("not-a-key"), exportRequest())
		assertCode(t, err, codes.Unauthenticated, "invalid API key")
	}
	if n := backend.calls.Load(); n != 3 {
		t.Fatalf("backend called %d times, want 3", n)
	}
	if got := <-backend.keysSeen; got != "not-a-key" {
		t.Fatalf("backend saw key %q", got)
	}
	if len(readRecords(t, p.store)) != 0 {
		t.Fatal("a rejected export wrote to the WAL")
	}
	if strings.Contains(p.logs.String(), "not-a-key") {
		t.Fatal("the API key appears in the log")
	}
}

func TestAMissingKeyIsUnauthenticatedWithoutAskingTheBackend(t *testing.T) {
	backend := newBackend()
	p := startPublic(t, startBackend(t, backend))
	_, err := p.trace.Export(context.Background(), exportRequest())
	assertCode(t, err, codes.Unauthenticated, "")
	_, err = p.trace.Export(metadata.AppendToOutgoingContext(context.Background(), "other-header", "x"), exportRequest())
	assertCode(t, err, codes.Unauthenticated, "")
	if n := backend.calls.Load(); n != 0 {
		t.Fatalf("backend called %d times, want 0", n)
	}
}

func TestABackendErrorIsInternal(t *testing.T) {
	backend := newBackend()
	backend.failCode = codes.Internal
	p := startPublic(t, startBackend(t, backend))
	_, err := p.trace.Export(withKey(validKey), exportRequest())
	assertCode(t, err, codes.Internal, "failed to validate API key")
}

func TestABackendThatIsDownIsInternalAfterTheDeadline(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	_ = lis.Close() // nothing listens there now
	p := startPublic(t, addr)
	p.client.deadline = 300 * time.Millisecond // the 5 s of the contract, shortened for the test
	_, err = p.trace.Export(withKey(validKey), exportRequest())
	assertCode(t, err, codes.Internal, "failed to validate API key")

	// The backend comes back on the same address: the next call gets through.
	lis, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("port %s was taken meanwhile: %v", addr, err)
	}
	serveBackend(t, lis, newBackend())
	p.client.deadline = ValidationDeadline
	if _, err := p.trace.Export(withKey(validKey), exportRequest()); err != nil {
		t.Fatal(err)
	}
}

func TestMetricsAndLogsAreAcceptedWithAKey(t *testing.T) {
	p := startPublic(t, startBackend(t, newBackend()))
	if _, err := colmetricspb.NewMetricsServiceClient(p.conn).Export(withKey(validKey), &colmetricspb.ExportMetricsServiceRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := collogspb.NewLogsServiceClient(p.conn).Export(withKey(validKey), &collogspb.ExportLogsServiceRequest{}); err != nil {
		t.Fatal(err)
	}
	_, err := collogspb.NewLogsServiceClient(p.conn).Export(context.Background(), &collogspb.ExportLogsServiceRequest{})
	assertCode(t, err, codes.Unauthenticated, "")
}

func TestAWriteErrorIsLoggedAndTheExportStillSucceeds(t *testing.T) {
	p := startPublic(t, startBackend(t, newBackend()))
	// A closed WAL refuses every write: the one way to make BadgerDB fail on demand.
	if err := p.store.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := p.trace.Export(withKey(validKey), exportRequest()); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(p.logs.String(), "could not write span") {
		t.Fatal("the write error was not logged")
	}
}

func TestWaitUntilReadyBlocksUntilTheBackendAnswers(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	_ = lis.Close()
	client, err := DialBackend(addr, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close() //nolint:errcheck
	done := make(chan error, 1)
	go func() { done <- client.WaitUntilReady(context.Background()) }()

	select {
	case err := <-done:
		t.Fatalf("returned before the backend was up: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	lis, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("port %s was taken meanwhile: %v", addr, err)
	}
	backend := newBackend()
	serveBackend(t, lis, backend)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := <-backend.keysSeen; got != ReadinessCheckKey {
		t.Fatalf("readiness check sent %q", got)
	}
}

func TestWaitUntilReadyEndsWithItsContext(t *testing.T) {
	client, err := DialBackend("127.0.0.1:1", slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close() //nolint:errcheck
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := client.WaitUntilReady(ctx); err == nil {
		t.Fatal("no error from a cancelled wait")
	}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close() //nolint:errcheck
	return lis.Addr().String()
}

func TestRunServesBothServersAndClosesTheWALOnShutdown(t *testing.T) {
	cfg := Config{
		PublicAddr:   freeAddr(t),
		InternalAddr: freeAddr(t),
		BackendAddr:  startBackend(t, newBackend()),
		WALPath:      t.TempDir(),
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// The calls below wait for the servers (WaitForReady); calls ends them at once if Run
	// returns before serving, so that the test fails instead of hanging.
	calls, endCalls := context.WithCancel(context.Background())
	defer endCalls()
	done := make(chan error, 1)
	go func() {
		err := Run(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
		endCalls()
		done <- err
	}()
	runEnded := func() string {
		select {
		case err := <-done:
			return fmt.Sprintf(" (Run returned %v)", err)
		default:
			return ""
		}
	}

	internal := dial(t, cfg.InternalAddr)
	healthClient := healthpb.NewHealthClient(internal)
	health, err := healthClient.Check(calls, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	if err != nil || health.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v %v%s", health, err, runEnded())
	}
	_, err = healthClient.Check(calls, &healthpb.HealthCheckRequest{Service: ingestion.InternalIngestionService_ServiceDesc.ServiceName})
	assertCode(t, err, codes.NotFound, "")
	trace := coltracepb.NewTraceServiceClient(dial(t, cfg.PublicAddr))
	exportCtx := metadata.AppendToOutgoingContext(calls, APIKeyHeader, validKey)
	if _, err := trace.Export(exportCtx, exportRequest(), grpc.WaitForReady(true)); err != nil {
		t.Fatalf("export: %v%s", err, runEnded())
	}
	stream, err := ingestion.NewInternalIngestionServiceClient(internal).ReadSpans(calls, &ingestion.ReadSpansRequest{BatchSize: 2})
	if err != nil {
		t.Fatal(err)
	}
	var got int
	for {
		_, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got++
	}
	if got != 2 {
		t.Fatalf("ReadSpans(batch 2) streamed %d", got)
	}

	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// Run closed the WAL: it opens again (BadgerDB locks an open directory) with every entry.
	store, err := wal.Open(cfg.WALPath, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close() //nolint:errcheck
	if n := len(readRecords(t, store)); n != 3 {
		t.Fatalf("%d entries after restart, want 3", n)
	}
}

func TestRunListensOnlyOnceTheBackendAnswersAndStopsCleanlyWhileWaiting(t *testing.T) {
	backend := newBackend()
	backend.hold = make(chan struct{}) // never closed: the readiness check gets no answer
	cfg := Config{PublicAddr: freeAddr(t), InternalAddr: freeAddr(t), BackendAddr: startBackend(t, backend), WALPath: t.TempDir()}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, nil))) }()

	// The readiness check has reached the backend and is unanswered: Run is inside its wait.
	if got := <-backend.keysSeen; got != ReadinessCheckKey {
		t.Fatalf("readiness check sent %q", got)
	}
	for _, addr := range []string{cfg.PublicAddr, cfg.InternalAddr} {
		if conn, err := net.Dial("tcp", addr); err == nil {
			_ = conn.Close()
			t.Fatalf("%s accepts connections before the backend answered", addr)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestConfigFromEnv(t *testing.T) {
	env := map[string]string{}
	getenv := func(k string) string { return env[k] }
	env["BADGERDB_PATH"] = "/wal"
	cfg, err := ConfigFromEnv(getenv)
	if err != nil {
		t.Fatal(err)
	}
	if cfg != (Config{PublicAddr: ":50051", InternalAddr: ":50052", BackendAddr: "junjo-server-backend:50053", WALPath: "/wal"}) {
		t.Fatalf("defaults: %+v", cfg)
	}
	env = map[string]string{"GRPC_PORT": "1", "INTERNAL_GRPC_PORT": "2", "BACKEND_GRPC_ADDRESS": "127.0.0.1:3", "LISTEN_HOST": "127.0.0.1", "BADGERDB_PATH": "/w"}
	cfg, err = ConfigFromEnv(getenv)
	if err != nil {
		t.Fatal(err)
	}
	if cfg != (Config{PublicAddr: "127.0.0.1:1", InternalAddr: "127.0.0.1:2", BackendAddr: "127.0.0.1:3", WALPath: "/w"}) {
		t.Fatalf("overrides: %+v", cfg)
	}
	env = map[string]string{"GRPC_PORT": "http"}
	if _, err := ConfigFromEnv(getenv); err == nil {
		t.Fatal("a bad port was accepted")
	}
}
