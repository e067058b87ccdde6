// kvik's chat page: streams /v1/chat/completions (OpenAI SSE) and shows /metrics live.
// No framework, no build step: the server ships this file as it is.
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "kvik.apiKey";

const state = {
  history: [], // the conversation sent with each request: {role, content}
  controller: null, // AbortController of the streaming request; aborting closes the connection,
  // which makes the server abort the engine request (its SSE response's on_close)
};

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// The message of an OpenAI-shaped error response, or the status line.
async function errorText(res) {
  try {
    const data = await res.json();
    if (data && data.error && data.error.message) return data.error.message;
  } catch { /* not JSON */ }
  return `HTTP ${res.status} ${res.statusText}`;
}

function showStatus(message) {
  const box = $("status");
  box.textContent = message;
  box.hidden = !message;
}

// The server answered 401: point the user at the key field.
function needKey(message) {
  $("settings").open = true;
  $("key-box").classList.add("attention");
  showStatus("This server needs an API key: enter it under Settings. (" + message + ")");
  $("api-key").focus();
}

async function loadModels() {
  let res;
  try {
    res = await fetch("/v1/models", { headers: headers() });
  } catch (err) {
    showStatus("Cannot reach the server: " + err.message);
    return;
  }
  if (res.status === 401) return needKey(await errorText(res));
  if (!res.ok) return showStatus("Could not list models: " + (await errorText(res)));
  const data = await res.json();
  const select = $("model");
  const previous = select.value;
  select.replaceChildren();
  for (const card of data.data || []) {
    const option = document.createElement("option");
    option.value = card.id;
    option.textContent = card.id;
    option.dataset.maxLen = card.max_model_len ?? "";
    select.append(option);
  }
  if (previous) select.value = previous;
  updateModelNote();
  $("key-box").classList.remove("attention");
  showStatus("");
}

function updateModelNote() {
  const option = $("model").selectedOptions[0];
  $("model-note").textContent = option && option.dataset.maxLen ? `context ${option.dataset.maxLen} tokens` : "";
}

// One message bubble in the log; returns its content element.
function addMessage(role, text) {
  $("empty")?.remove();
  const item = document.createElement("article");
  item.className = "msg " + role;
  item.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
  const who = document.createElement("h2");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "body";
  const meta = document.createElement("p");
  meta.className = "meta";
  item.append(who, body, meta);
  $("log").append(item);
  setText(body, role, text);
  scrollDown();
  return body;
}

function setText(body, role, text) {
  if (role === "user") body.textContent = text; // what the user typed, shown as typed
  else body.replaceChildren(renderMarkdown(text));
}

function scrollDown() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

// Yield the data of each server-sent event in a fetch body.
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("log").setAttribute("aria-busy", busy ? "true" : "false");
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = {
    model: $("model").value || undefined,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
  };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

async function send() {
  const prompt = $("prompt");
  const text = prompt.value.trim();
  if (!text || state.controller) return;
  prompt.value = "";
  showStatus("");
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const body = addMessage("assistant", "");
  const item = body.parentElement;
  item.classList.add("streaming");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);

  let reply = "";
  let chunks = 0; // content chunks: one per generated token, near enough for a live count
  let usage = null;
  let finish = null;
  let firstAt = null;
  let pending = false; // a render is scheduled for the next frame
  const started = performance.now();
  const render = () => {
    pending = false;
    setText(body, "assistant", reply);
    scrollDown();
  };
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (res.status === 401) {
      // Not sent: take the message back into the box so it goes again once the key is in.
      state.history.pop();
      item.previousElementSibling?.remove();
      item.remove();
      if (!prompt.value) prompt.value = text;
      needKey(await errorText(res));
      return;
    }
    if (!res.ok) throw new Error(await errorText(res));
    for await (const data of sseData(res.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          reply += delta;
          chunks += 1;
          firstAt ??= performance.now();
          if (!pending) { pending = true; requestAnimationFrame(render); }
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (err) {
    if (err.name === "AbortError") finish = "stopped";
    else finish = "error: " + err.message;
  } finally {
    state.controller = null;
    setBusy(false);
    if (item.isConnected) { // (a 401 took the exchange back and sent the focus to the key field)
      render();
      item.classList.remove("streaming");
      if (reply) state.history.push({ role: "assistant", content: reply });
      const tokens = usage ? usage.completion_tokens : chunks;
      const seconds = (performance.now() - (firstAt ?? started)) / 1000;
      const rate = tokens > 1 && seconds > 0 ? ` · ${(tokens / seconds).toFixed(1)} tokens/s` : "";
      const meta = item.querySelector(".meta");
      meta.textContent = `${tokens} tokens${rate}` + (finish ? ` · ${finish}` : "");
      if (finish && finish.startsWith("error")) item.classList.add("failed");
      prompt.focus();
    }
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

// -- the live panel: /metrics (Prometheus text format) every second -------------------------
const live = { lastTokens: null, lastAt: 0 };

// Sum of each metric's samples by name (labels dropped): {"kvik:num_requests_running": 1, ...}.
export function parseMetrics(text) {
  const values = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([^\s{]+)(\{.*\})?\s+(\S+)/);
    if (m) values[m[1]] = (values[m[1]] || 0) + Number(m[3]);
  }
  return values;
}

async function pollMetrics() {
  if (document.hidden) return;
  let text;
  try {
    const res = await fetch("/metrics");
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    text = await res.text();
  } catch (err) {
    $("m-note").textContent = "Metrics unavailable: " + err.message;
    return;
  }
  const v = parseMetrics(text);
  const now = performance.now();
  const tokens = v["kvik:generation_tokens_total"];
  if (tokens !== undefined && live.lastTokens !== null && now > live.lastAt) {
    const rate = Math.max(0, tokens - live.lastTokens) / ((now - live.lastAt) / 1000);
    $("m-tps").textContent = rate.toFixed(1);
  }
  if (tokens !== undefined) { live.lastTokens = tokens; live.lastAt = now; }
  const show = (id, value) => { $(id).textContent = value === undefined ? "–" : String(value); };
  show("m-running", v["kvik:num_requests_running"]);
  show("m-waiting", v["kvik:num_requests_waiting"]);
  const kv = v["kvik:kv_cache_usage_perc"];
  if (kv !== undefined) {
    $("m-kv-meter").value = kv;
    $("m-kv").textContent = (kv * 100).toFixed(1) + "%";
  }
  $("m-note").textContent = "";
}

function newChat() {
  stop();
  state.history = [];
  const empty = document.createElement("p");
  empty.className = "empty";
  empty.id = "empty";
  empty.textContent = "Ask something to start a conversation.";
  $("log").replaceChildren(empty);
  showStatus("");
  $("prompt").focus();
}

function init() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, key.value.trim());
    loadModels();
  });
  const temperature = $("temperature");
  temperature.addEventListener("input", () => { $("temperature-value").textContent = temperature.value; });
  $("model").addEventListener("change", updateModelNote);
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("prompt").addEventListener("keydown", (event) => {
    // Enter sends, Shift+Enter is a new line; never while an input method is composing text.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    } else if (event.key === "Escape") {
      stop();
    }
  });
  // Phones: settings folded away so the chat comes first (also when a window is narrowed).
  const narrow = window.matchMedia("(max-width: 720px)");
  if (narrow.matches) $("settings").open = false;
  narrow.addEventListener("change", () => { $("settings").open = !narrow.matches; });
  loadModels();
  pollMetrics();
  setInterval(pollMetrics, 1000);
  $("prompt").focus();
}

init();
