package peer

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/hashicorp/golang-lru/v2/expirable"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/junjo-backend/go-compat-tests/internal/wire/ingestion"
)

// The interceptor's contract with the backend.
const (
	APIKeyHeader       = "x-junjo-api-key"
	ReadinessCheckKey  = "startup-readiness-check"
	ValidationDeadline = 5 * time.Second
	KeyCacheSize       = 10_000
	KeyCacheTTL        = time.Hour
)

// KeyValidator answers whether an API key is valid; an error means no answer.
type KeyValidator interface {
	ValidateAPIKey(ctx context.Context, key string) (bool, error)
}

// Backend is the client of the backend's InternalAuthService.
type Backend struct {
	conn     *grpc.ClientConn
	client   ingestion.InternalAuthServiceClient
	deadline time.Duration
	log      *slog.Logger
}

// DialBackend creates the (lazy, self-reconnecting) insecure connection to the backend.
func DialBackend(addr string, logger *slog.Logger) (*Backend, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("backend client for %s: %w", addr, err)
	}
	return &Backend{
		conn:     conn,
		client:   ingestion.NewInternalAuthServiceClient(conn),
		deadline: ValidationDeadline,
		log:      logger,
	}, nil
}

// ValidateAPIKey asks the backend, waiting for a connection but never past the deadline.
func (b *Backend) ValidateAPIKey(ctx context.Context, key string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, b.deadline)
	defer cancel()
	resp, err := b.client.ValidateApiKey(ctx, &ingestion.ValidateApiKeyRequest{ApiKey: key}, grpc.WaitForReady(true))
	if err != nil {
		return false, fmt.Errorf("backend validation failed: %w", err)
	}
	return resp.GetIsValid(), nil
}

// WaitUntilReady blocks, with no deadline of its own, until the backend answers one
// ValidateApiKey call with the readiness-check key; only ctx ends the wait early.
func (b *Backend) WaitUntilReady(ctx context.Context) error {
	b.log.Info("waiting for the backend to answer the readiness check", "backend", b.conn.Target())
	if _, err := b.client.ValidateApiKey(ctx, &ingestion.ValidateApiKeyRequest{ApiKey: ReadinessCheckKey}, grpc.WaitForReady(true)); err != nil {
		return fmt.Errorf("backend did not become ready: %w", err)
	}
	b.log.Info("backend is ready", "backend", b.conn.Target())
	return nil
}

// Close closes the connection.
func (b *Backend) Close() error { return b.conn.Close() }

// NewKeyCache is the cache of keys the backend said were valid: 10,000 entries, each
// forgotten one hour after it was written.
func NewKeyCache() *expirable.LRU[string, struct{}] {
	return expirable.NewLRU[string, struct{}](KeyCacheSize, nil, KeyCacheTTL)
}

// APIKeyInterceptor authenticates every unary call by its x-junjo-api-key metadata. Only
// valid keys are cached, so every call with a bad key reaches the backend. Key material
// is never logged.
func APIKeyInterceptor(validator KeyValidator, cache *expirable.LRU[string, struct{}], logger *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		md, ok := metadata.FromIncomingContext(ctx)
		if !ok {
			logger.Warn("rejected: no metadata", "method", info.FullMethod)
			return nil, status.Error(codes.Unauthenticated, "metadata is not provided")
		}
		values := md.Get(APIKeyHeader)
		if len(values) == 0 {
			logger.Warn("rejected: no API key", "method", info.FullMethod)
			return nil, status.Error(codes.Unauthenticated, APIKeyHeader+" is not provided")
		}
		key := values[0]
		if _, hit := cache.Get(key); hit {
			return handler(ctx, req)
		}
		valid, err := validator.ValidateAPIKey(ctx, key)
		if err != nil {
			logger.Error("rejected: the backend did not validate the API key", "method", info.FullMethod, "error", err)
			return nil, status.Error(codes.Internal, "failed to validate API key")
		}
		if !valid {
			logger.Warn("rejected: invalid API key", "method", info.FullMethod)
			return nil, status.Error(codes.Unauthenticated, "invalid API key")
		}
		cache.Add(key, struct{}{})
		return handler(ctx, req)
	}
}
