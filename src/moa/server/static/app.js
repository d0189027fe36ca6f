// The page: pick a pipeline, chat, watch each run's agents. The conversation lives in local
// storage; an API key (when the server wants one) lives in session storage only, so it leaves
// with the tab.

import { RunView } from "./run-view.js";

const STORE = "moa.conversation.v1";
const KEY = "moa.apiKey";
const $ = (id) => document.getElementById(id);

const ui = {
  log: $("log"),
  model: $("model"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  clear: $("clear"),
  notice: $("notice"),
  keyButton: $("key-button"),
  keyDialog: $("key-dialog"),
  keyForm: $("key-form"),
  keyInput: $("key-input"),
  keyError: $("key-error"),
};

// turns: [{user, events, output, ok}]; `events` is what the run streamed, compacted.
let conversation = load();
let running = null; // {controller, turn, view}

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) ?? "null");
    if (saved && Array.isArray(saved.turns)) return saved;
  } catch {
    // a damaged entry: start afresh
  }
  return { model: null, turns: [] };
}

function save() {
  try {
    localStorage.setItem(STORE, JSON.stringify(conversation));
  } catch (error) {
    notify(`could not save the conversation in this browser: ${error.message}`);
  }
}

function notify(message) {
  ui.notice.textContent = message;
  ui.notice.hidden = !message;
}

// --- the API key ------------------------------------------------------------------------------

