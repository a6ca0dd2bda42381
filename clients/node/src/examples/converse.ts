// A device talking to the gateway's Converse: streams a 16-bit PCM WAV file
// in 20 ms chunks at real-time pace (as a microphone would), then 1 s of
// silence so the last utterance ends, then half-closes. Prints the events as
// they arrive, then the transcript, reply text, audio byte count, frame count
// and trace id.
//
//   node dist/examples/converse.js --address 127.0.0.1:50050 [--avatar ID] question.wav

import { once } from "node:events";
import { readFileSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";

import type { ClientDuplexStream } from "@grpc/grpc-js";

import { traceIdOf, TurnSummary } from "../client";
import { AudioEncoding } from "../gen/talker/v1/audio";
import {
  ConverseConfig,
  ConverseRequest,
  ConverseResponse,
  ReplyMode,
} from "../gen/talker/v1/talker";
import { readWavS16 } from "../wav";
import { connect, finish, parseCommandLine, printEvents, sampling } from "./common";

const USAGE = `usage: converse [options] [--interim] FILE.wav
  --interim             ask for interim transcripts too`;

const CHUNK_MS = 20;
const TRAILING_SILENCE_MS = 1000;

async function main(): Promise<void> {
  const { values, positionals } = parseCommandLine(USAGE, {
    interim: { type: "boolean", default: false },
  });
  if (positionals.length !== 1) {
    console.error(USAGE);
    process.exit(2);
  }
  const pcm = readWavS16(readFileSync(positionals[0]));
  const config = ConverseConfig.create({
    userId: values.user,
    scene: values.scene,
    mode: values.avatar ? ReplyMode.REPLY_MODE_AUDIO_VIDEO : ReplyMode.REPLY_MODE_AUDIO,
    voiceId: values.voice,
    avatarId: values.avatar,
    inputFormat: {
      encoding: AudioEncoding.AUDIO_ENCODING_PCM_S16LE,
      sampleRateHz: pcm.sampleRateHz,
      channels: pcm.channels,
    },
    interimResults: Boolean(values.interim),
    sampling: sampling(values),
  });
  console.log(
    `streaming ${positionals[0]}: ${(pcm.samples.length / 2 / pcm.channels / pcm.sampleRateHz).toFixed(2)} s ` +
      `at ${pcm.sampleRateHz} Hz in ${CHUNK_MS} ms chunks`,
  );

  const { client, metadata, deadline } = connect(values);
  const call = client.converse(metadata, { deadline });
  const traceId = traceIdOf(call);
  const summary = new TurnSummary();
  let open = true;
  const events = printEvents(call, summary, values.verbose).finally(() => {
    open = false;
  });
  events.catch(() => undefined); // handled by finish(); not an unhandled rejection meanwhile

  const chunkBytes = ((pcm.sampleRateHz * CHUNK_MS) / 1000) * 2 * pcm.channels;
  const silence = Buffer.alloc(((pcm.sampleRateHz * TRAILING_SILENCE_MS) / 1000) * 2 * pcm.channels);
  const audio = Buffer.concat([pcm.samples, silence]);
  try {
    await write(call, { request: { $case: "config", value: config } });
    // Pace by the clock, not by sleeps added up, so the stream does not drift behind real time.
    const start = performance.now();
    for (let offset = 0, index = 0; offset < audio.length && open; offset += chunkBytes, index += 1) {
      const due = start + index * CHUNK_MS - performance.now();
      if (due > 0) await sleep(due);
      await write(call, { request: { $case: "audio", value: audio.subarray(offset, offset + chunkBytes) } });
    }
  } finally {
    // Half-close: the gateway finishes the turn in progress, then ends the call.
    if (open) call.end();
  }
  await finish(traceId, events, summary);
  client.close();
}

async function write(
  call: ClientDuplexStream<ConverseRequest, ConverseResponse>,
  request: ConverseRequest,
): Promise<void> {
  if (!call.write(request)) await once(call, "drain");
}

main().catch((error: unknown) => {
  console.error(error instanceof Error ? error.message : error);
  process.exit(1);
});
