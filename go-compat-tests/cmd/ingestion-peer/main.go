// Command ingestion-peer is a faithful stand-in for the Go ingestion-service, configured by
// GRPC_PORT, INTERNAL_GRPC_PORT, BACKEND_GRPC_ADDRESS, BADGERDB_PATH and LISTEN_HOST.
package main

import (
	"context"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/junjo-backend/go-compat-tests/internal/peer"
)

func main() {
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: logLevel()}))
	cfg, err := peer.ConfigFromEnv(os.Getenv)
	if err != nil {
		logger.Error("bad configuration", "error", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	logger.Info("starting ingestion peer", "public", cfg.PublicAddr, "internal", cfg.InternalAddr, "backend", cfg.BackendAddr, "wal", cfg.WALPath)
	if err := peer.Run(ctx, cfg, logger); err != nil {
		logger.Error("ingestion peer failed", "error", err)
		os.Exit(1)
	}
	logger.Info("ingestion peer stopped")
}

// logLevel reads LOG_LEVEL (debug, info, warn, error); info when unset or unknown.
func logLevel() slog.Level {
	var level slog.Level
	if err := level.UnmarshalText([]byte(os.Getenv("LOG_LEVEL"))); err != nil {
		return slog.LevelInfo
	}
	return level
}
