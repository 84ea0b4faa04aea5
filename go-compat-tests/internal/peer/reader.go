package peer

import (
	"encoding/hex"
	"log/slog"

	"google.golang.org/grpc"

	"github.com/junjo-backend/go-compat-tests/internal/wal"
	"github.com/junjo-backend/go-compat-tests/internal/wire/ingestion"
)

// ReaderService serves ReadSpans from the WAL.
type ReaderService struct {
	ingestion.UnimplementedInternalIngestionServiceServer
	wal *wal.WAL
	log *slog.Logger
}

// ReadSpans streams at most batch_size entries after start_key_ulid, then ends with OK.
func (s *ReaderService) ReadSpans(req *ingestion.ReadSpansRequest, stream grpc.ServerStreamingServer[ingestion.ReadSpansResponse]) error {
	stats, err := s.wal.Read(req.GetStartKeyUlid(), req.GetBatchSize(), func(r wal.Record) error {
		return stream.Send(&ingestion.ReadSpansResponse{KeyUlid: r.Key, SpanBytes: r.SpanBytes, ResourceBytes: r.ResourceBytes})
	})
	if err != nil {
		s.log.Error("ReadSpans failed", "error", err, "sent", stats.Sent)
		return err
	}
	s.log.Debug("ReadSpans", "start_key", hex.EncodeToString(req.GetStartKeyUlid()), "batch_size", req.GetBatchSize(), "sent", stats.Sent, "skipped", stats.Skipped)
	return nil
}
