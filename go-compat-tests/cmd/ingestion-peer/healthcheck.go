package main

import (
	"context"
	"fmt"
	"net"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// healthProbeTimeout bounds one probe: connection and Check together. A container health
// check has its own timeout (5 s in the image); this one ends first, so the probe reports why.
const healthProbeTimeout = 3 * time.Second

// healthProbeAddr is where a probe inside the container reaches the internal server
// listening on internalAddr: its port on loopback when the peer listens on every interface
// (LISTEN_HOST empty or a wildcard), else the host it listens on.
func healthProbeAddr(internalAddr string) (string, error) {
	host, port, err := net.SplitHostPort(internalAddr)
	if err != nil {
		return "", fmt.Errorf("internal address %q: %w", internalAddr, err)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port), nil
}

// withoutLocalhost spells a probe address on "localhost" (grpc_health_probe's usual
// -addr=localhost:PORT) as 127.0.0.1. This image is FROM scratch: with no
// /etc/nsswitch.conf, Go asks DNS before /etc/hosts, and on a compose network Docker's DNS
// forwards "localhost" to resolvers that, without internet, never answer; the probe then
// timed out every time, and the container stayed unhealthy.
func withoutLocalhost(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || !strings.EqualFold(host, "localhost") {
		return addr
	}
	return net.JoinHostPort("127.0.0.1", port)
}

// probeHealth asks grpc.health.v1 at addr for the server-wide status (what
// grpc_health_probe checks); nil only for SERVING. It never waits for a server that is not
// listening: a refused connection fails at once.
func probeHealth(ctx context.Context, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, healthProbeTimeout)
	defer cancel()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("health probe client for %s: %w", addr, err)
	}
	defer conn.Close() //nolint:errcheck // closing a client connection on the way out
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return fmt.Errorf("health check of %s failed: %w", addr, err)
	}
	if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("health check of %s: status %s", addr, resp.GetStatus())
	}
	return nil
}
