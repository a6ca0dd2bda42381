// The talker page: a WebRTC call to the web program (web/rtc.py). The microphone
// goes up with the browser's echo cancellation on; the avatar's face and voice come
// back as one media stream; events arrive as JSON on the "events" data channel.
//
// `window.talker` exposes the live call (peer connection, events, what was heard
// when) so tests and `python -m bench web` can read the page itself.

const $ = (id) => document.getElementById(id);
const STATE_TEXT = {
  idle: "Not connected",
  connecting: "Connecting…",
  listening: "Listening: speak any time",
  thinking: "Thinking…",
  speaking: "Speaking: talk to interrupt",
};
// RMS over which a 20 ms window counts as sound (about -40 dBFS): speech is well
// above it, the line's silence and comfort noise well below.
const LOUD_RMS = 0.01;
// A reply heard after this much quiet counts as a new reply (for `heard`).
const QUIET_MS = 300;
/** How often a page whose server restarted or whose connection failed tries again. */
const RECONNECT_EVERY_MS = 2000;

const talker = {
  pc: null,
  channel: null,
  state: "idle",
  events: [],
  /** One entry per reply heard: when its first sound played (`at`) and when the
   * microphone last heard the user before it (`lastSpeechAt`), performance.now() ms. */
  heard: [],
  lastMicLoudAt: null,
  traceId: "",
  /** The timer of a Talk pressed again by itself after a restart, if one is due, and
   * when it stops trying (performance.now() ms). */
  reconnecting: null,
  reconnectUntil: null,
};
window.talker = talker;

let audioContext = null;
let meterTimer = null;
let micStream = null;
const bubbles = { user: new Map(), avatar: new Map() };

function setState(state, message) {
  talker.state = state;
  $("state").textContent = state === "error" ? `Error: ${message}` : STATE_TEXT[state] ?? state;
  $("state-dot").dataset.state = state;
  $("state").parentElement.dataset.state = state;
}

function note(text, isError = false) {
  const item = document.createElement("li");
  item.className = isError ? "note error" : "note";
  item.textContent = text;
  appendToLog(item);
}

function appendToLog(item) {
  const log = $("log");
  log.append(item);
  log.scrollTop = log.scrollHeight;
}

function bubble(kind, turn) {
  let item = bubbles[kind].get(turn);
  if (!item) {
    item = document.createElement("li");
    item.className = kind;
    item.dataset.turn = turn;
    bubbles[kind].set(turn, item);
    appendToLog(item);
  }
  return item;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    return body.error?.message ?? JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadOptions() {
  const response = await fetch("/rtc/options");
  if (!response.ok) {
    setState("error", await errorOf(response));
    return;
  }
  const options = await response.json();
  const avatars = $("avatar-select");
  avatars.replaceChildren();
  for (const avatar of options.avatars) addAvatar(avatar, false);
  if (!options.avatars.length) {
    const none = new Option("No avatars yet: upload a portrait", "");
    none.disabled = true;
    avatars.append(none);
  }
  const voices = $("voice-select");
  voices.replaceChildren(new Option("Default voice", ""));
  for (const voice of options.voices) {
    const label = voice.language ? `${voice.name} (${voice.language})` : voice.name;
    voices.append(new Option(label, voice.voice_id));
  }
}

function addAvatar(avatar, select) {
  const option = new Option(avatar.name, avatar.avatar_id, select, select);
  option.dataset.faceBox = JSON.stringify(avatar.face_box);
  const avatars = $("avatar-select");
  for (const stale of [...avatars.options]) if (!stale.value) stale.remove();
  avatars.append(option);
}

async function uploadPortrait(file) {
  const form = new FormData();
  form.append("portrait", file);
  form.append("name", file.name.replace(/\.[^.]*$/, "").slice(0, 64));
  note(`Checking the portrait ${file.name}…`);
  const response = await fetch("/rtc/avatars", { method: "POST", body: form });
  if (!response.ok) {
    note(`The portrait was not accepted: ${await errorOf(response)}`, true);
    return;
  }
  const avatar = await response.json();
  addAvatar(avatar, true);
  note(`${avatar.name} is ready.`);
}

function waitForIceGathering(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", check);
        resolve();
      }
    };
    pc.addEventListener("icegatheringstatechange", check);
  });
}

