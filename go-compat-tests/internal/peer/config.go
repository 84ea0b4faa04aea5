// Package peer is a stand-in for the Go ingestion-service: the public OTLP server with its
// API-key interceptor, the WAL, and the internal ReadSpans server, wired as the deployed
// service wires them (see docs/go-contract.md).
package peer

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
)

// Config is what the peer reads from its environment.
type Config struct {
	PublicAddr   string // OTLP server, ":" + GRPC_PORT
	InternalAddr string // ReadSpans + health, ":" + INTERNAL_GRPC_PORT
	BackendAddr  string // the backend's InternalAuthService
	WALPath      string // BadgerDB directory
}

// Defaults of the deployed service.
const (
	DefaultPublicPort   = "50051"
	DefaultInternalPort = "50052"
	// The deployed image dials this fixed address; the peer lets BACKEND_GRPC_ADDRESS override it.
	DefaultBackendAddr = "junjo-server-backend:50053"
)

// ConfigFromEnv reads GRPC_PORT, INTERNAL_GRPC_PORT, BACKEND_GRPC_ADDRESS, BADGERDB_PATH
// and LISTEN_HOST (empty: every interface, as the deployed service listens).
func ConfigFromEnv(getenv func(string) string) (Config, error) {
	publicPort, err := port(getenv, "GRPC_PORT", DefaultPublicPort)
	if err != nil {
		return Config{}, err
	}
	internalPort, err := port(getenv, "INTERNAL_GRPC_PORT", DefaultInternalPort)
	if err != nil {
		return Config{}, err
	}
	host := getenv("LISTEN_HOST")
	cfg := Config{
		PublicAddr:   net.JoinHostPort(host, publicPort),
		InternalAddr: net.JoinHostPort(host, internalPort),
		BackendAddr:  getenv("BACKEND_GRPC_ADDRESS"),
		WALPath:      getenv("BADGERDB_PATH"),
	}
	if cfg.BackendAddr == "" {
		cfg.BackendAddr = DefaultBackendAddr
	}
	if cfg.WALPath == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return Config{}, fmt.Errorf("BADGERDB_PATH is not set and there is no home directory: %w", err)
		}
		cfg.WALPath = filepath.Join(home, ".junjo", "ingestion-wal")
	}
	return cfg, nil
}

func port(getenv func(string) string, name, fallback string) (string, error) {
	value := getenv(name)
	if value == "" {
		return fallback, nil
	}
	if n, err := strconv.Atoi(value); err != nil || n < 0 || n > 65535 {
		return "", fmt.Errorf("%s=%q is not a port number", name, value)
	}
	return value, nil
}
