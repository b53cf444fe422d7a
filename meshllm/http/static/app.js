// meshllm console: live mesh status (server-sent events) and a streaming chat.
// No framework and no build step. Every string that comes from the mesh (model
// names, node ids, states, failure reasons, notes) reaches the page through
// textContent or an attribute, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

const ui = {
  status: null,      // the latest MeshStatus from /api/events
  selected: "",      // model chosen in the picker
  userChose: false,  // once the user picks a model, keep it even when it goes cold
  pickerKey: "",     // models and states the picker was last built from
  history: [],       // the conversation sent with each request
  controller: null,  // AbortController of the reply being streamed
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "className") node.className = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function formatBytes(bytes) {
  if (!bytes) return "0 GiB";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = value >= 100 || unit === 0 ? 0 : 1;
  return `${value.toFixed(digits)} ${units[unit]}`;
}

const shortId = (id) => id.slice(0, 8);
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
// A split member's part of the layers, as `ctl status` writes it (0.57 -> "57%").
const percent = (share) => (Number.isFinite(share) ? `${Math.round(share * 100)}%` : "?");
// Server states the page styles; anything else a peer announces is shown, never styled.
const STATES = new Set(["stopped", "waiting", "downloading", "loading", "ready", "failed"]);

// Node ids with their shares ("a1b2c3d4 57% · c3d4e5f6 43%"), the host first.
function shareList(ids, shares, hostFirst) {
  const out = [];
  ids.forEach((id, i) => {
    if (i) out.push(" · ");
    const part = hostFirst && i === 0 ? "host" : "worker";
    out.push(
      el(
        "span",
        { className: "member", "data-node-id": id, "data-part": part, "data-share": shares[i], title: `${part} ${id}` },
        el("code", { text: shortId(id) }),
        i < shares.length ? ` ${percent(shares[i])}` : "",
      ),
    );
  });
  return out;
}

// -- mesh status ----------------------------------------------------------------

function render(status) {
  ui.status = status;
  const warm = status.models.filter((m) => m.status === "warm");
  // Until the user picks, follow the first warm model; a pick holds while the model exists.
  const current = status.models.find((m) => m.name === ui.selected);
  if (!current || (!ui.userChose && current.status !== "warm" && warm.length)) {
    ui.selected = (warm[0] || status.models[0] || { name: "" }).name;
  }
  renderStats(status, warm.length);
  renderModels(status.models);
  renderPicker(status.models);
  renderNodes(status.nodes);
  $("this-node").textContent = status.node_id;
  $("this-node").title = "node id";
  $("api-url").textContent = status.api;
  document.title = `meshllm · ${shortId(status.node_id)}`;
}

function renderStats(status, warmCount) {
  const mem = status.memory;
  const vram = $("vram-total");
  vram.textContent = formatBytes(mem.total_bytes);
  vram.dataset.bytes = String(mem.total_bytes);
  let sub = mem.nodes ? `over ${plural(mem.nodes, "node")}` : "no node announces memory yet";
  if (mem.nodes && mem.nodes_without) sub += ` · ${mem.nodes_without} without`;
  $("vram-sub").textContent = sub;

  const nodes = status.nodes;
  $("node-total").textContent = String(nodes.length);
  const ready = nodes.filter((n) => n.state === "ready").length;
  const clients = nodes.filter((n) => n.role === "client").length;
  $("node-sub").textContent =
    `${ready} ready` + (clients ? ` · ${plural(clients, "client")}` : "");

  $("model-total").textContent = `${warmCount} / ${status.models.length}`;
  const cold = status.models.length - warmCount;
  $("model-sub").textContent = cold ? `${cold} cold, waiting for capacity` : "all served";
}

