// Command authload drives InternalAuthService.ValidateApiKey the way the Go
// ingestion-service does (grpc-go, one insecure connection, unary calls) and
// reports throughput, latency per key class and every wrong answer.
//
// Valid keys come from a file (one per line); invalid keys are fresh random
// 64-character keys, so no server-side cache of answers can absorb them. Each
// worker loops until the duration is over; -invalid-ratio mixes invalid keys into
// every worker's calls, -flood adds workers that send only invalid keys.
//
// -flood-timeout gives the flood workers' calls their own deadline (1ms makes a
// deadline flood), and -flood-cancel makes the client cancel each of them at a random
// moment within that time instead (RST_STREAM from the client): the flood shares the
// one connection with the legitimate workers, as cache misses do in the
// ingestion-service. The "valid" class then counts the legitimate calls the flood hurt.
// -invalid-keys draws the invalid keys from a file instead of making random ones (so that
// a caller can watch logs for every key it sent).
//
//	authload -addr 127.0.0.1:50053 -keys keys.txt -concurrency 16 -duration 5s
//
// The result is one JSON object on stdout; the exit status is 0 even when answers
// were wrong, so the caller decides what a wrong answer means.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/junjo-backend/go-compat-tests/internal/wire/ingestion"
)

const alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

// classStats is what the report says about one class of key.
type classStats struct {
	Calls  int     `json:"calls"`
	P50Ms  float64 `json:"p50_ms"`
	P99Ms  float64 `json:"p99_ms"`
	MaxMs  float64 `json:"max_ms"`
	Errors int     `json:"errors"`
	Wrong  int     `json:"wrong_answers"`
	// ErrorCodes counts this class's failed calls by status code.
	ErrorCodes map[string]int `json:"error_codes,omitempty"`
	// FirstError is the first failed call's status message (it tells a server's status
	// from a stream reset).
	FirstError string `json:"first_error,omitempty"`
}

type report struct {
	Addr         string                `json:"addr"`
	Concurrency  int                   `json:"concurrency"`
	Flood        int                   `json:"flood"`
	FloodTimeout string                `json:"flood_timeout"`
	FloodCancel  bool                  `json:"flood_cancel"`
	InvalidRatio float64               `json:"invalid_ratio"`
	Seconds      float64               `json:"seconds"`
	Calls        int                   `json:"calls"`
	WarmupCalls  int                   `json:"warmup_calls"`
	RPS          float64               `json:"rps"`
	P50Ms        float64               `json:"p50_ms"`
	P99Ms        float64               `json:"p99_ms"`
	Errors       int                   `json:"errors"`
	ErrorCodes   map[string]int        `json:"error_codes"`
	WrongAnswers int                   `json:"wrong_answers"`
	Classes      map[string]classStats `json:"classes"`
}

// sample is one call: its class, how long it took, and how it went.
type sample struct {
	invalid bool
	latency time.Duration
	code    string // "" when the call succeeded
	message string // the status message of a failed call
	wrong   bool
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50053", "the auth server, host:port")
	keysPath := flag.String("keys", "", "file with one valid key per line (required unless -invalid-ratio 1)")
	concurrency := flag.Int("concurrency", 16, "workers calling in a loop (each one call at a time)")
	flood := flag.Int("flood", 0, "extra workers that send only invalid keys")
	duration := flag.Duration("duration", 5*time.Second, "how long to call")
	warmup := flag.Duration("warmup", 500*time.Millisecond, "calls before measuring (not reported)")
	invalidRatio := flag.Float64("invalid-ratio", 0, "share of each worker's calls that use an invalid key")
	timeout := flag.Duration("timeout", 5*time.Second, "deadline of each call (the ingestion-service uses 5s)")
	floodTimeout := flag.Duration("flood-timeout", 0, "deadline of each flood call (0: -timeout)")
	invalidPath := flag.String("invalid-keys", "", "file with the invalid keys to send, one per line (default: fresh random keys)")
	floodCancel := flag.Bool("flood-cancel", false, "cancel each flood call at a random moment within -flood-timeout instead of letting its deadline expire")
	flag.Parse()

	fl := floodMode{timeout: *floodTimeout, cancel: *floodCancel}
	invalid, err := readKeys(*invalidPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "authload:", err)
		os.Exit(2)
	}
	fl.invalidKeys = invalid
	if fl.timeout <= 0 {
		fl.timeout = *timeout
	}
	if err := run(*addr, *keysPath, *concurrency, *flood, *duration, *warmup, *invalidRatio, *timeout, fl); err != nil {
		fmt.Fprintln(os.Stderr, "authload:", err)
		os.Exit(2)
	}
}

