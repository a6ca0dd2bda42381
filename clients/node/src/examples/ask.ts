// One typed question to the gateway's Ask: prints the events as they arrive,
// then the transcript, reply text, audio byte count, frame count and trace id.
//
//   node dist/examples/ask.js --address 127.0.0.1:50050 "What is the capital of France?"

import { traceIdOf, TurnSummary } from "../client";
import { AskRequest, ReplyMode } from "../gen/talker/v1/talker";
import { connect, finish, parseCommandLine, printEvents, sampling } from "./common";

const USAGE = `usage: ask [options] [--mode text|audio|video] QUESTION...
  --mode MODE           what the reply is made of (default: video with --avatar, else audio)`;

const MODES: Record<string, ReplyMode> = {
  text: ReplyMode.REPLY_MODE_TEXT,
  audio: ReplyMode.REPLY_MODE_AUDIO,
  video: ReplyMode.REPLY_MODE_AUDIO_VIDEO,
};

async function main(): Promise<void> {
  const { values, positionals } = parseCommandLine(USAGE, { mode: { type: "string" } });
  const text = positionals.join(" ").trim();
  const modeName = (values.mode as string | undefined) ?? (values.avatar ? "video" : "audio");
  if (!text || !(modeName in MODES)) {
    console.error(USAGE);
    process.exit(2);
  }
  const { client, metadata, deadline } = connect(values);
  const request = AskRequest.create({
    userId: values.user,
    scene: values.scene,
    mode: MODES[modeName],
    voiceId: values.voice,
    avatarId: values.avatar,
    question: { $case: "text", value: text },
    sampling: sampling(values),
  });
  const call = client.ask(request, metadata, { deadline });
  const traceId = traceIdOf(call);
  const summary = new TurnSummary();
  await finish(traceId, printEvents(call, summary, values.verbose), summary);
  client.close();
}

main().catch((error: unknown) => {
  console.error(error instanceof Error ? error.message : error);
  process.exit(1);
});
