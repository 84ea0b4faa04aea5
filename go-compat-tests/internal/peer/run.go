package peer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"

	collogspb "go.opentelemetry.io/proto/otlp/collector/logs/v1"
	colmetricspb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	"github.com/junjo-backend/go-compat-tests/internal/wal"
	"github.com/junjo-backend/go-compat-tests/internal/wire/ingestion"
)

// NewPublicServer is the OTLP server: trace, metrics and logs services behind the API-key
// interceptor, plus reflection.
func NewPublicServer(store *wal.WAL, validator KeyValidator, logger *slog.Logger) *grpc.Server {
	server := grpc.NewServer(grpc.UnaryInterceptor(APIKeyInterceptor(validator, NewKeyCache(), logger)))
	coltracepb.RegisterTraceServiceServer(server, &TraceService{wal: store, log: logger})
	colmetricspb.RegisterMetricsServiceServer(server, &MetricsService{log: logger})
	collogspb.RegisterLogsServiceServer(server, &LogsService{log: logger})
	reflection.Register(server)
	return server
}

// NewInternalServer is the backend-facing server: ReadSpans, grpc.health.v1 and reflection.
func NewInternalServer(store *wal.WAL, logger *slog.Logger) *grpc.Server {
	server := grpc.NewServer()
	ingestion.RegisterInternalIngestionServiceServer(server, &ReaderService{wal: store, log: logger})
	// Only the server-wide status ("", SERVING by default) that grpc_health_probe checks: the
	// contract promises nothing for a named service, so a check naming one gets NOT_FOUND
	// rather than an answer the deployed service may not give.
	healthpb.RegisterHealthServer(server, health.NewServer())
	reflection.Register(server)
	return server
}

// Run is the whole service: open the WAL, wait for the backend, serve both servers until
// ctx ends, then stop them gracefully and sync and close the WAL. A ctx that ends during
// the readiness wait ends Run cleanly (the deployed service cannot be interrupted there).
func Run(ctx context.Context, cfg Config, logger *slog.Logger) (err error) {
	store, err := wal.Open(cfg.WALPath, logger)
	if err != nil {
		return err
	}
	logger.Info("WAL open", "path", cfg.WALPath)
	defer func() { err = errors.Join(err, closeWAL(store, logger)) }()

	backend, err := DialBackend(cfg.BackendAddr, logger)
	if err != nil {
		return err
	}
	defer backend.Close() //nolint:errcheck // closing a client connection on the way out

	if err := backend.WaitUntilReady(ctx); err != nil {
		if ctx.Err() != nil {
			logger.Info("stopped while waiting for the backend")
			return nil
		}
		return err
	}

	// Both servers listen only once the backend is known to answer, as in the deployed service.
	var lc net.ListenConfig
	publicLis, err := lc.Listen(ctx, "tcp", cfg.PublicAddr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", cfg.PublicAddr, err)
	}
	internalLis, err := lc.Listen(ctx, "tcp", cfg.InternalAddr)
	if err != nil {
		_ = publicLis.Close()
		return fmt.Errorf("listen %s: %w", cfg.InternalAddr, err)
	}
	public := NewPublicServer(store, backend, logger)
	internal := NewInternalServer(store, logger)

	serveErrs := make(chan error, 2)
	var serving sync.WaitGroup
	for _, s := range []struct {
		name   string
		server *grpc.Server
		lis    net.Listener
	}{{"public", public, publicLis}, {"internal", internal, internalLis}} {
		serving.Add(1)
		go func() {
			defer serving.Done()
			logger.Info("serving", "server", s.name, "address", s.lis.Addr().String())
			if err := s.server.Serve(s.lis); err != nil {
				serveErrs <- fmt.Errorf("%s server: %w", s.name, err)
			}
		}()
	}

	select {
	case <-ctx.Done():
		logger.Info("shutting down: graceful stop of both servers")
	case err = <-serveErrs:
		logger.Error("a server failed; shutting down", "error", err)
	}
	public.GracefulStop()
	internal.GracefulStop()
	serving.Wait()
	logger.Info("servers stopped")
	return err
}

func closeWAL(store *wal.WAL, logger *slog.Logger) error {
	syncErr := store.Sync()
	if syncErr != nil {
		logger.Warn("WAL sync failed; closing anyway", "error", syncErr)
	} else {
		logger.Info("WAL synced")
	}
	if err := store.Close(); err != nil {
		return errors.Join(syncErr, err)
	}
	logger.Info("WAL closed")
	return syncErr
}
