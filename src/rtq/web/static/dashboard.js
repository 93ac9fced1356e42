// The rtq dashboard page: renders the board the server pushes (server-sent events on "events").
// Plain DOM, no framework, nothing fetched from elsewhere. Every value from the server goes in
// through textContent, never as HTML. One render function per panel (PANELS): a new panel is a
// section in index.html and an entry here.
"use strict";

const token = new URLSearchParams(location.search).get("token") || "";
const withToken = (path) => `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
let board = null;
let skew = 0; // server clock minus this one, in seconds

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const now = () => Date.now() / 1000 + skew;
const num = (v) => typeof v === "number" && Number.isFinite(v);

function age(t) {
  if (!num(t)) return "?";
  const s = Math.max(0, Math.floor(now() - t));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`;
}

function size(n) {
  for (const [unit, scale] of [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]]) {
    if (n >= scale) return `${(n / scale).toFixed(1)} ${unit}`;
  }
  return `${n} B`;
}

function bar(fraction, label, kind) {
  const pct = Math.max(0, Math.min(1, fraction)) * 100;
  const fill = el("span");
  fill.style.width = `${pct}%`;
  return el("div", { class: `bar ${kind || ""}` }, fill, el("em", {}, label));
}

function table(headers, rows, empty) {
  if (!rows.length) return el("p", { class: "empty" }, empty);
  return el("table", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h))), ...rows);
}

function gpus(w) {
  const list = w.gpu_metrics;
  if (!Array.isArray(list) || !list.length) {
    const listed = Array.isArray(w.gpus) && w.gpus.length ? `GPUs ${w.gpus.join(",")}: no metrics (no NVML)` : "no GPU";
    return el("span", { class: "muted gpu-none" }, listed);
  }
  return el("div", {}, ...list.map((g) => {
    const memory = num(g.memory_used) && num(g.memory_total) && g.memory_total > 0
      ? bar(g.memory_used / g.memory_total, `${size(g.memory_used)} / ${size(g.memory_total)}`, "gpu")
      : el("span", { class: "muted" }, "memory ?");
    const load = num(g.utilization)
      ? bar(g.utilization / 100, `${g.utilization}% busy${num(g.temperature) ? `, ${g.temperature}°C` : ""}`, "gpu")
      : el("span", { class: "muted" }, num(g.temperature) ? `${g.temperature}°C` : "load ?");
    return el("div", { class: "gpu-row", "data-gpu": String(g.index) }, `GPU ${g.index ?? "?"} ${g.name || ""}`, memory, load);
  }));
}