function rms(analyser, buffer) {
  analyser.getFloatTimeDomainData(buffer);
  let sum = 0;
  for (const sample of buffer) sum += sample * sample;
  return Math.sqrt(sum / buffer.length);
}

function startMeters(micStream, replyTrack) {
  const mic = audioContext.createAnalyser();
  const reply = audioContext.createAnalyser();
  mic.fftSize = reply.fftSize = 1024;
  audioContext.createMediaStreamSource(micStream).connect(mic);
  audioContext.createMediaStreamSource(new MediaStream([replyTrack])).connect(reply);
  const buffer = new Float32Array(mic.fftSize);
  let replyQuietSince = performance.now();
  let replyLoud = false;
  let answeredSpeechAt = null;
  meterTimer = setInterval(() => {
    const now = performance.now();
    const micRms = rms(mic, buffer);
    $("mic-level").style.width = `${Math.min(100, micRms * 400)}%`;
    if (micRms > LOUD_RMS) talker.lastMicLoudAt = now;
    const loud = rms(reply, buffer) > LOUD_RMS;
    // One entry per reply: the first sound after the user last spoke (a pause
    // between the reply's sentences is not a new reply).
    if (loud && !replyLoud && now - replyQuietSince > QUIET_MS &&
        talker.lastMicLoudAt !== answeredSpeechAt) {
      answeredSpeechAt = talker.lastMicLoudAt;
      talker.heard.push({ at: now, lastSpeechAt: talker.lastMicLoudAt });
    }
    if (!loud && replyLoud) replyQuietSince = now;
    replyLoud = loud;
  }, 10);
}

function onEvent(message) {
  const event = JSON.parse(message.data);
  event.at = performance.now();
  talker.events.push(event);
  switch (event.type) {
    case "started":
      talker.reconnectUntil = null;
      talker.traceId = event.trace_id;
      $("trace").textContent = `trace id ${event.trace_id}`;
      break;
    case "state":
      if (talker.state !== "error") setState(event.state);
      break;
    case "transcript": {
      const item = bubble("user", event.turn);
      item.textContent = event.text;
      item.classList.toggle("interim", !event.final);
      if (event.final && !event.text.trim()) {
        item.remove();
        bubbles.user.delete(event.turn);
      }
      break;
    }
    case "reply":
      bubble("avatar", event.turn).textContent += event.text;
      break;
    case "finished":
      if (event.reply_text) bubble("avatar", event.turn).textContent = event.reply_text;
      break;
    case "interrupted":
    case "barge_in":
      bubbles.avatar.get(event.turn)?.classList.add("cut");
      break;
    case "error":
      if (event.fatal) {
        setState("error", event.message);
        stop(false);
        if (event.retry_after_ms) reconnectAfter(event.retry_after_ms);
      } else {
        note(event.stage ? `${event.stage}: ${event.message}` : event.message, true);
      }
      break;
  }
}

