// Package wal is the ingestion-service's write-ahead log: a BadgerDB whose keys are the
// 16 raw bytes of a monotonic ULID and whose values are serialized SpanDataContainer
// messages (OTLP Span bytes and OTLP Resource bytes).
package wal

import (
	"crypto/rand"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	badger "github.com/dgraph-io/badger/v4"
	"github.com/oklog/ulid/v2"
	resourcepb "go.opentelemetry.io/proto/otlp/resource/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"

	"github.com/junjo-backend/go-compat-tests/internal/wire/spandata"
)

// keys is the one process-wide key generator: every writer in the process takes its keys
// from it, so keys are strictly increasing in insertion order.
var keys = &keyGenerator{entropy: ulid.Monotonic(rand.Reader, 0)}

type keyGenerator struct {
	mu      sync.Mutex
	entropy *ulid.MonotonicEntropy
	lastMs  uint64
}

// next returns a new ULID greater than every ULID returned before it. A wall clock that
// steps back is clamped to the last timestamp used, so the order survives it.
func (g *keyGenerator) next() (ulid.ULID, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	ms := ulid.Timestamp(time.Now())
	if ms < g.lastMs {
		ms = g.lastMs
	}
	id, err := ulid.New(ms, g.entropy)
	if err != nil {
		return ulid.ULID{}, fmt.Errorf("new WAL key: %w", err)
	}
	g.lastMs = ms
	return id, nil
}

// NewKey returns the next WAL key from the process-wide generator.
func NewKey() (ulid.ULID, error) { return keys.next() }

// Record is one WAL entry as ReadSpans serves it.
type Record struct {
	Key           []byte
	SpanBytes     []byte
	ResourceBytes []byte
}

// ReadStats says what one Read did.
type ReadStats struct {
	Sent    uint32 // records handed to the send function
	Skipped uint32 // entries that failed to decode (they count toward the batch size)
}

// WAL is an open BadgerDB write-ahead log.
type WAL struct {
	db  *badger.DB
	log *slog.Logger
}

// Open opens (creating it if needed) the WAL in the directory path.
func Open(path string, logger *slog.Logger) (*WAL, error) {
	if err := os.MkdirAll(path, 0o755); err != nil {
		return nil, fmt.Errorf("create WAL directory %s: %w", path, err)
	}
	opts := badger.DefaultOptions(path).WithLogger(badgerLogger{logger}).WithLoggingLevel(badger.WARNING)
	db, err := badger.Open(opts)
	if err != nil {
		return nil, fmt.Errorf("open WAL %s: %w", path, err)
	}
	return &WAL{db: db, log: logger}, nil
}

// EncodeValue serializes a span and its resource as the WAL value (a SpanDataContainer).
func EncodeValue(span *tracepb.Span, resource *resourcepb.Resource) ([]byte, error) {
	spanBytes, err := proto.Marshal(span)
	if err != nil {
		return nil, fmt.Errorf("marshal span: %w", err)
	}
	// A nil resource marshals to no bytes, which decodes back to an empty Resource.
	resourceBytes, err := proto.Marshal(resource)
	if err != nil {
		return nil, fmt.Errorf("marshal resource: %w", err)
	}
	return ContainerValue(spanBytes, resourceBytes)
}

// ContainerValue wraps already-serialized span and resource bytes as a WAL value.
func ContainerValue(spanBytes, resourceBytes []byte) ([]byte, error) {
	value, err := proto.Marshal(&spandata.SpanDataContainer{SpanBytes: spanBytes, ResourceBytes: resourceBytes})
	if err != nil {
		return nil, fmt.Errorf("marshal span data container: %w", err)
	}
	return value, nil
}

// WriteSpan stores one span with its resource under a new key and returns the key.
func (w *WAL) WriteSpan(span *tracepb.Span, resource *resourcepb.Resource) (ulid.ULID, error) {
	value, err := EncodeValue(span, resource)
	if err != nil {
		return ulid.ULID{}, err
	}
	key, err := NewKey()
	if err != nil {
		return ulid.ULID{}, err
	}
	if err := w.Put(key[:], value); err != nil {
		return ulid.ULID{}, err
	}
	return key, nil
}

// Put stores a raw value under a raw key. The ingestion path uses WriteSpan; Put exists
// so tests and the seeding tool can write entries the ingestion path never would.
func (w *WAL) Put(key, value []byte) error {
	if err := w.db.Update(func(txn *badger.Txn) error { return txn.Set(key, value) }); err != nil {
		return fmt.Errorf("write WAL entry: %w", err)
	}
	return nil
}

// Batch writes many entries with few commits; keys still come from the process-wide generator.
type Batch struct {
	wb *badger.WriteBatch
}

