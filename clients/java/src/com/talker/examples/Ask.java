// Ask: one typed question to the talker gateway (TalkerService.Ask), the reply
// printed as it streams, then `reply text:`, `audio bytes:` and `trace id:`.
//
//   java -cp ... com.talker.examples.Ask 127.0.0.1:50050 my-trace "What is the capital of France?"
//
// The calls are the README's Java snippet. Built offline against Debian's
// grpc-java 1.41 and protobuf-java (see ../README.md); tests/java_client_system_test.py
// generates the stubs with buf.gen.local.yaml, compiles this and runs it.
package com.talker.examples;

import com.talker.v1.AskRequest;
import com.talker.v1.AskResponse;
import com.talker.v1.ConverseEvent;
import com.talker.v1.ReplyMode;
import com.talker.v1.TalkerServiceGrpc;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.StatusRuntimeException;
import io.grpc.stub.MetadataUtils;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.util.Iterator;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;

public final class Ask {
  private Ask() {}

  public static void main(String[] args) throws IOException, InterruptedException {
    if (args.length != 3) {
      System.err.println("ask: usage: Ask HOST:PORT TRACE_ID QUESTION");
      System.exit(2);
    }
    ManagedChannel channel = ManagedChannelBuilder.forTarget(args[0]).usePlaintext().build();
    Metadata.Key<String> TRACE_ID = Metadata.Key.of("x-trace-id", Metadata.ASCII_STRING_MARSHALLER);
    Metadata headers = new Metadata();
    headers.put(TRACE_ID, args[1]);
    AtomicReference<Metadata> responseHeaders = new AtomicReference<>();
    AtomicReference<Metadata> trailers = new AtomicReference<>();
    TalkerServiceGrpc.TalkerServiceBlockingStub talker = TalkerServiceGrpc.newBlockingStub(channel)
        .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers),
                          MetadataUtils.newCaptureMetadataInterceptor(responseHeaders, trailers))
        .withDeadlineAfter(2, TimeUnit.MINUTES);

    String reply = "";
    ByteArrayOutputStream audio = new ByteArrayOutputStream(); // mono PCM_S16LE
    try {
      Iterator<AskResponse> events = talker.ask(AskRequest.newBuilder()
          .setMode(ReplyMode.REPLY_MODE_TEXT)
          .setText(args[2])
          .build());
      while (events.hasNext()) {
        ConverseEvent event = events.next().getEvent();
        switch (event.getEventCase()) {
          case REPLY_DELTA -> System.out.print(event.getReplyDelta().getText());
          case REPLY_AUDIO -> event.getReplyAudio().getAudio().writeTo(audio);
          case TURN_FINISHED -> reply = event.getTurnFinished().getReplyText();
          case ERROR -> System.err.println(event.getError().getStage() + ": " + event.getError().getMessage());
          default -> { }
        }
      }
    } catch (StatusRuntimeException error) {
      System.err.println("ask: " + error.getStatus().getCode() + ": " + error.getStatus().getDescription());
      System.exit(1);
    } finally {
      channel.shutdown().awaitTermination(5, TimeUnit.SECONDS);
    }
    System.out.println();
    System.out.println("reply text: " + reply);
    System.out.println("audio bytes: " + audio.size());
    System.out.println("trace id: " + responseHeaders.get().get(TRACE_ID));
  }
}