function renderModels(models) {
  const list = $("models");
  if (!models.length) {
    list.replaceChildren(el("li", { className: "placeholder", text: "No models in the mesh yet." }));
    return;
  }
  list.replaceChildren(
    ...models.map((m) => {
      const loading = m.loading.length ? ` · ${m.loading.length} loading` : "";
      const button = el(
        "button",
        { type: "button", title: m.nodes.length ? `served by ${m.nodes.join(", ")}` : "served by no node" },
        el("span", { className: "dot", "aria-hidden": "true" }),
        el("span", { className: "name", text: m.name }),
        el("span", { className: "status", text: m.status }),
        el("span", { className: "count", text: plural(m.node_count, "node") + loading }),
        ...(m.splits || []).map((split) =>
          el(
            "span",
            { className: "detail split", "data-host": split.host },
            el("span", { className: "tag", text: "split" }),
            " ",
            ...shareList(split.members || [], split.shares || [], true),
          ),
        ),
        m.note ? el("span", { className: "detail note", text: m.note }) : null,
      );
      button.addEventListener("click", () => choose(m.name));
      return el(
        "li",
        {
          className: "model-row",
          "data-model": m.name,
          "data-status": m.status,
          "data-node-count": m.node_count,
          "aria-current": m.name === ui.selected ? "true" : "false",
        },
        button,
      );
    }),
  );
}

function renderPicker(models) {
  const picker = $("model-picker");
  const key = JSON.stringify(models.map((m) => [m.name, m.status, m.node_count]));
  if (key !== ui.pickerKey) {
    // Rebuilt only when the models change, so an open dropdown is not disturbed.
    ui.pickerKey = key;
    picker.replaceChildren(
      ...models.map((m) =>
        el("option", {
          value: m.name,
          text: m.status === "warm" ? `${m.name}  ·  ${plural(m.node_count, "node")}` : `${m.name}  ·  cold`,
        }),
      ),
    );
    if (!models.length) picker.append(el("option", { value: "", text: "no models yet" }));
  }
  picker.value = ui.selected;
}

// A node's part in a split: a worker's host (and its share there), a host's workers.
function splitLine(n, byId) {
  if (n.role === "worker" && n.split_host) {
    const host = byId.get(n.split_host);
    const at = host ? (host.workers || []).indexOf(n.node_id) : -1;
    const share = at >= 0 && at + 1 < host.shares.length ? ` · ${percent(host.shares[at + 1])}` : "";
    return el(
      "div",
      { className: "split", "data-host": n.split_host },
      "worker for ",
      el("code", { title: n.split_host, text: shortId(n.split_host) }),
      share,
    );
  }
  if (n.role === "standby") {
    return el("div", { className: "split", text: "standby in its model's split group, not used now" });
  }
  if (n.workers && n.workers.length) {
    return el(
      "div",
      { className: "split" },
      n.shares?.length ? `holds ${percent(n.shares[0])} · workers ` : "workers ",
      ...shareList(n.workers, (n.shares || []).slice(1), false),
    );
  }
  return null;
}

function renderNodes(nodes) {
  const byId = new Map(nodes.map((n) => [n.node_id, n]));
  $("nodes").replaceChildren(
    ...nodes.map((n) => {
      // A standby holds the model's name but serves none of it.
      const serving =
        (n.model && n.model === ui.selected && n.role !== "standby") || (n.also || []).includes(ui.selected);
      const stateText = n.paused ? "paused" : n.model ? n.state : n.role === "client" ? "no server" : "waiting";
      const stateClass = n.paused ? "other" : n.model ? (STATES.has(n.state) ? n.state : "other") : "none";
      const box = el(
        "article",
        {
          className: "node",
          "data-node-id": n.node_id,
          "data-role": n.role,
          "data-state": n.paused ? "paused" : n.state,
          "data-highlight": serving ? "true" : "false",
        },
        el(
          "div",
          { className: "head" },
          el("code", { className: "id", title: n.node_id, text: shortId(n.node_id) }),
          n.this_node ? el("span", { className: "you", text: "this node" }) : null,
        ),
        el(
          "div",
          { className: "badges" },
          el("span", { className: "badge role", text: n.role }),
          el("span", { className: `badge state state-${stateClass}`, text: stateText }),
        ),
        el("div", { className: n.model ? "model" : "model none", title: n.model || "", text: n.model || "no model" }),
        n.also?.length ? el("div", { className: "model also", text: `also ${n.also.join(", ")}` }) : null,
        splitLine(n, byId),
        n.reason ? el("div", { className: "reason", text: n.reason }) : null,
        el("div", { className: "meta", text: n.vram_bytes ? `${formatBytes(n.vram_bytes)} VRAM` : "no VRAM announced" }),
      );
      return box;
    }),
  );
}

