// The chat page of `mistol serve`: conversations kept in this browser (localStorage),
// replies streamed from /v1/chat/completions, and, when the server allows it, Python blocks
// run in the server's sandbox after the person confirms.
import { renderMarkdown } from "./markdown.js";

const STORE_KEY = "mistol.conversations.v1";
const SETTINGS_KEY = "mistol.settings.v1";
const DEFAULT_SETTINGS = { system: "", temperature: 0.7, top_p: 0.95, max_tokens: 1024, apiKey: "" };
const MAX_CODE_ROUNDS = 8; // as the terminal chat: blocks run within one reply
const RUN_TOKEN_KEY = "mistol.runToken"; // sessionStorage: this tab only, gone when it closes
const $ = (id) => document.getElementById(id);

const state = {
  config: { model: "", allow_code: false, api_key_required: false, code_system_prompt: null, max_context: 0 },
  conversations: [], // newest first: {id, title, created, updated, messages: [{role, content, stats?, error?}]}
  currentId: null,
  settings: { ...DEFAULT_SETTINGS },
  streaming: null, // {controller, conversation, message} while a reply streams
};

// -- storage -----------------------------------------------------------------------------------
function load() {
  try {
    state.conversations = JSON.parse(localStorage.getItem(STORE_KEY) || "[]").filter(
      (c) => c && typeof c.id === "string" && Array.isArray(c.messages));
  } catch {
    state.conversations = [];
  }
  try {
    state.settings = { ...DEFAULT_SETTINGS, ...JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}") };
  } catch {
    state.settings = { ...DEFAULT_SETTINGS };
  }
}

function save() {
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify(state.conversations));
    localStorage.setItem(SETTINGS_KEY, JSON.stringify(state.settings));
  } catch (e) {
    showNotice(`Could not save in this browser's storage (${e.name}); export the conversation to keep it.`);
  }
}

let saveTimer = null;
function saveSoon() { // while streaming: at most once a second
  if (saveTimer === null) saveTimer = setTimeout(() => { saveTimer = null; save(); }, 1000);
}

function current() {
  return state.conversations.find((c) => c.id === state.currentId) || null;
}

function newConversation() {
  const id = (crypto.randomUUID && crypto.randomUUID()) || `${Date.now()}-${Math.random().toString(16).slice(2)}`;
  const conversation = { id, title: "New chat", created: Date.now(), updated: Date.now(), messages: [] };
  state.conversations.unshift(conversation);
  state.currentId = id;
  return conversation;
}