function headers() {
  const h = { "content-type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

let keyWaiters = [];

/** Ask for a key; resolves once the user gave one. */
function askKey(message) {
  ui.keyError.textContent = message;
  ui.keyError.hidden = !message;
  ui.keyButton.hidden = false;
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.keyInput.focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = ui.keyInput.value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  ui.keyInput.value = "";
  ui.keyDialog.close();
  const waiters = keyWaiters;
  keyWaiters = [];
  for (const resolve of waiters) resolve();
});

ui.keyButton.addEventListener("click", () => {
  askKey("").then(loadModels);
});

/** fetch() with the key; a 401 asks for a (new) key and tries again. */
async function call(path, init = {}) {
  for (;;) {
    const response = await fetch(path, { ...init, headers: headers() });
    if (response.status !== 401) return response;
    const had = sessionStorage.getItem(KEY);
    sessionStorage.removeItem(KEY);
    await askKey(had ? "That key was refused. Try another." : "");
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message ?? `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// --- pipelines --------------------------------------------------------------------------------

async function loadModels() {
  const response = await call("/v1/models");
  if (!response.ok) {
    notify(`could not list the pipelines: ${await errorMessage(response)}`);
    return;
  }
  const { data } = await response.json();
  ui.model.replaceChildren(
    ...data.map((m) => {
      const option = document.createElement("option");
      option.value = option.textContent = m.id;
      return option;
    }),
  );
  if (conversation.model && data.some((m) => m.id === conversation.model)) {
    ui.model.value = conversation.model;
  }
  conversation.model = ui.model.value;
  ui.send.disabled = false;
  document.body.dataset.ready = "true";
}

ui.model.addEventListener("change", () => {
  conversation.model = ui.model.value;
  save();
});

// --- the conversation -------------------------------------------------------------------------

function userBubble(text) {
  const node = document.createElement("div");
  node.className = "msg user";
  node.textContent = text;
  return node;
}

function turnNode(turn) {
  const article = document.createElement("article");
  article.className = "turn";
  const view = new RunView({ copy: copyAnswer, regenerate });
  view.turn = turn;
  article.append(userBubble(turn.user), view.node);
  ui.log.append(article);
  return view;
}

function showAll() {
  ui.log.replaceChildren();
  for (const turn of conversation.turns) {
    const view = turnNode(turn);
    for (const event of turn.events) view.apply(event);
    if (turn.stopped) view.stopped(turn.stopped);
    view.finish({ live: false });
  }
  markLast();
}

function markLast() {
  const buttons = ui.log.querySelectorAll(".regenerate");
  buttons.forEach((b, i) => (b.hidden = i !== buttons.length - 1));
}

/** The messages for the next run: earlier turns that got an answer, then the new question. */
function messagesFor(turn) {
  const messages = [];
  for (const t of conversation.turns) {
    if (t === turn) break;
    if (!t.ok) continue;
    messages.push({ role: "user", content: t.user }, { role: "assistant", content: t.output });
  }
  messages.push({ role: "user", content: turn.user });
  return messages;
}

/** Merge each agent's text pieces (and the answer's) into one event at the first piece's
 *  time: the same picture after a reload, at a fraction of the storage. */
function compact(events) {
  const out = [];
  const merged = new Map();
  for (const event of events) {
    if (event.type === "agent_text_delta" || event.type === "text_delta") {
      const key = event.type === "text_delta" ? "answer" : `${event.layer}:${event.index}`;
      const into = merged.get(key);
      if (into) {
        into.text += event.text;
        continue;
      }
      const copy = { ...event };
      merged.set(key, copy);
      out.push(copy);
    } else {
      out.push(event);
    }
  }
  return out;
}

async function* serverEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

async function run(turn, view) {
  const controller = new AbortController();
  running = { controller, turn, view };
  setBusy(true);
  const timer = setInterval(() => view.tick(), 100);
  try {
    const response = await call("/v1/moa/runs", {
      method: "POST",
      body: JSON.stringify({ model: ui.model.value, messages: messagesFor(turn) }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const message = await errorMessage(response);
      view.apply({ type: "error", t: 0, message, result: null });
      turn.events.push({ type: "error", t: 0, message, result: null });
      return;
    }
    let last = null;
    for await (const event of serverEvents(response.body)) {
      turn.events.push(event);
      view.apply(event);
      last = event.type;
      if (event.type === "done") {
        turn.ok = true;
        turn.output = event.result.output;
      }
    }
    if (last !== "done" && last !== "error") {
      turn.stopped = "the stream ended before the run did (was the server stopped?)";
      view.stopped(turn.stopped);
    }
  } catch (error) {
    turn.stopped = controller.signal.aborted ? "stopped" : `the connection broke: ${error.message}`;
    view.stopped(turn.stopped);
  } finally {
    clearInterval(timer);
    running = null;
    turn.events = compact(turn.events);
    view.finish();
    markLast();
    save();
    setBusy(false);
  }
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.clear.disabled = busy;
  ui.model.disabled = busy;
  document.body.dataset.busy = String(busy);
  ui.log.querySelectorAll(".regenerate").forEach((b) => (b.disabled = busy));
}

async function send() {
  const text = ui.prompt.value.trim();
  if (!text || running || ui.send.disabled) return;
  ui.prompt.value = "";
  notify("");
  const turn = { user: text, events: [], output: "", ok: false };
  conversation.model = ui.model.value;
  conversation.turns.push(turn);
  save();
  const view = turnNode(turn);
  markLast();
  view.node.scrollIntoView({ block: "start" });
  await run(turn, view);
}

function stop() {
  if (running) running.controller.abort();
}

async function regenerate(view) {
  if (running) return;
  const turn = view.turn;
  const at = conversation.turns.indexOf(turn);
  if (at !== conversation.turns.length - 1) return;
  const fresh = { user: turn.user, events: [], output: "", ok: false };
  conversation.turns[at] = fresh;
  const article = view.node.closest(".turn");
  article.remove();
  const next = turnNode(fresh);
  markLast();
  await run(fresh, next);
}

async function copyAnswer(view) {
  const text = view.turn.output || view.answer;
  try {
    await navigator.clipboard.writeText(text);
    view.copyButton.textContent = "Copied";
  } catch {
    view.copyButton.textContent = "Copy failed";
  }
  setTimeout(() => (view.copyButton.textContent = "Copy answer"), 1500);
}

ui.clear.addEventListener("click", () => {
  if (running) return;
  conversation.turns = [];
  save();
  showAll();
  ui.prompt.focus();
});

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.stop.addEventListener("click", stop);

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  } else if (event.key === "Escape" && running) {
    event.preventDefault();
    stop();
  }
});

showAll();
loadModels().catch((error) => notify(`could not reach the server: ${error.message}`));
ui.prompt.focus();