function choose(model) {
  ui.selected = model;
  ui.userChose = true;
  if (ui.status) render(ui.status);
}

function connect() {
  const conn = $("conn");
  const text = $("conn-text");
  const source = new EventSource("/api/events");
  source.addEventListener("open", () => {
    conn.dataset.state = "live";
    text.textContent = "live";
  });
  source.addEventListener("status", (event) => render(JSON.parse(event.data)));
  source.addEventListener("error", () => {
    // EventSource reconnects by itself (the server asks for a retry within a second).
    conn.dataset.state = "lost";
    text.textContent = "reconnecting…";
  });
}

// -- chat -------------------------------------------------------------------------

function addMessage(role, text, who) {
  $("log-empty")?.remove();
  const bubble = el("div", { className: "bubble", text });
  const msg = el("div", { className: `msg ${role}` }, bubble, who ? el("div", { className: "who", text: who }) : null);
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(msg);
  if (atBottom || role === "user") log.scrollTop = log.scrollHeight;
  return msg;
}

function numberOr(input, fallback) {
  const value = Number(input.value);
  return input.value !== "" && Number.isFinite(value) ? value : fallback;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return body.error?.message || `HTTP ${resp.status}`;
  } catch {
    return `HTTP ${resp.status}`;
  }
}

async function send(prompt) {
  const model = ui.selected;
  ui.history.push({ role: "user", content: prompt });
  addMessage("user", prompt);
  const msg = addMessage("assistant", "", model);
  msg.dataset.state = "streaming";
  msg.dataset.chunks = "0";
  const bubble = msg.querySelector(".bubble");
  const who = msg.querySelector(".who");
  const log = $("log");
  const started = performance.now();
  let chunks = 0;
  let reply = "";
  ui.controller = new AbortController();
  setBusy(true);
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model,
        messages: ui.history,
        stream: true,
        max_tokens: numberOr($("max-tokens"), 256),
        temperature: numberOr($("temperature"), 0.7),
      }),
      signal: ui.controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message || "the stream failed");
        const delta = event.choices?.[0]?.delta?.content;
        if (delta) {
          chunks += 1;
          reply += delta;
          const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
          bubble.textContent = reply;
          msg.dataset.chunks = String(chunks);
          if (atBottom) log.scrollTop = log.scrollHeight;
        }
      }
    }
    const seconds = (performance.now() - started) / 1000;
    who.textContent = `${model} · ${plural(chunks, "token")} in ${seconds.toFixed(2)} s`;
    msg.dataset.state = "done";
    ui.history.push({ role: "assistant", content: reply });
  } catch (err) {
    const stopped = err.name === "AbortError";
    msg.dataset.state = stopped ? "done" : "error";
    if (stopped) {
      who.textContent = `${model} · stopped`;
      if (reply) ui.history.push({ role: "assistant", content: reply });
      else ui.history.pop();
    } else {
      bubble.textContent = reply ? `${reply}\n\n${err.message}` : err.message;
      ui.history.pop(); // the failed turn is not part of the conversation
    }
  } finally {
    ui.controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  const button = $("send");
  button.textContent = busy ? "Stop" : "Send";
  button.classList.toggle("secondary", busy);
  $("clear").disabled = busy;
}