// floodMode is how the flood workers end their calls.
type floodMode struct {
	timeout time.Duration // each flood call's deadline
	cancel  bool          // cancel within timeout rather than let the deadline expire
	// invalidKeys, when not empty, are the invalid keys to send (else random ones).
	invalidKeys []string
}

func run(addr, keysPath string, concurrency, flood int, duration, warmup time.Duration,
	invalidRatio float64, timeout time.Duration, fl floodMode) error {
	if concurrency < 0 || flood < 0 || concurrency+flood == 0 {
		return errors.New("need at least one worker")
	}
	if invalidRatio < 0 || invalidRatio > 1 {
		return errors.New("-invalid-ratio must be within [0, 1]")
	}
	valid, err := readKeys(keysPath)
	if err != nil {
		return err
	}
	if len(valid) == 0 && (invalidRatio < 1 && concurrency > 0) {
		return errors.New("no valid keys: give -keys FILE or -invalid-ratio 1")
	}

	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	client := ingestion.NewInternalAuthServiceClient(conn)

	// Like the ingestion-service at start-up: wait until the server answers.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	_, err = client.ValidateApiKey(ctx, &ingestion.ValidateApiKeyRequest{ApiKey: "startup-readiness-check"},
		grpc.WaitForReady(true))
	cancel()
	if err != nil {
		return fmt.Errorf("server not ready: %w", err)
	}

	start := time.Now()
	measureFrom := start.Add(warmup)
	stop := measureFrom.Add(duration)
	results := make([][]sample, concurrency+flood)
	warmups := make([]int, concurrency+flood)
	var wg sync.WaitGroup
	for w := range concurrency + flood {
		ratio := invalidRatio
		mode := floodMode{timeout: timeout, invalidKeys: fl.invalidKeys}
		if w >= concurrency {
			ratio = 1
			mode = fl
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[w], warmups[w] = work(client, valid, ratio, mode, measureFrom, stop, uint64(w))
		}()
	}
	wg.Wait()
	elapsed := time.Since(measureFrom).Seconds()

	var all []sample
	for _, r := range results {
		all = append(all, r...)
	}
	out := summarize(all, elapsed)
	out.Addr, out.Concurrency, out.Flood, out.InvalidRatio = addr, concurrency, flood, invalidRatio
	out.FloodTimeout, out.FloodCancel = fl.timeout.String(), fl.cancel
	for _, n := range warmups {
		out.WarmupCalls += n
	}
	enc := json.NewEncoder(os.Stdout)
	return enc.Encode(out)
}

