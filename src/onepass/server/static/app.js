// The onepass page: a chat over /v1/chat/completions (SSE), each token coloured by how it
// was produced (the stream's `text_sources` extension), with live speed and acceptance, and
// an optional second run with plain decoding on the same conversation.
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // {role, content} of the conversation so far
let modelName = null;
let defaultMethod = "plain"; // the server's, from /v1/models
let controller = null; // aborts the running request (the server then stops generating)

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.status === 401) {
      $("model").textContent = "this server needs an API key (field above)";
      return;
    }
    const card = (await r.json()).data[0];
    modelName = card.id;
    const spec = card.speculative_config;
    defaultMethod = spec ? spec.method : "plain";
    const name = methodName(defaultMethod);
    $("model").textContent = `${card.id} · context ${card.max_model_len} tokens · default method: ${name}`;
    $("method").options[0].textContent = `server default (${name})`;
  } catch (e) {
    $("model").textContent = `server unreachable (${e.message})`;
  }
}

// Server-sent events from a fetch() response: yields each `data:` JSON, stops at [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue; // ": ping" comments keep the line open
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function element(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function addMessage(className, label) {
  const box = element("div", `msg ${className}`);
  if (label) box.append(element("div", "label", label));
  const text = element("div", "text");
  const stats = element("div", "stats");
  box.append(text, stats);
  $("log").append(box);
  box.scrollIntoView({ block: "end" });
  return { box, text, stats };
}

function tokenSpan(text, source) {
  const span = element("span", `tok src-${source}`, text);
  if (source !== "target") span.classList.add("drafted");
  span.title = source === "target" ? "the target's own token" : `accepted from ${source}'s draft`;
  return span;
}

function methodName(method) {
  return method === "plain" || method === "vanilla" ? "plain decoding" : method;
}

function specFor(method) {
  if (method === "default") return undefined; // the server's default
  if (method === "plain") return null; // plain decoding
  return { method };
}

// One streamed answer into a new message; resolves to its final statistics.
async function run(messages, method, label, className) {
  const view = addMessage(`assistant ${className}`, label);
  view.box.dataset.state = "streaming";
  view.box.dataset.method = method;
  const body = {
    messages,
    max_tokens: Number($("max-tokens").value) || 200,
    temperature: Number($("temperature").value) || 0,
    stream: true,
    stream_options: { include_usage: true },
  };
  if (modelName) body.model = modelName;
  const spec = specFor(method);
  if (spec !== undefined) body.speculative_config = spec;
  const started = performance.now();
  let tokens = 0;
  let targets = 0;
  let text = "";
  let final = null;
  const show = () => {
    const seconds = (performance.now() - started) / 1000;
    const rate = final ? final.tokens_per_second : tokens / seconds;
    const mal = final ? final.mean_acceptance_length : tokens / Math.max(targets, 1);
    const drafted = tokens ? Math.round((100 * (tokens - targets)) / tokens) : 0;
    view.stats.innerHTML =
      `<b>${tokens}</b> tokens · <b>${rate.toFixed(1)}</b> tokens/s · ` +
      `mean acceptance length <b>${mal.toFixed(2)}</b> · ${drafted}% drafted` +
      (final ? ` · ${methodName(final.method)}` : "");
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || `HTTP ${response.status}`);
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        for (const [piece, source] of choice.text_sources || []) {
          view.text.append(tokenSpan(piece, source));
          text += piece;
        }
        for (const source of choice.token_sources || []) {
          tokens += 1;
          if (source === "target") targets += 1;
        }
      }
      if (chunk.onepass) final = chunk.onepass; // a choice's last chunk, and the usage chunk
      show();
      view.box.scrollIntoView({ block: "end" });
    }
    view.box.dataset.state = "done";
    show();
    return { text, stats: final };
  } catch (e) {
    view.box.dataset.state = "error";
    view.box.classList.add("error");
    view.text.append(element("span", "", e.name === "AbortError" ? " [stopped]" : ` [${e.message}]`));
    return null;
  }
}

function summary(fast, plain, method) {
  const ratio = fast.stats.tokens_per_second / plain.stats.tokens_per_second;
  const same = fast.text === plain.text ? "identical text" : "different text (sampling)";
  const line = element(
    "div",
    "summary",
    `${method}: ${fast.stats.tokens_per_second.toFixed(1)} tokens/s · plain decoding: ` +
      `${plain.stats.tokens_per_second.toFixed(1)} tokens/s → ${ratio.toFixed(2)}× · ${same}`,
  );
  line.id = "compare-result";
  $("log").append(line);
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || controller) return;
  $("prompt").value = "";
  const user = element("div", "msg user", prompt);
  $("log").append(user);
  history.push({ role: "user", content: prompt });
  const messages = history.slice();
  const method = $("method").value; // "default" (the server's), a method, or "plain"
  const effective = method === "default" ? defaultMethod : method;
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").hidden = false;
  try {
    const fast = await run(messages, method, methodName(effective), "main");
    if (!fast) {
      history.pop();
      return;
    }
    history.push({ role: "assistant", content: fast.text });
    if ($("compare").checked && effective !== "plain") {
      const plain = await run(messages, "plain", "plain decoding (same prompt, for comparison)", "compare");
      if (plain && fast.stats && plain.stats) summary(fast, plain, fast.stats.method);
    }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").hidden = true;
    $("prompt").focus();
  }
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) send(e);
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => {
  history.length = 0;
  $("log").replaceChildren();
});
$("api-key").addEventListener("change", loadModel);
loadModel();
