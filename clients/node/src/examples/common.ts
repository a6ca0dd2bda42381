// What both examples share: command-line options, printing a call's events,
// and the closing summary.

import { readFileSync } from "node:fs";
import { parseArgs, type ParseArgsConfig } from "node:util";

import type { ClientReadableStream, Metadata } from "@grpc/grpc-js";

import { callMetadata, connectTalker, describeEvent, TurnSummary } from "../client";
import type { SamplingParams } from "../gen/talker/v1/chat";
import type { ConverseEvent, TalkerServiceClient } from "../gen/talker/v1/talker";

export const COMMON_OPTIONS = {
  address: { type: "string", default: process.env.TALKER_GATEWAY ?? "127.0.0.1:50050" },
  "trace-id": { type: "string", default: "" },
  "api-key": { type: "string", default: process.env.TALKER_API_KEY ?? "" },
  tls: { type: "boolean", default: false },
  "root-cert": { type: "string", default: "" },
  user: { type: "string", default: "node-client" },
  scene: { type: "string", default: "node-example" },
  avatar: { type: "string", default: "" },
  voice: { type: "string", default: "" },
  "max-new-tokens": { type: "string", default: "0" },
  greedy: { type: "boolean", default: false },
  "timeout-s": { type: "string", default: "300" },
  verbose: { type: "boolean", default: false },
  help: { type: "boolean", default: false },
} as const satisfies ParseArgsConfig["options"];

export const COMMON_USAGE = `
  --address HOST:PORT   the gateway (default $TALKER_GATEWAY or 127.0.0.1:50050)
  --trace-id ID         sent as x-trace-id (default: the gateway makes one)
  --api-key KEY         sent as authorization: Bearer KEY (default $TALKER_API_KEY)
  --tls [--root-cert PEM]  TLS instead of plain HTTP/2
  --user ID --scene NAME   who asks and where (archive names, logs)
  --avatar ID           reply with video frames of this avatar (AUDIO_VIDEO)
  --voice ID            reply in this voice
  --max-new-tokens N --greedy   generation knobs (default: the server's)
  --timeout-s S         deadline of the call (default 300)
  --verbose             print every audio chunk and video frame too`;

export type CommonValues = {
  [K in keyof typeof COMMON_OPTIONS]: (typeof COMMON_OPTIONS)[K]["default"];
};

export function parseCommandLine<T extends ParseArgsConfig["options"]>(
  usage: string,
  options: T,
): { values: CommonValues & Record<string, string | boolean | undefined>; positionals: string[] } {
  const parsed = parseArgs({ options: { ...COMMON_OPTIONS, ...options }, allowPositionals: true });
  const values = parsed.values as CommonValues & Record<string, string | boolean | undefined>;
  if (values.help) {
    console.log(usage + COMMON_USAGE);
    process.exit(0);
  }
  return { values, positionals: parsed.positionals };
}

export interface Connection {
  client: TalkerServiceClient;
  metadata: Metadata;
  deadline: Date;
}

export function connect(values: CommonValues): Connection {
  const client = connectTalker(values.address, {
    tls: values.tls,
    rootCertPem: values["root-cert"] ? readFileSync(values["root-cert"]) : undefined,
  });
  const metadata = callMetadata({ traceId: values["trace-id"], apiKey: values["api-key"] });
  const deadline = new Date(Date.now() + Number(values["timeout-s"]) * 1000);
  return { client, metadata, deadline };
}

export function sampling(values: CommonValues): SamplingParams | undefined {
  const maxNewTokens = Number(values["max-new-tokens"]);
  if (!maxNewTokens && !values.greedy) return undefined;
  return { temperature: 0, topP: 0, maxNewTokens, greedy: values.greedy };
}

/**
 * Prints the events of a call as they arrive and gathers them into a summary.
 * Resolves when the server ends the stream; rejects with the gRPC error if it
 * ends the call with one.
 */
export async function printEvents(
  call: ClientReadableStream<{ event?: ConverseEvent }>,
  summary: TurnSummary,
  verbose: boolean,
): Promise<void> {
  const mediaSeen = new Set<string>();
  for await (const response of call as AsyncIterable<{ event?: ConverseEvent }>) {
    const event = response.event;
    if (!event) continue;
    summary.add(event);
    const line = describeEvent(event);
    if (line) {
      console.log(line);
      continue;
    }
    const e = event.event;
    // Media arrives many times a second: the first of each kind in a turn, then only with --verbose.
    const key = `${event.turnIndex}:${e?.$case}`;
    if (!verbose && mediaSeen.has(key)) continue;
    mediaSeen.add(key);
    if (e?.$case === "replyAudio") {
      const format = e.value.format;
      console.log(
        `turn ${event.turnIndex} reply audio: ${e.value.audio.length} bytes at ${e.value.offsetMs} ms` +
          (format ? ` (${format.sampleRateHz} Hz)` : ""),
      );
    } else if (e?.$case === "videoFrame") {
      console.log(
        `turn ${event.turnIndex} video frame ${e.value.frameIndex}: ${e.value.width}x${e.value.height} at ${e.value.timestampMs} ms`,
      );
    } else if (e?.$case === "replyDelta" && verbose) {
      console.log(`turn ${event.turnIndex} reply delta: ${JSON.stringify(e.value.text)}`);
    } else if (e?.$case === "mp4Chunk") {
      console.log(`turn ${event.turnIndex} mp4 chunk: ${e.value.content.length} bytes`);
    }
  }
}

/**
 * Waits for the call, prints the summary, and sets the exit code. `traceId`
 * comes from `traceIdOf(call)`, taken right after the call starts so the
 * headers are not missed.
 */
export async function finish(
  traceId: Promise<string>,
  events: Promise<void>,
  summary: TurnSummary,
): Promise<void> {
  let failure = "";
  try {
    await events;
  } catch (error) {
    const status = error as { code?: number; details?: string; message?: string };
    failure = `call failed: code ${status.code ?? "?"}: ${status.details ?? status.message}`;
  }
  for (const line of summary.lines(await traceId)) console.log(line);
  if (!failure && summary.turnsFinished === 0) failure = "no turn finished";
  if (summary.turnErrors.length) failure = `turn errors: ${summary.turnErrors.join("; ")}`;
  if (failure) {
    console.error(failure);
    process.exitCode = 1;
  }
}
