package main

import (
	"context"
	"net"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// healthServer is a real grpc.health.v1 server on a loopback port, stopped with the test.
func healthServer(t *testing.T) (string, *health.Server) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	status := health.NewServer()
	healthpb.RegisterHealthServer(server, status)
	go func() { _ = server.Serve(lis) }()
	t.Cleanup(server.Stop)
	return lis.Addr().String(), status
}

func TestProbeHealthServing(t *testing.T) {
	addr, _ := healthServer(t)
	if err := probeHealth(context.Background(), addr); err != nil {
		t.Fatalf("a SERVING server failed the probe: %v", err)
	}
}

func TestProbeHealthNotServing(t *testing.T) {
	addr, status := healthServer(t)
	status.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	err := probeHealth(context.Background(), addr)
	if err == nil || !strings.Contains(err.Error(), "NOT_SERVING") {
		t.Fatalf("a NOT_SERVING server: want an error naming the status, got %v", err)
	}
}

func TestProbeHealthNothingListening(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	_ = lis.Close()
	if err := probeHealth(context.Background(), addr); err == nil {
		t.Fatal("a closed port passed the probe")
	}
}

func TestHealthProbeAddr(t *testing.T) {
	for listen, want := range map[string]string{
		":50052":          "127.0.0.1:50052",
		"0.0.0.0:50052":   "127.0.0.1:50052",
		"[::]:50052":      "127.0.0.1:50052",
		"127.0.0.1:41000": "127.0.0.1:41000",
		"10.1.2.3:50052":  "10.1.2.3:50052",
	} {
		got, err := healthProbeAddr(listen)
		if err != nil || got != want {
			t.Errorf("InternalAddr %q: got %q, %v; want %q", listen, got, err, want)
		}
	}
	if _, err := healthProbeAddr("no-port"); err == nil {
		t.Error("an address without a port: want an error")
	}
}

func TestWithoutLocalhost(t *testing.T) {
	for addr, want := range map[string]string{
		"localhost:50052": "127.0.0.1:50052",
		"LocalHost:50052": "127.0.0.1:50052",
		"127.0.0.1:50052": "127.0.0.1:50052",
		"[::1]:50052":     "[::1]:50052",
		"ingestion:50052": "ingestion:50052",
		"no-port":         "no-port",
	} {
		if got := withoutLocalhost(addr); got != want {
			t.Errorf("withoutLocalhost(%q) = %q, want %q", addr, got, want)
		}
	}
}