// -- server ------------------------------------------------------------------------------------
function authHeaders() {
  const key = state.settings.apiKey.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The run token comes in the address `mistol serve --allow-code` printed (/?token=...). It is
// kept for this tab and taken out of the address bar, so that it is not bookmarked, shared
// or left in the history.
function takeRunToken() {
  const url = new URL(location.href);
  const token = url.searchParams.get("token");
  if (token === null) return;
  try {
    sessionStorage.setItem(RUN_TOKEN_KEY, token);
  } catch {
    // no sessionStorage: the token is lost with this page and runs will be refused
  }
  url.searchParams.delete("token");
  history.replaceState(history.state, "", url.pathname + url.search + url.hash);
}

function runHeaders() {
  let token = null;
  try {
    token = sessionStorage.getItem(RUN_TOKEN_KEY);
  } catch {
    token = null;
  }
  return token ? { "X-Mistol-Run-Token": token } : {};
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

// Stream one reply into `message` (appending to its content). `continueLast`: the message is
// already in the conversation and the model goes on writing it (after code output).
async function streamReply(conversation, message, continueLast) {
  const history = conversation.messages.slice(0, conversation.messages.indexOf(message) + (continueLast ? 1 : 0));
  const messages = history.map(({ role, content }) => ({ role, content }));
  const system = state.settings.system.trim() || (state.config.allow_code ? state.config.code_system_prompt : "");
  if (system) messages.unshift({ role: "system", content: system });
  const body = {
    model: state.config.model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number(state.settings.temperature),
    top_p: Number(state.settings.top_p),
    max_tokens: Math.max(1, Math.floor(Number(state.settings.max_tokens))),
  };
  if (continueLast) Object.assign(body, { add_generation_prompt: false, continue_final_message: true });

  const controller = new AbortController();
  state.streaming = { controller, conversation, message, stoppedForCode: false };
  setBusy(true);
  const started = performance.now();
  let firstToken = null;
  const stats = message.stats || (message.stats = { tokens: 0, seconds: 0, ttft: null });
  let segmentTokens = 0; // from the usage the server sends at the end
  let deltas = 0; // for a stream cut short (Stop): about one token each
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    read: for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) segmentTokens = chunk.usage.completion_tokens;
          const delta = chunk.choices?.[0]?.delta?.content;
          if (delta) {
            if (firstToken === null) firstToken = performance.now();
            deltas++;
            message.content += delta;
            if (stats.ttft === null) stats.ttft = (firstToken - started) / 1000;
            // A closing fence counts at once, without waiting for its newline (as in the terminal).
            const block = state.config.allow_code && pendingBlock(message.content, message.content.endsWith("\n```"));
            if (block) { // pause at a closed Python block, as the terminal chat does
              message.content = message.content.slice(0, block.end);
              state.streaming.stoppedForCode = true;
              controller.abort();
              scheduleRender(message);
              saveSoon();
              break read; // events already read in the same chunk come after the block: drop them
            }
            scheduleRender(message);
            saveSoon();
          }
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") message.error = e.message || String(e);
  } finally {
    const ended = performance.now();
    if (firstToken !== null) {
      if (!segmentTokens) segmentTokens = deltas;
      stats.tokens += segmentTokens;
      stats.seconds += (ended - firstToken) / 1000;
      stats.decodeTokens = (stats.decodeTokens || 0) + Math.max(0, segmentTokens - 1);
    }
    state.streaming = null;
    conversation.updated = Date.now();
    // One last full render, then the page is idle: a render still queued for the next frame
    // would replace the message's buttons (Run, Regenerate) just as they can be clicked.
    pendingRenders.clear();
    save();
    setBusy(false); // (renders the messages)
  }
}