const PANELS = {
  workers(state) {
    const rows = state.workers.map((w) => el("tr", { "data-worker": w.id },
      el("td", {}, el("div", { class: "mono" }, w.host ?? "?"), el("div", { class: "muted" }, `pid ${w.pid ?? "?"}`)),
      el("td", { class: "mono" }, (w.queues || []).join(", ")),
      el("td", { class: "slots" }, `${w.busy}/${w.workers ?? "?"}`, w.stopping ? el("div", { class: "muted" }, "stopping") : null),
      el("td", {}, num(w.load) ? `${w.load.toFixed(2)}${num(w.cpus) ? ` / ${w.cpus} cpus` : ""}` : "?",
        el("div", { class: "muted" }, num(w.rss) ? `rss ${size(w.rss)}` : "")),
      el("td", {}, gpus(w)),
      el("td", { class: "lease" }, num(w.beat) ? `${age(w.beat)} ago` : "?"),
    ));
    return [state.workers.length, table(["host", "queues", "slots busy", "load", "GPUs", "last beat"], rows, "no live worker")];
  },
  queues(state) {
    const rows = state.queues.map((q) => el("tr", { "data-queue": q.name },
      el("td", { class: "mono" }, q.name),
      el("td", { class: "length" }, q.length),
      el("td", {}, q.length && num(q.oldest) ? age(q.oldest) : q.length ? "?" : "—"),
    ));
    return [state.queues.length, table(["queue", "waiting", "oldest waits"], rows, "no queue")];
  },
  running(state) {
    const rows = state.running.map((t) => {
      const shown = t.reported && num(t.total) && t.total > 0
        ? bar(t.current / t.total, `${t.current}/${t.total} (${Math.round(100 * t.current / t.total)}%)`)
        : el("span", { class: "muted" }, t.reported ? `${t.current} done` : "no progress reported");
      return el("tr", { "data-task": t.id },
        el("td", {}, el("div", { class: "mono label" }, t.label || t.id), el("div", { class: "muted" }, t.queue),
          t.lines.length ? el("pre", { class: "lines" }, t.lines.join("\n")) : null),
        el("td", { class: "mono muted" }, t.worker),
        el("td", {}, age(t.started)),
        el("td", { class: "progress", "data-current": String(t.current) }, shown),
      );
    });
    return [state.running.length, table(["task", "worker", "elapsed", "progress"], rows, "nothing running")];
  },
  sessions(state) {
    const rows = state.sessions.map((s) => el("tr", { "data-session": s.id },
      el("td", {}, el("div", { class: "mono label" }, s.label), el("div", { class: "muted" }, s.kind)),
      el("td", {}, el("div", { class: "mono" }, s.host || "?"), el("div", { class: "muted mono" }, s.worker),
        s.gpu ? el("div", { class: "muted" }, `GPU ${s.gpu}`) : null),
      el("td", {}, age(s.created)),
      el("td", { class: "idle" }, age(s.used)),
      el("td", { class: "held" }, s.names.length
        ? el("ul", { class: "names" }, ...s.names.map(([name, type, bytes]) =>
          el("li", { "data-name": name }, el("span", { class: "mono" }, name), ` ${type}, ${size(bytes)}`)))
        : el("span", { class: "muted" }, "nothing"),
        s.results.length ? el("div", { class: "muted" },
          `${s.results.length} result(s) kept until asked for, ${size(s.results.reduce((n, r) => n + r[2], 0))}`) : null),
    ));
    return [state.sessions.length, table(["session / actor", "worker", "age", "idle", "holds"], rows, "no session or actor")];
  },
  failures(state) {
    return [state.failures.length, entries(state.failures, "no failure kept")];
  },
  dead(state) {
    return [state.dead.count, entries(state.dead.entries, "no dead letter")];
  },
};

function entries(list, empty) {
  const rows = list.map((e) => el("tr", { "data-failed": e.id || "" },
    el("td", {}, el("div", { class: "mono" }, e.label || e.id || "?"), el("div", { class: "muted" }, e.queue || "")),
    el("td", {}, el("button", { class: "link error", type: "button", title: "show the remote traceback",
      onclick: () => showTraceback(e) }, e.error || "?")),
    el("td", {}, `${age(e.time)} ago`),
  ));
  return table(["task", "error (click: traceback)", "when"], rows, empty);
}

async function showTraceback(entry) {
  const pane = document.getElementById("detail");
  document.getElementById("detail-title").textContent = entry.label || entry.id;
  const text = document.getElementById("traceback");
  text.textContent = "loading…";
  pane.hidden = false;
  try {
    const reply = await fetch(withToken(`api/error?id=${encodeURIComponent(entry.id || "")}`));
    const info = await reply.json();
    text.textContent = info.traceback || (info.type ? `${info.type}: ${info.message}` : "")
      || info.unavailable || "The task's record has expired: only its error line is kept.";
  } catch (err) {
    text.textContent = `could not load the traceback: ${err}`;
  }
  pane.scrollIntoView({ block: "nearest" });
}

function render() {
  if (!board) return;
  document.getElementById("where").textContent = `${board.where || ""}  prefix ${JSON.stringify(board.prefix)}`;
  const problem = document.getElementById("problem");
  problem.hidden = !board.error;
  problem.textContent = board.error || "";
  if (board.error) return;
  for (const [name, renderPanel] of Object.entries(PANELS)) {
    const section = document.getElementById(name);
    if (!section || board[name] === undefined) continue;
    const [count, body] = renderPanel(board);
    section.querySelector(".count").textContent = `(${count})`;
    section.querySelector(".body").replaceChildren(body);
  }
}

function connect() {
  const status = document.getElementById("connection");
  const events = new EventSource(withToken("events"));
  events.onopen = () => { status.textContent = "live"; status.className = "live"; };
  events.onerror = () => { status.textContent = "reconnecting…"; status.className = "stale"; };
  events.onmessage = (message) => {
    const data = JSON.parse(message.data);
    board = data.board;
    if (num(data.now)) skew = data.now - Date.now() / 1000;
    render();
  };
}

document.getElementById("detail-close").onclick = () => { document.getElementById("detail").hidden = true; };
setInterval(render, 1000); // ages and elapsed times move on between pushes
connect();
