// The talker client: helpers, and the generated talker.v1 types by file.
export * from "./client";
export * from "./wav";
export * as animate from "./gen/talker/v1/animate";
export * as asr from "./gen/talker/v1/asr";
export * as audio from "./gen/talker/v1/audio";
export * as chat from "./gen/talker/v1/chat";
export * as synthesize from "./gen/talker/v1/synthesize";
export * as talker from "./gen/talker/v1/talker";
