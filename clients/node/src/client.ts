// A small typed layer over the generated TalkerService client: connect, call
// metadata (trace id, API key), reading the trace id back from the response
// headers, and a summary of a turn built from its events.

import { ChannelCredentials, Metadata, type ClientReadableStream } from "@grpc/grpc-js";

import { finishReasonToJSON } from "./gen/talker/v1/chat";
import { speechEventTypeToJSON } from "./gen/talker/v1/asr";
import { pipelineStageToJSON, TalkerServiceClient, type ConverseEvent } from "./gen/talker/v1/talker";

export const TRACE_ID_KEY = "x-trace-id";

export interface ConnectOptions {
  /** Use TLS. Without it the channel is plain HTTP/2, as the gateway serves by default. */
  tls?: boolean;
  /** PEM root certificate to trust (a self-signed gateway certificate); system roots when unset. */
  rootCertPem?: Buffer;
}

/** A client of the gateway at `address` ("host:port"). Close it with `client.close()`. */
export function connectTalker(address: string, options: ConnectOptions = {}): TalkerServiceClient {
  const credentials = options.tls
    ? ChannelCredentials.createSsl(options.rootCertPem ?? null)
    : ChannelCredentials.createInsecure();
  return new TalkerServiceClient(address, credentials);
}

export interface CallMetadataOptions {
  /** Sent as `x-trace-id`; the gateway makes one when it is empty. */
  traceId?: string;
  /** Sent as `authorization: Bearer <key>` when the gateway requires API keys. */
  apiKey?: string;
}

export function callMetadata(options: CallMetadataOptions = {}): Metadata {
  const metadata = new Metadata();
  if (options.traceId) metadata.set(TRACE_ID_KEY, options.traceId);
  if (options.apiKey) metadata.set("authorization", `Bearer ${options.apiKey}`);
  return metadata;
}

/** Resolves with the call's trace id as soon as the response headers arrive. */
export function traceIdOf(call: ClientReadableStream<unknown>): Promise<string> {
  return new Promise((resolve) => {
    call.once("metadata", (headers: Metadata) => {
      const values = headers.get(TRACE_ID_KEY);
      resolve(values.length ? String(values[0]) : "");
    });
    // A call refused before any header (bad address, UNAUTHENTICATED) has none.
    call.once("status", () => resolve(""));
  });
}

/** What a call produced, gathered from its events. */
export class TurnSummary {
  /** Final transcripts (or typed questions) of the finished turns. */
  transcript = "";
  /** Reply text of the finished turns. */
  replyText = "";
  audioBytes = 0;
  frames = 0;
  mp4Bytes = 0;
  turnsFinished = 0;
  /** Turns that ended in an `error` event, as "STAGE code: message". */
  turnErrors: string[] = [];

  add(event: ConverseEvent): void {
    const e = event.event;
    switch (e?.$case) {
      case "replyAudio":
        this.audioBytes += e.value.audio.length;
        break;
      case "videoFrame":
        this.frames += 1;
        break;
      case "mp4Chunk":
        this.mp4Bytes += e.value.content.length;
        break;
      case "turnFinished":
        this.turnsFinished += 1;
        this.transcript = join(this.transcript, e.value.userText);
        this.replyText = join(this.replyText, e.value.replyText);
        break;
      case "error":
        this.turnErrors.push(
          `${pipelineStageToJSON(e.value.stage)} ${e.value.code}: ${e.value.message}`,
        );
        break;
      default:
        break;
    }
  }

  /** The closing lines the examples print (and tests read), one line each. */
  lines(traceId: string): string[] {
    return [
      `transcript: ${oneLine(this.transcript)}`,
      `reply text: ${oneLine(this.replyText)}`,
      `audio bytes: ${this.audioBytes}`,
      `frames: ${this.frames}`,
      `trace id: ${traceId}`,
    ];
  }
}

function oneLine(text: string): string {
  return text.replace(/\s+/g, " ").trim();
}

function join(previous: string, next: string): string {
  return previous && next ? `${previous} | ${next}` : previous || next;
}

/**
 * One line for an event, or undefined for the media events that arrive many
 * times a second (reply audio, video frames, mp4 chunks): a caller shows
 * those as progress instead.
 */
export function describeEvent(event: ConverseEvent): string | undefined {
  const e = event.event;
  const turn = `turn ${event.turnIndex}`;
  switch (e?.$case) {
    case "started":
      return `started: session ${e.value.sessionId}, trace ${e.value.traceId}`;
    case "speech":
      return `${turn} speech: ${speechEventTypeToJSON(e.value.type)} at ${e.value.offsetMs} ms`;
    case "transcript":
      return `${turn} transcript (${e.value.isFinal ? "final" : "interim"}): ${e.value.text}`;
    case "replyDelta":
      return undefined;
    case "replySentence":
      return `${turn} reply sentence ${e.value.sentenceIndex}: ${e.value.text}`;
    case "renderProgress":
      return `${turn} render: ${Math.round(e.value.fraction * 100)}% (${e.value.stage})`;
    case "turnFinished": {
      const t = e.value.timings;
      return (
        `${turn} finished (${finishReasonToJSON(e.value.finishReason)}): ` +
        `${e.value.replyAudioMs} ms of audio, first audio after ${t?.firstAudioMs ?? 0} ms, ` +
        `total ${t?.totalMs ?? 0} ms` +
        (e.value.archivePath ? `, archived at ${e.value.archivePath}` : "")
      );
    }
    case "interrupted":
      return `${turn} interrupted after ${e.value.audioSentMs} ms of audio: ${e.value.textSent}`;
    case "error":
      return `${turn} error in ${pipelineStageToJSON(e.value.stage)} (code ${e.value.code}): ${e.value.message}`;
    default:
      return undefined;
  }
}