function setUpChat() {
  const form = $("composer");
  const prompt = $("prompt");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (ui.controller) {
      ui.controller.abort();
      return;
    }
    const text = prompt.value.trim();
    if (!text || !ui.selected) return;
    prompt.value = "";
    send(text);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  $("clear").addEventListener("click", () => {
    ui.history = [];
    $("log").replaceChildren(
      el("p", { className: "empty", id: "log-empty", text: "A new conversation. Say hello." }),
    );
  });
  $("model-picker").addEventListener("change", (event) => choose(event.target.value));
}

// -- traffic: per-model request rate and tokens/s from the node's /metrics ---------

const METRICS_EVERY_MS = 2000;
const HISTORY = 60; // points: 2 minutes
const traffic = { last: null, at: 0, series: new Map() };

// Per model: summed requests and completion tokens of a Prometheus text scrape.
function parseMetrics(text) {
  const totals = new Map();
  const line = /^meshllm_(requests|completion_tokens)_total\{([^}]*)\} ([0-9.eE+-]+)$/;
  for (const row of text.split("\n")) {
    const match = line.exec(row);
    if (!match) continue;
    const model = /(?:^|,)model="((?:[^"\\]|\\.)*)"/.exec(match[2]);
    if (!model) continue;
    const name = model[1].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    const entry = totals.get(name) || { requests: 0, tokens: 0 };
    entry[match[1] === "requests" ? "requests" : "tokens"] += Number(match[3]);
    totals.set(name, entry);
  }
  return totals;
}

function sparkline(points, label) {
  const width = 160;
  const height = 28;
  const top = Math.max(...points, 1e-9);
  const step = width / (HISTORY - 1);
  const start = width - step * (points.length - 1);
  const coords = points
    .map((v, i) => `${(start + i * step).toFixed(1)},${(height - 2 - (v / top) * (height - 4)).toFixed(1)}`)
    .join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "spark");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", coords);
  svg.append(line);
  return svg;
}

function renderTraffic() {
  const list = $("traffic");
  if (!traffic.series.size) return;
  list.replaceChildren();
  for (const [model, s] of [...traffic.series].sort()) {
    const rate = s.requests[s.requests.length - 1] || 0;
    const tps = s.tokens[s.tokens.length - 1] || 0;
    list.append(
      el(
        "li",
        { class: "traffic-row", "data-model": model },
        el("span", { class: "name", title: model }, model),
        el("span", { class: "figure" }, `${rate.toFixed(2)} req/s`),
        sparkline(s.requests, `${model}: requests per second`),
        el("span", { class: "figure" }, `${tps.toFixed(1)} tok/s`),
        sparkline(s.tokens, `${model}: completion tokens per second`),
      ),
    );
  }
}

async function pollMetrics() {
  try {
    const resp = await fetch("/api/metrics", { cache: "no-store" });
    if (resp.ok) {
      const now = performance.now();
      const totals = parseMetrics(await resp.text());
      if (traffic.last) {
        const seconds = Math.max((now - traffic.at) / 1000, 1e-3);
        for (const [model, t] of totals) {
          const before = traffic.last.get(model) || { requests: 0, tokens: 0 };
          const s = traffic.series.get(model) || { requests: [], tokens: [] };
          // A counter that went down: the Proxy restarted, and counts from zero.
          s.requests.push(Math.max(0, t.requests - before.requests) / seconds);
          s.tokens.push(Math.max(0, t.tokens - before.tokens) / seconds);
          if (s.requests.length > HISTORY) s.requests.shift();
          if (s.tokens.length > HISTORY) s.tokens.shift();
          traffic.series.set(model, s);
        }
        renderTraffic();
      }
      traffic.last = totals;
      traffic.at = now;
    }
  } catch {
    // the node is restarting: the next poll tries again
  }
  setTimeout(pollMetrics, METRICS_EVERY_MS);
}

setUpChat();
connect();
pollMetrics();
