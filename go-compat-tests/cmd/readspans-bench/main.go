// Command readspans-bench drains ReadSpans with a grpc-go client, from the oldest entry, in
// batches until the WAL is exhausted (or -total messages were read), and prints
// {"messages":N,"seconds":S,"msgs_per_s":R}. It is the Go anchor the Python drain is measured against.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/junjo-backend/go-compat-tests/internal/wire/ingestion"
)

type result struct {
	Messages int     `json:"messages"`
	Seconds  float64 `json:"seconds"`
	MsgsPerS float64 `json:"msgs_per_s"`
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50052", "the ingestion peer's internal address")
	batch := flag.Uint("batch", 1000, "batch_size of each ReadSpans call")
	total := flag.Int("total", 0, "stop after this many messages (0: until the WAL is exhausted)")
	timeout := flag.Duration("timeout", 10*time.Minute, "give up after this long")
	flag.Parse()
	if *batch == 0 || *batch > 1<<32-1 {
		flag.Usage()
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	res, err := drain(ctx, *addr, uint32(*batch), *total)
	if err != nil {
		fmt.Fprintln(os.Stderr, "readspans-bench:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		os.Exit(1)
	}
}

func drain(ctx context.Context, addr string, batch uint32, total int) (result, error) {
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	if err != nil {
		return result{}, err
	}
	defer conn.Close() //nolint:errcheck // done with the connection
	client := ingestion.NewInternalIngestionServiceClient(conn)

	var lastKey []byte
	messages := 0
	started := time.Now()
	for total == 0 || messages < total {
		size := batch
		if total > 0 {
			size = uint32(min(int(batch), total-messages))
		}
		stream, err := client.ReadSpans(ctx, &ingestion.ReadSpansRequest{StartKeyUlid: lastKey, BatchSize: size}, grpc.WaitForReady(true))
		if err != nil {
			return result{}, err
		}
		got := 0
		for {
			msg, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return result{}, err
			}
			lastKey = msg.GetKeyUlid()
			got++
		}
		messages += got
		if got == 0 {
			break
		}
	}
	seconds := time.Since(started).Seconds()
	return result{Messages: messages, Seconds: seconds, MsgsPerS: float64(messages) / seconds}, nil
}
