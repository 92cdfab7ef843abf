// The chat page of `python -m internlm_fast.serve`: streams answers from POST /v1/chat/completions
// (OpenAI's server-sent events), keeps the conversation in `conversation` and sends it whole each turn.
// Model text only ever reaches the page as text nodes, so nothing it says is parsed as HTML.
"use strict";

(() => {
  const API_KEY_STORAGE = "internlm_fast.apiKey";
  const DEFAULT_MAX_TOKENS_LIMIT = 1024;

  const $ = (id) => document.getElementById(id);
  const ui = {
    app: $("app"),
    modelName: $("model-name"),
    newChat: $("new-chat"),
    systemPrompt: $("system-prompt"),
    temperature: $("temperature"),
    temperatureValue: $("temperature-value"),
    topP: $("top-p"),
    topPValue: $("top-p-value"),
    maxTokens: $("max-tokens"),
    maxTokensValue: $("max-tokens-value"),
    apiKey: $("api-key"),
    tokensPerSecond: $("tokens-per-second"),
    messages: $("messages"),
    error: $("error"),
    composer: $("composer"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
  };

  /** The turns sent with every request: {role: "user" | "assistant", content}. */
  const conversation = [];
  let modelId = null;
  /** The answer being streamed, or null. */
  let current = null;

  class ServerError extends Error {}

  // settings ----------------------------------------------------------------------------------------

  function readStoredKey() {
    try {
      return localStorage.getItem(API_KEY_STORAGE) || "";
    } catch {
      return "";
    }
  }

  function storeKey(key) {
    try {
      if (key) localStorage.setItem(API_KEY_STORAGE, key);
      else localStorage.removeItem(API_KEY_STORAGE);
    } catch {
      // storage can be disabled; the key then lasts as long as the page
    }
  }

  function authHeaders(extra = {}) {
    const key = ui.apiKey.value.trim();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
  }

  function showSliderValues() {
    ui.temperatureValue.textContent = Number(ui.temperature.value).toFixed(2);
    ui.topPValue.textContent = Number(ui.topP.value).toFixed(2);
    ui.maxTokensValue.textContent = String(parseInt(ui.maxTokens.value, 10));
  }

  function setMaxTokensLimit(limit) {
    ui.maxTokens.max = String(Math.max(Number(ui.maxTokens.min), limit));
    // a range input clamps its value to the new max by itself
    showSliderValues();
  }

  function contextLength(model) {
    const candidates = [
      model.max_model_len,
      model.context_length,
      model.context_window,
      model.max_position_embeddings,
      model.meta && model.meta.n_ctx_train,
    ];
    return candidates.find((n) => Number.isInteger(n) && n > 0) || null;
  }

  async function loadModel() {
    try {
      const resp = await fetch("/v1/models", { headers: authHeaders() });
      if (!resp.ok) {
        ui.modelName.textContent = "model unavailable";
        showError(`GET /v1/models: ${await errorMessage(resp)}`);
        return;
      }
      const body = await resp.json();
      const model = body && Array.isArray(body.data) ? body.data[0] : null;
      if (!model) {
        ui.modelName.textContent = "no model";
        return;
      }
      modelId = model.id;
      ui.modelName.textContent = model.id;
      ui.modelName.title = model.id;
      setMaxTokensLimit(contextLength(model) || DEFAULT_MAX_TOKENS_LIMIT);
      hideError();
    } catch (err) {
      ui.modelName.textContent = "server unreachable";
      showError(`GET /v1/models: ${err.message || err}`);
    }
  }

  // errors ------------------------------------------------------------------------------------------

  function showError(message) {
    ui.error.textContent = message;
    ui.error.hidden = false;
  }

  function hideError() {
    ui.error.textContent = "";
    ui.error.hidden = true;
  }

  /** The message of an OpenAI error body ({"error": {"message"}}), else the status and body text. */
  function messageOfErrorBody(body) {
    if (!body || typeof body !== "object") return null;
    if (typeof body.error === "string") return body.error;
    if (body.error && typeof body.error.message === "string") return body.error.message;
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) {
      return body.detail.map((d) => (d && d.msg ? `${(d.loc || []).join(".")}: ${d.msg}` : JSON.stringify(d))).join("\n");
    }
    return null;
  }

  async function errorMessage(resp) {
    let text = "";
    try {
      text = await resp.text();
    } catch {
      // the body is optional here; the status says enough
    }
    let message = null;
    try {
      message = messageOfErrorBody(JSON.parse(text));
    } catch {
      // not JSON: show the text itself
    }
    const status = `${resp.status}${resp.statusText ? " " + resp.statusText : ""}`;
    if (message) return `${message} (${status})`;
    return text ? `${status}: ${text.slice(0, 500)}` : status;
  }

  // rendering ---------------------------------------------------------------------------------------

  const ROLE_LABELS = { user: "You", assistant: "Assistant" };

  function appendMessage(role, text) {
    const el = document.createElement("div");
    el.className = `message ${role}`;
    const label = document.createElement("span");
    label.className = "role";
    label.textContent = ROLE_LABELS[role] || role;
    const content = document.createElement("div");
    content.className = "content";
    el.append(label, content);
    renderContent(content, text);
    const follow = nearBottom();
    ui.messages.append(el);
    if (follow) scrollToBottom();
    return el;
  }

  function nearBottom() {
    const m = ui.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 60;
  }

  function scrollToBottom() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  const FENCE_OPEN = /^ {0,3}(`{3,})\s*([^`\s]*)[^`]*$/;

  /**
   * Fenced code blocks become <pre><code>; a fence not yet closed (the answer is still streaming)
   * runs to the end. Text between them keeps its line breaks (CSS pre-wrap) and `inline code`.
   */
  function renderContent(target, text) {
    const frag = document.createDocumentFragment();
    let prose = [];
    let code = null; // {fence, lang, lines}
    const flushProse = () => {
      if (prose.length) appendProse(frag, prose.join("\n"));
      prose = [];
    };
    const flushCode = () => {
      const pre = document.createElement("pre");
      const codeEl = document.createElement("code");
      if (code.lang) {
        pre.dataset.lang = code.lang;
        codeEl.className = `language-${code.lang}`;
      }
      codeEl.textContent = code.lines.join("\n");
      pre.append(codeEl);
      frag.append(pre);
      code = null;
    };
    for (const line of text.split("\n")) {
      if (code === null) {
        const open = FENCE_OPEN.exec(line);
        if (open) {
          flushProse();
          code = { fence: open[1], lang: open[2], lines: [] };
        } else {
          prose.push(line);
        }
      } else if (line.trim().startsWith(code.fence) && /^`+$/.test(line.trim())) {
        flushCode();
      } else {
        code.lines.push(line);
      }
    }
    if (code !== null) flushCode();
    flushProse();
    target.replaceChildren(frag);
  }

  function appendProse(parent, text) {
    const parts = text.split(/(`[^`\n]+`)/);
    for (const part of parts) {
      if (!part) continue;
      if (part.length > 2 && part.startsWith("`") && part.endsWith("`")) {
        const c = document.createElement("code");
        c.textContent = part.slice(1, -1);
        parent.append(c);
      } else {
        parent.append(document.createTextNode(part));
      }
    }
  }

  function scheduleRender(turn) {
    if (turn.renderQueued) return;
    turn.renderQueued = true;
    requestAnimationFrame(() => renderTurn(turn));
  }

  function renderTurn(turn) {
    turn.renderQueued = false;
    const follow = nearBottom();
    renderContent(turn.el.querySelector(".content"), turn.text);
    if (follow) scrollToBottom();
  }

  function showSpeed(turn) {
    const tokens = turn.usage && Number.isInteger(turn.usage.completion_tokens) ? turn.usage.completion_tokens : turn.chunks;
    const seconds = turn.firstTokenAt === null ? 0 : (turn.endAt - turn.firstTokenAt) / 1000;
    const rate = seconds > 0 && tokens > 0 ? tokens / seconds : null;
    ui.tokensPerSecond.dataset.tokens = String(tokens);
    ui.tokensPerSecond.dataset.rate = rate === null ? "" : rate.toFixed(2);
    ui.tokensPerSecond.textContent =
      rate === null
        ? `${tokens} tokens`
        : `${rate.toFixed(1)} tokens/s · ${tokens} tokens in ${seconds.toFixed(2)} s`;
  }

  // streaming ---------------------------------------------------------------------------------------

  function requestMessages() {
    const system = ui.systemPrompt.value.trim();
    return system ? [{ role: "system", content: system }, ...conversation] : [...conversation];
  }

  function handleEvent(turn, data) {
    if (data === "[DONE]") {
      turn.done = true;
      return;
    }
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch {
      throw new ServerError(`the server sent an event that is not JSON: ${data.slice(0, 200)}`);
    }
    if (chunk && chunk.error) throw new ServerError(messageOfErrorBody(chunk) || JSON.stringify(chunk.error));
    const choice = Array.isArray(chunk.choices) ? chunk.choices[0] : null;
    if (choice) {
      const piece = choice.delta && typeof choice.delta.content === "string" ? choice.delta.content : "";
      if (piece) {
        if (turn.firstTokenAt === null) turn.firstTokenAt = performance.now();
        turn.text += piece;
        turn.chunks += 1;
        scheduleRender(turn);
      }
      if (choice.finish_reason) turn.finishReason = choice.finish_reason;
    }
    if (chunk.usage) turn.usage = chunk.usage;
  }

  /** Reads server-sent events as the spec splits them: lines, blank line ends an event. */
  async function readEvents(resp, turn) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    const dispatch = () => {
      if (data.length) handleEvent(turn, data.join("\n"));
      data = [];
    };
    const takeLine = (line) => {
      if (line === "") dispatch();
      else if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      // comments (":") and the event/id/retry fields carry nothing this page uses
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      // a trailing "\r" may be the first half of "\r\n": keep it for the next read
      const cut = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
      const lines = buffer.slice(0, cut).split(/\r\n|\r|\n/);
      buffer = lines.pop() + buffer.slice(cut);
      for (const line of lines) takeLine(line);
    }
    buffer += decoder.decode();
    if (buffer) takeLine(buffer.replace(/\r$/, ""));
    dispatch();
  }

  async function send() {
    if (current) return;
    const text = ui.prompt.value.trim();
    if (!text) return;
    hideError();
    ui.prompt.value = "";
    conversation.push({ role: "user", content: text });
    const userEl = appendMessage("user", text);
    const turn = {
      el: appendMessage("assistant", ""),
      controller: new AbortController(),
      text: "",
      chunks: 0,
      usage: null,
      finishReason: null,
      done: false,
      firstTokenAt: null,
      endAt: null,
      discarded: false,
      renderQueued: false,
    };
    turn.el.dataset.state = "streaming";
    current = turn;
    setBusy(true);

    const body = {
      messages: requestMessages(),
      stream: true,
      stream_options: { include_usage: true },
      temperature: Number(ui.temperature.value),
      top_p: Number(ui.topP.value),
      max_tokens: parseInt(ui.maxTokens.value, 10),
    };
    if (modelId) body.model = modelId;

    let failure = null;
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(body),
        signal: turn.controller.signal,
      });
      if (!resp.ok) throw new ServerError(await errorMessage(resp));
      await readEvents(resp, turn);
      if (!turn.done && !turn.finishReason && !turn.controller.signal.aborted) {
        throw new ServerError("the connection closed before the answer finished");
      }
    } catch (err) {
      if (!turn.controller.signal.aborted) failure = err;
    }
    turn.endAt = performance.now();
    current = null;
    setBusy(false);
    if (turn.discarded) return;
    renderTurn(turn);

    if (failure && !turn.text) {
      // nothing came back: take the question back so that it can be sent again
      conversation.pop();
      userEl.remove();
      turn.el.remove();
      if (!ui.prompt.value) ui.prompt.value = text;
      showError(failure.message || String(failure));
    } else {
      // a stopped or broken answer stays in the conversation as far as it got
      conversation.push({ role: "assistant", content: turn.text });
      turn.el.dataset.state = failure ? "error" : turn.controller.signal.aborted ? "stopped" : "done";
      if (turn.finishReason) turn.el.dataset.finishReason = turn.finishReason;
      if (failure) showError(failure.message || String(failure));
      showSpeed(turn);
    }
    ui.prompt.focus();
  }

  function stop() {
    if (current) current.controller.abort();
  }

  function newChat() {
    if (current) {
      current.discarded = true;
      current.controller.abort();
    }
    conversation.length = 0;
    ui.messages.replaceChildren();
    ui.tokensPerSecond.textContent = "–";
    delete ui.tokensPerSecond.dataset.rate;
    delete ui.tokensPerSecond.dataset.tokens;
    hideError();
    ui.prompt.focus();
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
    ui.app.dataset.busy = busy ? "true" : "false";
  }

  // wiring ------------------------------------------------------------------------------------------

  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", (e) => {
    // keyCode 229: a key still being composed by an input method
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      send();
    }
  });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newChat);
  for (const slider of [ui.temperature, ui.topP, ui.maxTokens]) slider.addEventListener("input", showSliderValues);

  let keyTimer = null;
  ui.apiKey.value = readStoredKey();
  ui.apiKey.addEventListener("input", () => {
    storeKey(ui.apiKey.value.trim());
    clearTimeout(keyTimer);
    keyTimer = setTimeout(loadModel, 400);
  });

  showSliderValues();
  setBusy(false);
  loadModel();
  ui.prompt.focus();
})();