// The last closed ```python block of a reply if nothing but blank space follows it: the model is
// waiting for its output. Returns {code, end} (end: just after the closing fence line).
// `finished`: the reply has ended, so its last line is complete even without a newline.
function pendingBlock(text, finished = false) {
  const lines = text.split("\n");
  let offset = 0;
  let open = null;
  let found = null;
  for (let n = 0; n < lines.length; n++) {
    const line = lines[n];
    const complete = finished || n < lines.length - 1; // the last piece has no newline yet
    if (open === null) {
      const m = /^( {0,3})(`{3,}|~{3,})[ \t]*([\w+#.-]*)/.exec(line);
      if (m && complete) open = { indent: m[1], fence: m[2], language: m[3].toLowerCase(), start: offset + line.length + 1, lines: [] };
      else if (line.trim()) found = null;
    } else if (complete && new RegExp(`^ {0,3}${open.fence[0] === "`" ? "`" : "~"}{${open.fence.length},}[ \\t]*$`).test(line)) {
      const runnable = ["python", "py", "python3", "py3"].includes(open.language);
      found = runnable ? { code: open.lines.join("\n"), end: Math.min(text.length, offset + line.length + 1) } : null;
      open = null;
    } else if (open !== null && complete) {
      open.lines.push(line.startsWith(open.indent) ? line.slice(open.indent.length) : line.trimStart());
    }
    offset += line.length + 1;
  }
  return open === null ? found : null;
}

function runRounds(message) {
  return (message.content.match(/\nOutput:\n```\n/g) || []).length;
}

// -- code runs ---------------------------------------------------------------------------------
function confirmRun(code) {
  const dialog = $("run-dialog");
  $("run-dialog-code").textContent = code;
  return new Promise((resolve) => {
    const done = (answer) => {
      $("run-confirm").removeEventListener("click", yes);
      $("run-cancel").removeEventListener("click", no);
      dialog.removeEventListener("cancel", no);
      dialog.close();
      resolve(answer);
    };
    const yes = () => done(true);
    const no = () => done(false);
    $("run-confirm").addEventListener("click", yes);
    $("run-cancel").addEventListener("click", no);
    dialog.addEventListener("cancel", no);
    dialog.showModal();
    $("run-cancel").focus(); // declining is the default, as in the terminal
  });
}

async function runBlock(conversation, message, code) {
  if (state.streaming || !(await confirmRun(code))) return;
  setBusy(true, "Running the code…");
  let feedback;
  try {
    const response = await fetch("/api/run", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders(), ...runHeaders() },
      body: JSON.stringify({ code, conversation: conversation.id }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    feedback = (await response.json()).feedback;
  } catch (e) {
    setBusy(false);
    message.error = `The code could not be run: ${e.message}`;
    renderMessages();
    return;
  }
  message.content += feedback;
  delete message.error;
  save();
  renderMessages();
  await streamReply(conversation, message, true);
}

// -- sending, stopping, regenerating, editing ---------------------------------------------------
async function send(text) {
  if (state.streaming || !text.trim()) return;
  const conversation = current() || newConversation();
  if (!conversation.messages.length) conversation.title = titleFrom(text);
  conversation.messages.push({ role: "user", content: text });
  const reply = { role: "assistant", content: "" };
  conversation.messages.push(reply);
  // Move the conversation to the top of the list.
  state.conversations = [conversation, ...state.conversations.filter((c) => c !== conversation)];
  save();
  renderAll();
  await streamReply(conversation, reply, false);
}

function stop() {
  if (state.streaming) state.streaming.controller.abort();
}

async function regenerate() {
  const conversation = current();
  if (!conversation || state.streaming) return;
  const last = conversation.messages.at(-1);
  if (!last || last.role !== "assistant") return;
  const reply = { role: "assistant", content: "" };
  conversation.messages[conversation.messages.length - 1] = reply;
  save();
  renderMessages();
  await streamReply(conversation, reply, false);
}

function editLastUser(node, message) {
  if (state.streaming) return;
  const box = document.createElement("textarea");
  box.className = "edit-box";
  box.value = message.content;
  const saveButton = button("Save & send", "primary", async () => {
    const conversation = current();
    const text = box.value;
    if (!text.trim()) return;
    const at = conversation.messages.indexOf(message);
    conversation.messages.splice(at + 1);
    message.content = text;
    const reply = { role: "assistant", content: "" };
    conversation.messages.push(reply);
    if (at === 0) conversation.title = titleFrom(text);
    save();
    renderAll();
    await streamReply(conversation, reply, false);
  });
  const cancel = button("Cancel", "", () => renderMessages());
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); saveButton.click(); }
    if (e.key === "Escape") { e.preventDefault(); e.stopPropagation(); cancel.click(); }
  });
  node.querySelector(".content").replaceChildren(box);
  node.querySelector(".actions").replaceChildren(saveButton, cancel);
  box.focus();
}

function titleFrom(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 48 ? `${line.slice(0, 47)}…` : line;
}

// -- rendering ---------------------------------------------------------------------------------
function button(label, className, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (className) b.className = className;
  b.addEventListener("click", onClick);
  return b;
}

function renderAll() {
  renderSidebar();
  renderMessages();
}

function renderSidebar() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conversation of state.conversations) {
    const item = document.createElement("li");
    item.className = conversation.id === state.currentId ? "active" : "";
    item.dataset.id = conversation.id;
    const open = button(conversation.title || "Untitled", "title", () => {
      if (state.streaming) return;
      state.currentId = conversation.id;
      document.body.classList.remove("sidebar-open");
      renderAll();
    });
    open.title = conversation.title;
    const rename = button("✎", "icon rename", () => renameConversation(item, conversation));
    rename.setAttribute("aria-label", `Rename ${conversation.title}`);
    const remove = button("×", "icon delete", () => deleteConversation(conversation));
    remove.setAttribute("aria-label", `Delete ${conversation.title}`);
    item.append(open, rename, remove);
    list.append(item);
  }
}