// NewBatch starts a write batch.
func (w *WAL) NewBatch() *Batch { return &Batch{wb: w.db.NewWriteBatch()} }

// Add queues a value (already a serialized SpanDataContainer) under a new key and returns the key.
func (b *Batch) Add(value []byte) (ulid.ULID, error) {
	key, err := NewKey()
	if err != nil {
		return ulid.ULID{}, err
	}
	if err := b.wb.Set(key[:], value); err != nil {
		return ulid.ULID{}, fmt.Errorf("queue WAL entry: %w", err)
	}
	return key, nil
}

// Flush writes everything queued and ends the batch.
func (b *Batch) Flush() error { return b.wb.Flush() }

// Cancel drops the batch; safe after Flush.
func (b *Batch) Cancel() { b.wb.Cancel() }

// Read visits, in one read transaction, at most batchSize entries: from the oldest when
// startKey is empty, otherwise from the first key strictly after startKey (which need not
// exist). Each entry is decoded and its span and resource re-encoded before send sees it;
// an entry that fails to decode is skipped but still counts toward batchSize. An error
// from send ends the read and is returned.
func (w *WAL) Read(startKey []byte, batchSize uint32, send func(Record) error) (ReadStats, error) {
	var stats ReadStats
	if batchSize == 0 {
		return stats, nil
	}
	err := w.db.View(func(txn *badger.Txn) error {
		opts := badger.DefaultIteratorOptions
		opts.PrefetchValues = true
		it := txn.NewIterator(opts)
		defer it.Close()

		if len(startKey) == 0 {
			it.Rewind()
		} else {
			// Keys sort bytewise, so start+0x00 is the smallest key after start.
			seek := make([]byte, len(startKey)+1)
			copy(seek, startKey)
			it.Seek(seek)
		}
		for count := uint32(0); it.Valid() && count < batchSize; it.Next() {
			count++
			item := it.Item()
			value, err := item.ValueCopy(nil)
			if err != nil {
				return fmt.Errorf("read WAL value: %w", err)
			}
			record, err := decode(item.KeyCopy(nil), value)
			if err != nil {
				stats.Skipped++
				w.log.Warn("skipping WAL entry that does not decode", "key", fmt.Sprintf("%x", item.Key()), "error", err)
				continue
			}
			if err := send(record); err != nil {
				return err
			}
			stats.Sent++
		}
		return nil
	})
	return stats, err
}

// decode turns a WAL value into a Record whose span and resource bytes are the canonical
// Go encoding of the decoded messages, as the ingestion-service serves them.
func decode(key, value []byte) (Record, error) {
	var container spandata.SpanDataContainer
	if err := proto.Unmarshal(value, &container); err != nil {
		return Record{}, fmt.Errorf("span data container: %w", err)
	}
	var span tracepb.Span
	if err := proto.Unmarshal(container.GetSpanBytes(), &span); err != nil {
		return Record{}, fmt.Errorf("span: %w", err)
	}
	var resource resourcepb.Resource
	if err := proto.Unmarshal(container.GetResourceBytes(), &resource); err != nil {
		return Record{}, fmt.Errorf("resource: %w", err)
	}
	spanBytes, err := proto.Marshal(&span)
	if err != nil {
		return Record{}, fmt.Errorf("re-encode span: %w", err)
	}
	resourceBytes, err := proto.Marshal(&resource)
	if err != nil {
		return Record{}, fmt.Errorf("re-encode resource: %w", err)
	}
	return Record{Key: key, SpanBytes: spanBytes, ResourceBytes: resourceBytes}, nil
}

// Sync flushes every pending write to disk.
func (w *WAL) Sync() error { return w.db.Sync() }

// Close closes the WAL; it must not be used afterwards.
func (w *WAL) Close() error {
	if err := w.db.Close(); err != nil {
		return fmt.Errorf("close WAL: %w", err)
	}
	return nil
}

// badgerLogger routes Badger's own messages to slog.
type badgerLogger struct{ log *slog.Logger }

func (l badgerLogger) Errorf(format string, args ...any) {
	l.log.Error("badger: " + trimNewline(fmt.Sprintf(format, args...)))
}

func (l badgerLogger) Warningf(format string, args ...any) {
	l.log.Warn("badger: " + trimNewline(fmt.Sprintf(format, args...)))
}

func (l badgerLogger) Infof(format string, args ...any) {
	l.log.Info("badger: " + trimNewline(fmt.Sprintf(format, args...)))
}

func (l badgerLogger) Debugf(format string, args ...any) {
	l.log.Debug("badger: " + trimNewline(fmt.Sprintf(format, args...)))
}

func trimNewline(s string) string {
	for len(s) > 0 && s[len(s)-1] == '\n' {
		s = s[:len(s)-1]
	}
	return s
}
