// kuiper-example shows the whole client side of kuiper-serve from Go: it encodes a prompt with
// the tokenizer service, streams a generation of those ids from the inference service, and
// decodes the generated ids twice (Decode, and DecodeStream the way a streaming client would).
//
//	kuiper-example -max-new-tokens 32 "Once upon a time"
//	kuiper-example -json "Once upon a time"   # one JSON object instead of streamed text
//
// Exit codes: 0 done, 1 an RPC failed, 2 bad flags.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	kuiperv1 "github.com/kuiper-serve/kuiper-serve/clients/go/kuiperv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// result is what -json prints: the same field names as `kuiper generate --json`, plus what
// the two decoders made of the generated ids.
type result struct {
	PromptIDs    []uint32       `json:"prompt_ids"`
	TokenIDs     []uint32       `json:"token_ids"`
	Text         string         `json:"text"`
	FinishReason string         `json:"finish_reason"`
	Usage        map[string]any `json:"usage"`
	Decoded      string         `json:"decoded"`
	DecodeStream string         `json:"decode_stream"`
}

var finishNames = map[kuiperv1.FinishReason]string{
	kuiperv1.FinishReason_FINISH_REASON_LENGTH:    "length",
	kuiperv1.FinishReason_FINISH_REASON_STOP:      "stop",
	kuiperv1.FinishReason_FINISH_REASON_EOS:       "eos",
	kuiperv1.FinishReason_FINISH_REASON_CANCELLED: "cancelled",
}

func main() {
	address := flag.String("address", "localhost:50051", "inference service host:port")
	tokAddress := flag.String("tokenizer-address", "localhost:50052", "tokenizer service host:port")
	maxNew := flag.Uint("max-new-tokens", 32, "tokens to generate at most")
	temperature := flag.Float64("temperature", 0, "0 = greedy")
	ignoreEOS := flag.Bool("ignore-eos", false, "keep going past the model's end-of-sequence tokens")
	timeout := flag.Duration("timeout", 60*time.Second, "deadline for the whole run")
	asJSON := flag.Bool("json", false, "print one JSON object at the end instead of streamed text")
	flag.Parse()
	prompt := strings.Join(flag.Args(), " ")
	if prompt == "" {
		fmt.Fprintln(os.Stderr, "usage: kuiper-example [flags] PROMPT")
		flag.PrintDefaults()
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	sampling := &kuiperv1.SamplingParams{MaxNewTokens: uint32(*maxNew), IgnoreEos: *ignoreEOS}
	t := float32(*temperature)
	sampling.Temperature = &t // an optional field: set, so 0 means greedy rather than the default
	res, err := run(ctx, *address, *tokAddress, prompt, sampling, *asJSON)
	if err != nil {
		if s, ok := status.FromError(err); ok {
			fmt.Fprintf(os.Stderr, "kuiper-example: %s: %s\n", s.Code(), s.Message())
		} else {
			fmt.Fprintf(os.Stderr, "kuiper-example: %v\n", err)
		}
		os.Exit(1)
	}
	if *asJSON {
		out, _ := json.Marshal(res)
		fmt.Println(string(out))
	}
}

func run(ctx context.Context, address, tokAddress, prompt string,
	sampling *kuiperv1.SamplingParams, quiet bool) (*result, error) {
	tokConn, err := grpc.Dial(tokAddress, grpc.WithInsecure())
	if err != nil {
		return nil, err
	}
	defer tokConn.Close()
	infConn, err := grpc.Dial(address, grpc.WithInsecure())
	if err != nil {
		return nil, err
	}
	defer infConn.Close()
	tok := kuiperv1.NewTokenizerServiceClient(tokConn)
	inf := kuiperv1.NewInferenceServiceClient(infConn)

	// 1. Encode: text -> ids (with the model's BOS, as its tokenizer adds by default).
	enc, err := tok.Encode(ctx, &kuiperv1.EncodeRequest{Texts: []string{prompt}})
	if err != nil {
		return nil, err
	}
	res := &result{PromptIDs: enc.Results[0].Ids, TokenIDs: []uint32{}}

	// 2. Generate from the ids, streaming the text as it comes.
	req := &kuiperv1.GenerateRequest{
		Prompt:   &kuiperv1.GenerateRequest_TokenIds{TokenIds: &kuiperv1.TokenIds{Ids: res.PromptIDs}},
		Sampling: sampling,
	}
	stream, err := inf.Generate(ctx, req)
	if err != nil {
		return nil, err
	}
	var chunks [][]uint32 // the ids of each streamed message, replayed into DecodeStream below
	var text strings.Builder
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		chunks = append(chunks, msg.TokenIds)
		res.TokenIDs = append(res.TokenIDs, msg.TokenIds...)
		text.WriteString(msg.Text)
		if !quiet {
			fmt.Print(msg.Text)
		}
		if msg.FinishReason != kuiperv1.FinishReason_FINISH_REASON_UNSPECIFIED {
			res.FinishReason = finishNames[msg.FinishReason]
			u := msg.Usage
			res.Usage = map[string]any{
				"prompt_tokens":         u.GetPromptTokens(),
				"completion_tokens":     u.GetCompletionTokens(),
				"time_to_first_token_s": u.GetTimeToFirstTokenS(),
				"queue_time_s":          u.GetQueueTimeS(),
				"cached_prompt_tokens":  u.GetCachedPromptTokens(),
			}
		}
	}
	res.Text = text.String()
	if !quiet {
		fmt.Printf("\n[%s: %d prompt + %d generated tokens]\n",
			res.FinishReason, len(res.PromptIDs), len(res.TokenIDs))
	}

	// 3a. Decode: all generated ids at once.
	dec, err := tok.Decode(ctx, &kuiperv1.DecodeRequest{
		Sequences: []*kuiperv1.TokenIds{{Ids: res.TokenIDs}},
	})
	if err != nil {
		return nil, err
	}
	res.Decoded = dec.Texts[0]

	// 3b. DecodeStream: the same ids chunk by chunk, the prompt as context.
	res.DecodeStream, err = decodeStream(ctx, tok, res.PromptIDs, chunks)
	return res, err
}

// decodeStream sends each chunk of ids as one message of sequence 1 (the last one marked
// finished, which flushes held-back bytes) and joins the text deltas that come back.
func decodeStream(ctx context.Context, tok kuiperv1.TokenizerServiceClient, contextIDs []uint32,
	chunks [][]uint32) (string, error) {
	ds, err := tok.DecodeStream(ctx)
	if err != nil {
		return "", err
	}
	var out strings.Builder
	if len(chunks) == 0 {
		chunks = [][]uint32{{}}
	}
	for i, ids := range chunks {
		seq := &kuiperv1.SequenceIds{SequenceId: 1, Ids: ids, Finished: i == len(chunks)-1}
		if i == 0 {
			seq.ContextIds = contextIDs
		}
		if err := ds.Send(&kuiperv1.DecodeStreamRequest{Sequences: []*kuiperv1.SequenceIds{seq}}); err != nil {
			return "", err
		}
		resp, err := ds.Recv()
		if err != nil {
			return "", err
		}
		for _, d := range resp.Deltas {
			out.WriteString(d.Text)
		}
	}
	if err := ds.CloseSend(); err != nil {
		return "", err
	}
	if _, err := ds.Recv(); err != io.EOF && err != nil {
		return "", err
	}
	return out.String(), nil
}
