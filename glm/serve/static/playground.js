// The playground: fills the blanks of a query through POST /v1/completions (streamed), one blank at a time.
// The server fills the first blank of the highest-priority kind ([MASK] > [sMASK] > [gMASK], [gMASK]
// appended when the query has none); the page fills every blank of that kind left to right, each request
// being the query with the blanks before it replaced by their answers (glm/serve/playground.py).
"use strict";

const MASKS = /\[[sg]?MASK\]/g;
const EXAMPLES = {
  en: "Who is the greatest artist? The greatest artist is [MASK].",
  zh: "凯旋门位于意大利米兰市古城堡旁。1807年为纪念[MASK]而建，门高25米，顶上矗立两武士青铜古兵车铸像。",
};
const $ = (id) => document.getElementById(id);
const state = { controller: null, history: [], lastCurl: "", limits: {} };

// ------------------------------------------------------------------------------------------ the query

// The query split into text and masks; `kind` is the mask kind that gets filled.
function parseQuery(text) {
  const parts = [];
  let last = 0;
  for (const match of text.matchAll(MASKS)) {
    parts.push({ text: text.slice(last, match.index) }, { mask: match[0] });
    last = match.index + match[0].length;
  }
  parts.push({ text: text.slice(last) });
  const masks = parts.filter((p) => p.mask).map((p) => p.mask);
  const kind = ["[MASK]", "[sMASK]"].find((m) => masks.includes(m)) || "[gMASK]";
  if (!masks.length) parts.push({ mask: "[gMASK]", appended: true }, { text: "" });
  parts.forEach((p) => { p.blank = p.mask === kind; });
  return parts;
}

// The prompt of blank k: the blanks before it replaced by `answers`' texts.
function promptFor(parts, k, answers) {
  let blank = 0;
  return parts.map((p) => {
    if (p.text !== undefined) return p.text;
    if (p.appended) return "";
    if (!p.blank) return p.mask;
    const index = blank++;
    return index < k ? answers[index].text : p.mask;
  }).join("");
}

// ------------------------------------------------------------------------------------------ the request