async function start() {
  const avatarId = $("avatar-select").value;
  if (!avatarId) {
    setState("error", "Pick an avatar (or upload a portrait) first.");
    return;
  }
  setState("connecting");
  $("talk").textContent = "Stop";
  $("talk").classList.add("live");
  talker.events = [];
  talker.heard = [];
  // Turns count from 0 again in a new call: earlier bubbles stay, but are done.
  bubbles.user = new Map();
  bubbles.avatar = new Map();
  if ($("log").children.length) note("A new conversation.");
  audioContext = new AudioContext();
  try {
    micStream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
  } catch (error) {
    setState("error", `The microphone is not available: ${error.message}`);
    stop(false);
    return;
  }
  const pc = new RTCPeerConnection();
  talker.pc = pc;
  const channel = pc.createDataChannel("events");
  talker.channel = channel;
  channel.onmessage = onEvent;
  channel.onclose = () => {
    // The server closed it without a word (the page's own stop() forgets the channel first).
    if (talker.channel !== channel) return;
    if (talker.state !== "error") setState("error", "The server ended the conversation.");
    stop(false);
  };
  pc.addTransceiver(micStream.getAudioTracks()[0], { direction: "sendrecv" });
  pc.addTransceiver("video", { direction: "recvonly" });
  const video = $("avatar");
  const stream = new MediaStream();
  pc.ontrack = (event) => {
    stream.addTrack(event.track);
    video.srcObject = stream;
    if (event.track.kind === "audio") startMeters(micStream, event.track);
    if (event.track.kind === "video") $("placeholder").hidden = true;
  };
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === "failed") {
      setState("error", "The connection to the server was lost.");
      stop(false);
      reconnectAfter(RECONNECT_EVERY_MS);
    }
  };
  await pc.setLocalDescription(await pc.createOffer());
  await waitForIceGathering(pc);
  const response = await fetch("/rtc/offer", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      sdp: pc.localDescription.sdp,
      type: "offer",
      avatar_id: avatarId,
      voice_id: $("voice-select").value,
      language: $("language").value,
    }),
  });
  if (!response.ok) {
    setState("error", await errorOf(response));
    stop(false);
    return;
  }
  const answer = await response.json();
  talker.traceId = answer.trace_id;
  await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
  $("typed-text").disabled = $("typed-send").disabled = false;
}

function stop(resetState = true) {
  if (talker.channel?.readyState === "open") talker.channel.send(JSON.stringify({ type: "bye" }));
  talker.pc?.close();
  talker.pc = null;
  talker.channel = null;
  clearInterval(meterTimer);
  micStream?.getTracks().forEach((track) => track.stop());
  audioContext?.close();
  audioContext = null;
  $("mic-level").style.width = "0";
  $("avatar").srcObject = null;
  $("placeholder").hidden = false;
  $("placeholder").textContent = "Press Talk to start again.";
  $("talk").textContent = "Talk";
  $("talk").classList.remove("live");
  $("typed-text").disabled = $("typed-send").disabled = true;
  if (resetState) setState("idle");
}

/** The server restarted or the connection failed: press Talk for the person, every
 * RECONNECT_EVERY_MS, until a conversation starts again or a minute has gone by. */
function reconnectAfter(ms) {
  talker.reconnectUntil ??= performance.now() + 60_000;
  if (performance.now() > talker.reconnectUntil) return; // the error stays on the page
  $("placeholder").textContent = "Reconnecting…";
  talker.reconnecting = setTimeout(async () => {
    talker.reconnecting = null;
    try {
      await start();
    } catch (error) {
      stop(false);
      setState("error", `The server is not reachable: ${error.message}`);
      reconnectAfter(RECONNECT_EVERY_MS);
    }
  }, ms);
}

$("controls").addEventListener("submit", (event) => {
  event.preventDefault();
  clearTimeout(talker.reconnecting);
  talker.reconnecting = talker.reconnectUntil = null;
  if (talker.pc) stop();
  else start().catch((error) => { setState("error", error.message); stop(false); });
});
$("portrait").addEventListener("change", (event) => {
  const [file] = event.target.files;
  if (file) uploadPortrait(file).finally(() => { event.target.value = ""; });
});
$("typed").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("typed-text").value.trim();
  if (!text || talker.channel?.readyState !== "open") return;
  talker.channel.send(JSON.stringify({ type: "text", text }));
  const item = document.createElement("li");
  item.className = "user";
  item.textContent = text;
  appendToLog(item);
  $("typed-text").value = "";
});

setState("idle");
loadOptions().catch((error) => setState("error", error.message));
