package peer

import (
	"context"
	"log/slog"

	collogspb "go.opentelemetry.io/proto/otlp/collector/logs/v1"
	colmetricspb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"

	"github.com/junjo-backend/go-compat-tests/internal/wal"
)

// TraceService is the OTLP trace receiver: one WAL entry per span, each with its resource.
type TraceService struct {
	coltracepb.UnimplementedTraceServiceServer
	wal *wal.WAL
	log *slog.Logger
}

// Export writes every span of the request. A span that cannot be written is logged and
// skipped; the client still gets success, as from the deployed service.
func (s *TraceService) Export(_ context.Context, req *coltracepb.ExportTraceServiceRequest) (*coltracepb.ExportTraceServiceResponse, error) {
	var written, failed int
	for _, resourceSpans := range req.GetResourceSpans() {
		for _, scopeSpans := range resourceSpans.GetScopeSpans() {
			for _, span := range scopeSpans.GetSpans() {
				if _, err := s.wal.WriteSpan(span, resourceSpans.GetResource()); err != nil {
					failed++
					s.log.Error("could not write span to the WAL; skipped", "error", err)
					continue
				}
				written++
			}
		}
	}
	s.log.Debug("export", "spans_written", written, "spans_failed", failed)
	return &coltracepb.ExportTraceServiceResponse{}, nil
}

// MetricsService accepts OTLP metrics and only logs them.
type MetricsService struct {
	colmetricspb.UnimplementedMetricsServiceServer
	log *slog.Logger
}

// Export logs how many resource metrics arrived.
func (s *MetricsService) Export(_ context.Context, req *colmetricspb.ExportMetricsServiceRequest) (*colmetricspb.ExportMetricsServiceResponse, error) {
	s.log.Info("metrics received (not stored)", "resource_metrics", len(req.GetResourceMetrics()))
	return &colmetricspb.ExportMetricsServiceResponse{}, nil
}

// LogsService accepts OTLP logs and only logs them.
type LogsService struct {
	collogspb.UnimplementedLogsServiceServer
	log *slog.Logger
}

// Export logs how many resource logs arrived.
func (s *LogsService) Export(_ context.Context, req *collogspb.ExportLogsServiceRequest) (*collogspb.ExportLogsServiceResponse, error) {
	s.log.Info("logs received (not stored)", "resource_logs", len(req.GetResourceLogs()))
	return &collogspb.ExportLogsServiceResponse{}, nil
}