// work calls until stop; it returns the calls made after measureFrom, and how many
// were made before (so that a caller can divide the server's CPU time by every call).
func work(client ingestion.InternalAuthServiceClient, valid []string, invalidRatio float64,
	mode floodMode, measureFrom, stop time.Time, seed uint64) ([]sample, int) {
	rng := mrand.New(mrand.NewPCG(seed, uint64(time.Now().UnixNano()))) //nolint:gosec // load, not secrets
	samples := make([]sample, 0, 4096)
	warmup := 0
	for {
		now := time.Now()
		if !now.Before(stop) {
			return samples, warmup
		}
		invalid := invalidRatio >= 1 || (invalidRatio > 0 && rng.Float64() < invalidRatio)
		var key string
		switch {
		case invalid && len(mode.invalidKeys) > 0:
			key = mode.invalidKeys[rng.IntN(len(mode.invalidKeys))]
		case invalid:
			key = randomKey(rng)
		default:
			key = valid[rng.IntN(len(valid))]
		}
		ctx, cancel := context.WithTimeout(context.Background(), mode.timeout)
		var timer *time.Timer
		if mode.cancel {
			// A random moment within the deadline, so that cancellations land before,
			// during and after the server's handling of the call.
			timer = time.AfterFunc(time.Duration(rng.Int64N(int64(mode.timeout))+1), cancel)
		}
		t0 := time.Now()
		resp, err := client.ValidateApiKey(ctx, &ingestion.ValidateApiKeyRequest{ApiKey: key})
		latency := time.Since(t0)
		if timer != nil {
			timer.Stop()
		}
		cancel()
		if t0.Before(measureFrom) {
			warmup++
			continue
		}
		s := sample{invalid: invalid, latency: latency}
		if err != nil {
			s.code = status.Code(err).String()
			s.message = status.Convert(err).Message()
		} else {
			s.wrong = resp.GetIsValid() == invalid
		}
		samples = append(samples, s)
	}
}

func summarize(all []sample, seconds float64) report {
	out := report{Seconds: seconds, Calls: len(all), ErrorCodes: map[string]int{},
		Classes: map[string]classStats{}}
	if seconds > 0 {
		out.RPS = float64(len(all)) / seconds
	}
	var every []time.Duration
	byClass := map[string][]time.Duration{}
	for _, s := range all {
		class := "valid"
		if s.invalid {
			class = "invalid"
		}
		c := out.Classes[class]
		c.Calls++
		if s.code != "" {
			if c.ErrorCodes == nil {
				c.ErrorCodes = map[string]int{}
			}
			c.ErrorCodes[s.code]++
			if c.FirstError == "" {
				c.FirstError = s.message
			}
			c.Errors++
			out.Errors++
			out.ErrorCodes[s.code]++
		}
		if s.wrong {
			c.Wrong++
			out.WrongAnswers++
		}
		out.Classes[class] = c
		every = append(every, s.latency)
		byClass[class] = append(byClass[class], s.latency)
	}
	out.P50Ms, out.P99Ms, _ = percentiles(every)
	for class, lat := range byClass {
		c := out.Classes[class]
		c.P50Ms, c.P99Ms, c.MaxMs = percentiles(lat)
		out.Classes[class] = c
	}
	return out
}

// percentiles returns p50, p99 and the maximum, in milliseconds (nearest rank).
func percentiles(lat []time.Duration) (float64, float64, float64) {
	if len(lat) == 0 {
		return 0, 0, 0
	}
	slices.Sort(lat)
	rank := func(p float64) float64 {
		i := int(p*float64(len(lat))+0.999999) - 1
		i = max(0, min(i, len(lat)-1))
		return float64(lat[i].Microseconds()) / 1000
	}
	return rank(0.50), rank(0.99), float64(lat[len(lat)-1].Microseconds()) / 1000
}

func readKeys(path string) ([]string, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var keys []string
	scanner := bufio.NewScanner(f)
	for scanner.Scan() {
		if key := strings.TrimSpace(scanner.Text()); key != "" {
			keys = append(keys, key)
		}
	}
	return keys, scanner.Err()
}

// randomKey is a key shaped like a real one that no database holds: 64 random
// characters (381 bits), so it never repeats and never hits a cache of answers. A
// seeded PRNG is enough for that and keeps the load generator's own CPU cost low.
func randomKey(rng *mrand.Rand) string {
	var b [64]byte
	for i := range b {
		b[i] = alphabet[rng.IntN(len(alphabet))]
	}
	return string(b[:])
}