function renameConversation(item, conversation) {
  const input = document.createElement("input");
  input.className = "rename-box";
  input.value = conversation.title;
  const finish = (keep) => {
    if (keep && input.value.trim()) conversation.title = input.value.trim();
    save();
    renderAll();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    if (e.key === "Escape") { e.preventDefault(); e.stopPropagation(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
  item.replaceChildren(input);
  input.focus();
  input.select();
}

function deleteConversation(conversation) {
  if (state.streaming?.conversation === conversation) return;
  if (!window.confirm(`Delete "${conversation.title}"? This cannot be undone.`)) return;
  state.conversations = state.conversations.filter((c) => c !== conversation);
  if (state.currentId === conversation.id) state.currentId = state.conversations[0]?.id ?? null;
  save();
  renderAll();
}

const pendingRenders = new Set();
function scheduleRender(message) {
  if (!pendingRenders.size) requestAnimationFrame(() => {
    for (const m of pendingRenders) {
      const node = document.querySelector(`.message[data-index="${current()?.messages.indexOf(m)}"]`);
      if (node) fillMessage(node, m);
    }
    pendingRenders.clear();
    scrollToEnd();
  });
  pendingRenders.add(message);
}

function renderMessages() {
  const conversation = current();
  $("title").textContent = conversation ? conversation.title : "mistol";
  const box = $("messages");
  box.replaceChildren();
  if (!conversation || !conversation.messages.length) {
    const hello = document.createElement("div");
    hello.className = "empty";
    hello.textContent = state.config.model ? `Chat with ${state.config.model}.` : "Chat";
    box.append(hello);
    return;
  }
  conversation.messages.forEach((message, index) => {
    const node = document.createElement("article");
    node.className = `message ${message.role}`;
    node.dataset.index = index;
    const who = document.createElement("div");
    who.className = "role";
    who.textContent = message.role === "user" ? "You" : "Assistant";
    const content = document.createElement("div");
    content.className = "content";
    const meta = document.createElement("div");
    meta.className = "meta";
    const actions = document.createElement("div");
    actions.className = "actions";
    node.append(who, content, meta, actions);
    fillMessage(node, message);
    box.append(node);
  });
  scrollToEnd();
}

function fillMessage(node, message) {
  const conversation = current();
  const messages = conversation.messages;
  const index = messages.indexOf(message);
  const isLast = index === messages.length - 1;
  const streamingThis = state.streaming?.message === message;
  const content = node.querySelector(".content");
  if (message.role === "user") {
    content.textContent = message.content;
  } else {
    const pending = state.config.allow_code && isLast && !streamingThis && pendingBlock(message.content, true);
    content.replaceChildren(renderMarkdown(message.content, {
      codeBlock(figure, language, code, closed) {
        if (!pending || !closed || code !== pending.code || figure.dataset.run) return;
        figure.dataset.run = "pending";
        const run = button("Run", "primary run-code", () => runBlock(conversation, message, code));
        if (runRounds(message) >= MAX_CODE_ROUNDS) run.disabled = true;
        figure.querySelector(".code-bar").append(run);
      },
    }));
    // Only the last pending block keeps its Run button.
    const runs = content.querySelectorAll(".run-code");
    runs.forEach((b, n) => n < runs.length - 1 && b.remove());
    if (streamingThis && !message.content) content.append(typing());
  }
  if (message.error) {
    const error = document.createElement("p");
    error.className = "error";
    error.textContent = message.error;
    content.append(error);
  }
  node.querySelector(".meta").textContent = message.role === "assistant" && !streamingThis ? statsText(message.stats) : "";
  const actions = node.querySelector(".actions");
  actions.replaceChildren();
  if (state.streaming) return;
  if (message.role === "assistant" && isLast) actions.append(button("Regenerate", "regenerate", regenerate));
  const lastUser = messages.map((m) => m.role).lastIndexOf("user");
  if (message.role === "user" && index === lastUser) actions.append(button("Edit", "edit", () => editLastUser(node, message)));
}

function typing() {
  const dots = document.createElement("span");
  dots.className = "typing";
  dots.textContent = "…";
  return dots;
}

function statsText(stats) {
  if (!stats || !stats.tokens) return "";
  const parts = [`${stats.tokens} tokens`];
  if (stats.seconds > 0 && stats.decodeTokens > 0) parts.push(`${(stats.decodeTokens / stats.seconds).toFixed(1)} tok/s`);
  if (stats.ttft !== null && stats.ttft !== undefined) parts.push(`first token ${stats.ttft.toFixed(2)} s`);
  return parts.join(" · ");
}

function scrollToEnd() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function setBusy(busy, label) {
  $("send").hidden = busy;
  $("stop").hidden = !busy || !state.streaming;
  $("input").dataset.busy = busy ? "1" : "";
  document.body.classList.toggle("busy", busy);
  if (label) showNotice(label); else hideNotice();
  if (!busy) renderMessages();
}

function showNotice(text) {
  $("notice").textContent = text;
  $("notice").hidden = false;
}

function hideNotice() {
  $("notice").hidden = true;
}

// -- export ------------------------------------------------------------------------------------
function download(name, type, text) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function fileName(conversation, extension) {
  const base = (conversation.title || "chat").replace(/[^\w.-]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 60) || "chat";
  return `${base}.${extension}`;
}

function exportJson() {
  const conversation = current();
  if (!conversation) return;
  const system = state.settings.system.trim();
  const data = { title: conversation.title, model: state.config.model, created: new Date(conversation.created).toISOString(),
    messages: [...(system ? [{ role: "system", content: system }] : []),
      ...conversation.messages.map(({ role, content }) => ({ role, content }))] };
  download(fileName(conversation, "json"), "application/json", JSON.stringify(data, null, 2));
}

function exportMarkdown() {
  const conversation = current();
  if (!conversation) return;
  const parts = [`# ${conversation.title}`, "", `*${state.config.model}, ${new Date(conversation.created).toLocaleString()}*`, ""];
  for (const m of conversation.messages) parts.push(`## ${m.role === "user" ? "You" : "Assistant"}`, "", m.content, "");
  download(fileName(conversation, "md"), "text/markdown", parts.join("\n"));
}

// -- settings and start-up ------------------------------------------------------------------------
function bindSettings() {
  const fields = { "system-prompt": "system", temperature: "temperature", "top-p": "top_p", "max-tokens": "max_tokens", "api-key": "apiKey" };
  for (const [id, key] of Object.entries(fields)) {
    const input = $(id);
    input.value = state.settings[key];
    input.addEventListener("input", () => {
      state.settings[key] = input.value;
      save();
    });
  }
  $("toggle-settings").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
  });
}

async function loadConfig() {
  try {
    const response = await fetch("/api/config");
    if (!response.ok) throw new Error(await errorText(response));
    state.config = await response.json();
  } catch (e) {
    showNotice(`Cannot reach the server: ${e.message}`);
    return;
  }
  $("model").textContent = state.config.model;
  if (state.config.allow_code) $("system-prompt").placeholder = state.config.code_system_prompt;
  $("api-key-label").hidden = !state.config.api_key_required;
  if (state.config.allow_code && !runHeaders()["X-Mistol-Run-Token"]) {
    showNotice("To run code, open this page through the address `mistol serve` printed (it ends in ?token=…).");
  }
  if (state.config.api_key_required && !state.settings.apiKey) {
    $("settings").hidden = false;
    showNotice("This server needs an API key: enter it under Settings.");
  }
  document.body.dataset.ready = "1";
}

function start() {
  takeRunToken();
  load();
  state.currentId = state.conversations[0]?.id ?? null;
  bindSettings();
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = $("input");
    const text = input.value;
    if (state.streaming || !text.trim()) return;
    input.value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.streaming) { e.preventDefault(); stop(); }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => {
    if (state.streaming) return;
    state.currentId = null;
    document.body.classList.remove("sidebar-open");
    renderAll();
    $("input").focus();
  });
  $("export-json").addEventListener("click", exportJson);
  $("export-md").addEventListener("click", exportMarkdown);
  $("open-sidebar").addEventListener("click", () => document.body.classList.add("sidebar-open"));
  $("close-sidebar").addEventListener("click", () => document.body.classList.remove("sidebar-open"));
  window.addEventListener("storage", (e) => { // another tab changed the list
    if (e.key === STORE_KEY && !state.streaming) { load(); renderAll(); }
  });
  renderAll();
  loadConfig().then(renderMessages);
  $("input").focus();
}

start();