function number(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

function requestBody() {
  const strategy = document.querySelector("input[name=strategy]:checked").value;
  const body = { max_tokens: number("max_tokens"), n: number("n"), stream: true };
  const stop = $("stop").value;
  if (stop) body.stop = stop.split("|").map((s) => s.replace(/\\n/g, "\n")).filter((s) => s);
  if ($("ignore_eos").checked) body.ignore_eos = true;
  if (strategy === "greedy") body.temperature = 0;
  if (strategy === "sampling") {
    Object.assign(body, { temperature: number("temperature"), top_p: number("top_p"), top_k: number("top_k") });
    if (number("seed") !== undefined) body.seed = number("seed");
  }
  if (strategy === "beam") {
    Object.assign(body, { temperature: 0, num_beams: number("num_beams") });
    body.length_penalty = number("length_penalty");
  } else {
    body.logprobs = 3;  // per-token log-probs, shown on hover (not available with beam search)
  }
  return { strategy, body };
}

function headers() {
  const key = $("api_key").value;
  return key ? { "Content-Type": "application/json", Authorization: `Bearer ${key}` }
    : { "Content-Type": "application/json" };
}

function curlOf(body) {
  const quote = (s) => `'${s.replace(/'/g, "'\\''")}'`;
  const lines = [`curl -sN ${location.origin}/v1/completions`, "-H 'Content-Type: application/json'"];
  if ($("api_key").value) lines.push(`-H ${quote(`Authorization: Bearer ${$("api_key").value}`)}`);
  lines.push(`-d ${quote(JSON.stringify(body))}`);
  return lines.join(" \\\n  ");
}

class ServerError extends Error {}

// One streamed completion; `onText(index, text)` after each delta; the choices when it is done.
async function stream(body, signal, onText) {
  state.lastCurl = curlOf(body);
  const response = await fetch("/v1/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal,
  });
  if (!response.ok) {
    let message = `the server answered ${response.status}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not our JSON */ }
    throw new ServerError(message);
  }
  const choices = [];
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
      const chunk = JSON.parse(event.slice(6));
      if (chunk.error) throw new ServerError(chunk.error.message);
      for (const c of chunk.choices) {
        const choice = choices[c.index] || (choices[c.index] = { text: "", logprobs: null, finish: null });
        choice.text += c.text;
        if (c.logprobs) choice.logprobs = c.logprobs;
        if (c.finish_reason) choice.finish = c.finish_reason;
        onText(c.index, choice);
      }
    }
  }
  return choices;
}

// ------------------------------------------------------------------------------------------ rendering

function tokenSpans(choice) {
  const lp = choice.logprobs;
  if (!lp || lp.tokens.join("") !== choice.text) return [document.createTextNode(choice.text)];
  return lp.tokens.map((token, i) => {
    const span = document.createElement("span");
    span.className = "token";
    span.textContent = token;
    const top = Object.entries(lp.top_logprobs[i] || {})
      .map(([t, v]) => `${JSON.stringify(t)} ${v.toFixed(3)}`).join(", ");
    span.title = `log-prob ${lp.token_logprobs[i].toFixed(3)} (p = ${Math.exp(lp.token_logprobs[i]).toFixed(3)})`
      + (top ? `; top: ${top}` : "");
    return span;
  });
}

// Answer j: the query with each filled blank highlighted in place, the blanks still to fill as typed.
function render(parts, answers, j, heading) {
  let article = $("answers").children[j];
  if (!article) {
    article = document.createElement("article");
    article.className = "answer";
    article.innerHTML = "<h3></h3><p class='filled'></p>";
    $("answers").append(article);
  }
  article.querySelector("h3").textContent = heading;
  const out = article.querySelector(".filled");
  out.replaceChildren();
  let blank = 0;
  for (const p of parts) {
    if (p.text !== undefined) { out.append(p.text); continue; }
    const answer = p.blank ? answers[blank++] : undefined;
    if (!answer) {
      const pending = document.createElement("span");
      pending.className = "mask";
      pending.textContent = p.appended ? "" : p.mask;
      out.append(pending);
      continue;
    }
    const mark = document.createElement("mark");
    mark.className = "blank";
    mark.dataset.blank = String(blank - 1);
    mark.append(...tokenSpans(answer));
    out.append(mark);
  }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setRunning(running) {
  $("run").disabled = running;
  $("stop-button").disabled = !running;
  $("copy-curl").disabled = !state.lastCurl;
  $("curl").hidden = !state.lastCurl;
  $("curl").textContent = state.lastCurl;
}

// ------------------------------------------------------------------------------------------ a run

async function run() {
  const query = $("query").value;
  if (!query.trim()) { showError("type a query first: text with [MASK], [sMASK] or [gMASK]"); return; }
  const { strategy, body } = requestBody();
  addHistory(query, strategy);
  const parts = parseQuery(query);
  const blanks = parts.filter((p) => p.blank).length;
  const width = Math.max(1, body.n || 1);
  const answers = Array.from({ length: width }, () => []);
  const heading = (j) => (width === 1 ? "Answer" : strategy === "beam" ? `Beam ${j + 1}` : `Sample ${j + 1}`);
  state.controller = new AbortController();
  $("answers").replaceChildren();
  showError("");
  $("stats").textContent = "";
  $("status").textContent = "Running…";
  const started = performance.now();
  let first = null;
  let tokens = 0;
  setRunning(true);
  try {
    for (let k = 0; k < blanks; k++) {
      // blank 0 gives every answer its own choice; each later blank continues each answer alone (n = 1)
      for (let j = 0; j < (k === 0 ? 1 : width); j++) {
        const request = { ...body, prompt: promptFor(parts, k, answers[j]), n: k === 0 ? body.n : 1 };
        const choices = await stream(request, state.controller.signal, (index, choice) => {
          const row = k === 0 ? index : j;
          if (choice.text && first === null) first = performance.now();
          answers[row][k] = choice;
          render(parts, answers[row], row, heading(row));
        });
        setRunning(true);
        choices.forEach((choice, index) => {
          const row = k === 0 ? index : j;
          answers[row][k] = choice;
          tokens += choice.logprobs ? choice.logprobs.tokens.length : 0;
          render(parts, answers[row], row, heading(row));
        });
      }
    }
    const seconds = (performance.now() - started) / 1000;
    $("status").textContent = "Done.";
    $("stats").textContent = (tokens ? `${tokens} tokens in ${seconds.toFixed(2)} s: `
      + `${(tokens / seconds).toFixed(1)} tokens/s; ` : `${seconds.toFixed(2)} s; `)
      + `first token after ${first === null ? "-" : ((first - started)).toFixed(0)} ms`;
  } catch (error) {
    if (error.name === "AbortError") $("status").textContent = "Stopped.";
    else {
      $("status").textContent = "Failed.";
      showError(error instanceof ServerError ? error.message : `the request failed: ${error.message}`);
    }
  } finally {
    state.controller = null;
    setRunning(false);
  }
}

function stop() {
  if (state.controller) state.controller.abort();  // the server frees the row, as for any disconnect
}

// ------------------------------------------------------------------------------------------ history

function formState() {
  const values = {};
  for (const input of document.querySelectorAll("#query-form input, #query-form textarea")) {
    if (input.id === "api_key") continue;
    values[input.id || `${input.name}:${input.value}`] = input.type === "checkbox" || input.type === "radio"
      ? input.checked : input.value;
  }
  return values;
}

function restore(values) {
  for (const [key, value] of Object.entries(values)) {
    const input = key.includes(":") ? document.querySelector(`input[value="${key.split(":")[1]}"]`) : $(key);
    if (!input) continue;
    if (typeof value === "boolean") input.checked = value; else input.value = value;
  }
  showOptions();
}

function addHistory(query, strategy) {
  const values = formState();
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = "Run again";
  button.addEventListener("click", () => { restore(values); run(); });
  const text = document.createElement("span");
  text.textContent = ` ${strategy}: ${query}`;
  item.append(button, text);
  $("history").prepend(item);
}

// ------------------------------------------------------------------------------------------ setup

function showOptions() {
  const strategy = document.querySelector("input[name=strategy]:checked").value;
  for (const fieldset of document.querySelectorAll("fieldset[data-for]")) {
    fieldset.disabled = fieldset.dataset.for !== strategy;
    fieldset.hidden = fieldset.dataset.for !== strategy;
  }
}

function insert(text) {
  const box = $("query");
  const [start, end] = [box.selectionStart, box.selectionEnd];
  box.setRangeText(text, start, end, "end");
  box.focus();
}

async function loadLimits() {
  try {
    const info = await (await fetch("/playground/limits")).json();
    $("model").textContent = info.model;
    for (const input of document.querySelectorAll("input[data-field]")) {
      const bounds = info.limits[input.dataset.field];
      if (bounds) [input.min, input.max] = bounds;
    }
    if (info.api_key_required) $("api_key").required = true;
  } catch (error) {
    showError(`could not read the server's limits: ${error.message}`);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("query-form").addEventListener("submit", (event) => { event.preventDefault(); run(); });
  $("stop-button").addEventListener("click", stop);
  $("copy-curl").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(state.lastCurl);
      $("status").textContent = "Copied the curl command.";
    } catch (_) {  // no clipboard (an insecure origin): select the text for Ctrl+C
      getSelection().selectAllChildren($("curl"));
    }
  });
  for (const button of document.querySelectorAll("[data-insert]")) {
    button.addEventListener("click", () => insert(button.dataset.insert));
  }
  for (const button of document.querySelectorAll("[data-example]")) {
    button.addEventListener("click", () => { $("query").value = EXAMPLES[button.dataset.example]; });
  }
  for (const radio of document.querySelectorAll("input[name=strategy]")) {
    radio.addEventListener("change", showOptions);
  }
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !state.controller) {
      event.preventDefault();
      run();
    }
    if (event.key === "Escape") stop();
  });
  showOptions();
  loadLimits();
});
