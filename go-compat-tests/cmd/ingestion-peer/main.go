// Command ingestion-peer is a faithful stand-in for the Go ingestion-service, configured by
// GRPC_PORT, INTERNAL_GRPC_PORT, BACKEND_GRPC_ADDRESS, BADGERDB_PATH and LISTEN_HOST.
//
// With -healthcheck it serves nothing: it probes its own internal port's grpc.health.v1
// and exits 0 when SERVING, 1 otherwise (the image is FROM scratch, so a container health
// check has no other program to run). -addr=HOST:PORT probes that address instead; the
// flag is grpc_health_probe's, so one compose health check fits this image and the
// published one.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/junjo-backend/go-compat-tests/internal/peer"
)

func main() {
	healthcheck := flag.Bool("healthcheck", false, "probe this peer's internal grpc.health.v1 (INTERNAL_GRPC_PORT) and exit: 0 when SERVING, else 1")
	addr := flag.String("addr", "", "probe grpc.health.v1 at this address and exit (as grpc_health_probe -addr does)")
	flag.Parse()

	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: logLevel()}))
	cfg, err := peer.ConfigFromEnv(os.Getenv)
	if err != nil {
		logger.Error("bad configuration", "error", err)
		os.Exit(2)
	}
	if *healthcheck || *addr != "" {
		os.Exit(probe(cfg, *addr))
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

// probe runs one health check and returns the exit status; one line on stdout or stderr
// says what it found (docker keeps it in the container's health log).
func probe(cfg peer.Config, addr string) int {
	if addr == "" {
		var err error
		if addr, err = healthProbeAddr(cfg.InternalAddr); err != nil {
			fmt.Fprintln(os.Stderr, "healthcheck:", err)
			return 1
		}
	}
	addr = withoutLocalhost(addr)
	if err := probeHealth(context.Background(), addr); err != nil {
		fmt.Fprintln(os.Stderr, "healthcheck:", err)
		return 1
	}
	fmt.Println("healthcheck:", addr, "SERVING")
	return 0
}

// logLevel reads LOG_LEVEL (debug, info, warn, error); info when unset or unknown.
func logLevel() slog.Level {
	var level slog.Level
	if err := level.UnmarshalText([]byte(os.Getenv("LOG_LEVEL"))); err != nil {
		return slog.LevelInfo
	}
	return level
}
