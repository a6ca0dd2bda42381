// Command ask sends one typed question to the talker gateway (TalkerService.Ask)
// and prints the reply as it streams, then a summary a script can read:
//
//	go run ./ask --address 127.0.0.1:50050 --trace-id my-trace "What is the capital of France?"
//
// It is written against the oldest gRPC-Go that Debian ships (1.33, buildable
// offline, see ../README.md): grpc.Dial and grpc.WithInsecure, which newer
// releases still accept.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	talkerv1 "example.com/talker/gen/go/talker/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

func main() {
	address := flag.String("address", "127.0.0.1:50050", "host:port of the gateway")
	traceID := flag.String("trace-id", "", "x-trace-id to send (the gateway makes one if empty)")
	apiKey := flag.String("api-key", os.Getenv("TALKER_API_KEY"), "gateway API key, sent as authorization: Bearer")
	mode := flag.String("mode", "text", "what the reply is made of: text or audio")
	timeout := flag.Duration("timeout", 2*time.Minute, "deadline of the whole call")
	flag.Parse()
	question := strings.Join(flag.Args(), " ")
	if question == "" {
		fail("give the question as arguments: ask [flags] QUESTION")
	}
	replyMode := talkerv1.ReplyMode_REPLY_MODE_TEXT
	if *mode == "audio" {
		replyMode = talkerv1.ReplyMode_REPLY_MODE_AUDIO
	} else if *mode != "text" {
		fail("--mode must be text or audio")
	}

	conn, err := grpc.Dial(*address, grpc.WithInsecure())
	if err != nil {
		fail(fmt.Sprintf("cannot dial %s: %v", *address, err))
	}
	defer conn.Close()
	talker := talkerv1.NewTalkerServiceClient(conn)

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	if *traceID != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "x-trace-id", *traceID)
	}
	if *apiKey != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+*apiKey)
	}
	stream, err := talker.Ask(ctx, &talkerv1.AskRequest{
		Mode:     replyMode,
		Question: &talkerv1.AskRequest_Text{Text: question},
	})
	if err != nil {
		fail(status.Convert(err).Message())
	}
	header, err := stream.Header()
	if err != nil {
		fail(status.Convert(err).Message())
	}
	var reply string
	audioBytes := 0
	for {
		response, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			st := status.Convert(err)
			fail(fmt.Sprintf("%s: %s", st.Code(), st.Message()))
		}
		switch event := response.GetEvent().GetEvent().(type) {
		case *talkerv1.ConverseEvent_ReplyDelta:
			fmt.Print(event.ReplyDelta.GetText())
		case *talkerv1.ConverseEvent_ReplyAudio:
			audioBytes += len(event.ReplyAudio.GetAudio())
		case *talkerv1.ConverseEvent_TurnFinished:
			reply = event.TurnFinished.GetReplyText()
		case *talkerv1.ConverseEvent_Error:
			fail(fmt.Sprintf("%s failed: %s", event.Error.GetStage(), event.Error.GetMessage()))
		}
	}
	fmt.Println()
	fmt.Println("reply text:", reply)
	fmt.Println("audio bytes:", audioBytes)
	fmt.Println("trace id:", strings.Join(header.Get("x-trace-id"), ","))
}

func fail(message string) {
	fmt.Fprintln(os.Stderr, "ask:", message)
	os.Exit(1)
}
