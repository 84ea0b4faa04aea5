package main

import (
	"bufio"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"

	"github.com/junjo-backend/go-compat-tests/internal/wal"
)

// nodesPerWorkflow: each Junjo-shaped trace is one workflow span and this many node spans.
const nodesPerWorkflow = 4

// junjoSpans returns a maker of spans shaped like the Junjo SDK's, called with i = 0, 1, ...
// in order: every (nodesPerWorkflow+1)th span is a workflow span (state start and end,
// graph structure, store id), the others its nodes, each with two `set_state` events whose
// `junjo.state_json_patch` is a JSON patch of a few hundred bytes.
func junjoSpans() func(i int) *tracepb.Span {
	var traceID, workflowSpanID []byte
	var workflowID string
	return func(i int) *tracepb.Span {
		position := i % (nodesPerWorkflow + 1)
		start := uint64(time.Now().UnixNano())
		spanID := randomBytes(8)
		if position == 0 {
			traceID, workflowSpanID = randomBytes(16), spanID
			workflowID = "wf-" + hex.EncodeToString(randomBytes(6))
			return &tracepb.Span{
				TraceId: traceID, SpanId: spanID, Name: "workflow", Kind: tracepb.Span_SPAN_KIND_INTERNAL,
				StartTimeUnixNano: start, EndTimeUnixNano: start + 50_000_000,
				Attributes: []*commonpb.KeyValue{
					stringAttr("junjo.span_type", "workflow"),
					stringAttr("junjo.id", workflowID),
					stringAttr("junjo.parent_id", ""),
					stringAttr("junjo.workflow.state.start", stateJSON(i, "start")),
					stringAttr("junjo.workflow.state.end", stateJSON(i, "end")),
					stringAttr("junjo.workflow.graph_structure", graphJSON()),
					stringAttr("junjo.workflow.store.id", "store-"+workflowID),
				},
				Status: &tracepb.Status{Code: tracepb.Status_STATUS_CODE_OK},
			}
		}
		nodeID := fmt.Sprintf("node-%s-%d", workflowID, position)
		events := make([]*tracepb.Span_Event, 0, 2)
		for e := range 2 {
			events = append(events, &tracepb.Span_Event{
				TimeUnixNano: start + uint64(e+1)*1_000_000,
				Name:         "set_state",
				Attributes: []*commonpb.KeyValue{
					stringAttr("junjo.state_json_patch", patchJSON(i, e)),
					stringAttr("junjo.store.id", "store-"+workflowID),
				},
			})
		}
		return &tracepb.Span{
			TraceId: traceID, SpanId: spanID, ParentSpanId: workflowSpanID,
			Name: fmt.Sprintf("node-%d", position), Kind: tracepb.Span_SPAN_KIND_INTERNAL,
			StartTimeUnixNano: start, EndTimeUnixNano: start + 10_000_000,
			Attributes: []*commonpb.KeyValue{
				stringAttr("junjo.span_type", "node"),
				stringAttr("junjo.id", nodeID),
				stringAttr("junjo.parent_id", workflowID),
			},
			Events: events,
			Status: &tracepb.Status{Code: tracepb.Status_STATUS_CODE_OK},
		}
	}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = io.ReadFull(rand.Reader, b)
	return b
}

func stateJSON(i int, phase string) string {
	return fmt.Sprintf(`{"phase":%q,"run":%d,"messages":[{"role":"user","content":%q},`+
		`{"role":"assistant","content":%q}],"score":0.75,"done":%t,"tags":["a","b","c"]}`,
		phase, i, strings.Repeat("question text ", 8), strings.Repeat("answer text ", 8), phase == "end")
}

func graphJSON() string {
	nodes := make([]string, 0, nodesPerWorkflow)
	for n := 1; n <= nodesPerWorkflow; n++ {
		nodes = append(nodes, fmt.Sprintf(`{"id":"node-%d","type":"node","label":"Node %d"}`, n, n))
	}
	return `{"v":1,"nodes":[` + strings.Join(nodes, ",") + `],"edges":[{"tail":"node-1","head":"node-2"}]}`
}

func patchJSON(i, e int) string {
	return fmt.Sprintf(`[{"op":"replace","path":"/messages/%d/content","value":%q},`+
		`{"op":"add","path":"/steps/-","value":{"node":%d,"event":%d,"note":%q}}]`,
		e, strings.Repeat("updated content ", 6), i, e, strings.Repeat("n", 40))
}

// goldenLine is one line of a golden batches file: {"records": [{"key", "span", "resource"}]},
// every field base64.
type goldenLine struct {
	Records []struct {
		Span     string `json:"span"`
		Resource string `json:"resource"`
	} `json:"records"`
}

// writeRecords writes every record of a golden batches file, in order, under new keys.
func writeRecords(store *wal.WAL, path string, res *result) error {
	file, err := os.Open(path)
	if err != nil {
		return err
	}
	defer file.Close() //nolint:errcheck // read only
	batch := store.NewBatch()
	lines := bufio.NewScanner(file)
	lines.Buffer(make([]byte, 0, 1<<20), 64<<20)
	for lines.Scan() {
		var line goldenLine
		if err := json.Unmarshal(lines.Bytes(), &line); err != nil {
			batch.Cancel()
			return fmt.Errorf("%s: %w", path, err)
		}
		for _, record := range line.Records {
			span, err1 := base64.StdEncoding.DecodeString(record.Span)
			resource, err2 := base64.StdEncoding.DecodeString(record.Resource)
			if err1 != nil || err2 != nil {
				batch.Cancel()
				return fmt.Errorf("%s: a record is not base64", path)
			}
			value, err := wal.ContainerValue(span, resource)
			if err != nil {
				batch.Cancel()
				return err
			}
			key, err := batch.Add(value)
			if err != nil {
				batch.Cancel()
				return err
			}
			if res.Count == 0 {
				res.FirstKey = hex.EncodeToString(key[:])
			}
			res.LastKey = hex.EncodeToString(key[:])
			res.Count++
		}
	}
	if err := lines.Err(); err != nil {
		batch.Cancel()
		return err
	}
	return batch.Flush()
}
