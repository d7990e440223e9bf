// isrctl ui: draws what the server streams (/events) and runs actions
// (/api/action). Plain standard JavaScript, no framework, no build step.
"use strict";

const STATES = { ".": "zero", R: "remote", F: "fetching", L: "local", D: "changed", U: "uploading" };
const COLORS = {};
const COLUMNS = 128; // cells per row of a map
const CELL = 8; // canvas pixels per cell (7 drawn, 1 gap)
const WINDOW_SECS = 300; // the rate plot's span
const sessions = new Map(); // parcel → { data, el }

function $(selector, root) { return (root || document).querySelector(selector); }
function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children || []) node.append(child);
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return (unit === 0 ? String(value) : value.toFixed(1)) + " " + units[unit];
}
function duration(secs) {
  if (secs === null || secs === undefined) return "–";
  if (secs < 60) return secs + " s";
  if (secs < 3600) return Math.floor(secs / 60) + " min " + (secs % 60) + " s";
  return Math.floor(secs / 3600) + " h " + Math.floor((secs % 3600) / 60) + " min";
}
function clock(iso) {
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleTimeString();
}

// ---- sessions ---------------------------------------------------------------

function stat(label, field) {
  return el("div", {}, [el("dt", { text: label }), el("dd", { "data-field": field, text: "–" })]);
}

function card(parcel) {
  const counts = el("ul", { class: "counts", "aria-label": "Chunks per state" });
  for (const name of Object.values(STATES)) {
    counts.append(el("li", {}, [
      el("span", { class: "swatch s-" + name }),
      name + " ",
      el("span", { "data-state-count": name, text: "0" }),
    ]));
  }
  const actions = el("div", { class: "actions", role: "group", "aria-label": "Actions on " + parcel });
  for (const [action, label, cls] of [
    ["sync", "Sync", "primary"], ["hoard", "Hoard", ""], ["suspend", "Suspend", ""],
    ["checkin", "Check in", ""], ["discard", "Discard", "danger"],
  ]) {
    const button = el("button", { type: "button", "data-action": action, class: cls, text: label });
    button.addEventListener("click", () => confirmAction(action, parcel));
    actions.append(button);
  }
  const node = el("article", { class: "card", "data-parcel": parcel, "aria-label": "Parcel " + parcel }, [
    el("div", { class: "card-head" }, [
      el("h3", { text: parcel }),
      el("span", { class: "badge", "data-field": "vm-state", text: "no VM" }),
      el("span", { class: "where", "data-field": "where" }),
    ]),
    el("dl", { class: "stats" }, [
      el("div", {}, [
        el("dt", { text: "Local chunks" }),
        el("dd", {}, [
          el("span", { "data-field": "chunks-local", text: "0" }), " of ",
          el("span", { "data-field": "chunks-total", text: "0" }),
        ]),
      ]),
      stat("Bytes to go", "bytes-to-go"), stat("Fully local in", "eta"),
      stat("Fetching", "fetch-rate"), stat("Uploading", "upload-rate"),
      stat("Upload backlog", "backlog"), stat("Fetched", "fetched"), stat("Last synced", "synced"),
    ]),
    counts,
    el("div", { class: "columns" }, [
      el("div", {}, [el("h4", { text: "Chunk map per file" }), el("div", { class: "files" })]),
      el("div", {}, [
        el("h4", { text: "Fetch and upload rates (up to the last 5 minutes)" }),
        el("canvas", { class: "rates", role: "img", "aria-label": "Fetch and upload rates" }),
        el("p", { class: "rate-legend" }, [
          el("span", { class: "f", text: "— fetch" }), "  ", el("span", { class: "u", text: "— upload" }),
          " ", el("span", { "data-field": "rate-max" }),
        ]),
        el("h4", { text: "Resume timeline" }),
        el("ol", { class: "timeline", "data-field": "timeline" }),
      ]),
    ]),
    actions,
    el("p", { class: "result-line", role: "status", "data-field": "result" }),
    el("p", { class: "error-line", role: "alert", "data-field": "error", hidden: "" }),
  ]);
  return node;
}

function field(node, name) { return $('[data-field="' + name + '"]', node); }

function drawMap(canvas, cells) {
  const n = cells.length;
  // Few cells are drawn big, many small: a map is at most 40rem wide.
  const perRow = n <= 128 ? 32 : n <= 1024 ? 64 : COLUMNS;
  const cols = Math.max(1, Math.min(perRow, n));
  const rows = Math.max(1, Math.ceil(n / cols));
  canvas.width = cols * CELL;
  canvas.height = rows * CELL;
  canvas.style.width = "min(100%, " + (cols / perRow) * 40 + "rem)";
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < n; i++) {
    ctx.fillStyle = COLORS[cells[i]] || COLORS["."];
    ctx.fillRect((i % cols) * CELL, Math.floor(i / cols) * CELL, CELL - 1, CELL - 1);
  }
}

function describeMap(file) {
  const counts = {};
  for (const c of file.cells) counts[c] = (counts[c] || 0) + 1;
  return file.path + ": " + Object.entries(counts)
    .map(([c, k]) => k + " cells " + STATES[c]).join(", ");
}

function renderFiles(node, files) {
  const box = $(".files", node);
  box.textContent = "";
  files.forEach((file, index) => box.append(fileNode(file, index)));
}

function fileNode(file, index) {
  const canvas = el("canvas", { class: "map", role: "img", "aria-label": describeMap(file) });
  drawMap(canvas, file.cells);
  const per = file.group > 1 ? ", one cell per " + file.group + " chunks" : "";
  return el("div", { class: "file", "data-file": file.path, "data-index": String(index) }, [
    el("div", {}, [
      el("span", { class: "file-name", text: file.path }), " ",
      el("span", { class: "file-meta", text: bytes(file.size) + ", " + file.chunks + " chunks" + per }),
    ]),
    canvas,
  ]);
}

function updateFile(node, index, file) {
  const old = $('.file[data-index="' + index + '"]', node);
  if (old) old.replaceWith(fileNode(file, index));
}

function drawRates(canvas, history, node) {
  const width = canvas.clientWidth || 300, height = canvas.clientHeight || 120;
  const scale = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * scale);
  canvas.height = Math.round(height * scale);
  const ctx = canvas.getContext("2d");
  ctx.scale(scale, scale);
  ctx.clearRect(0, 0, width, height);
  const now = history.length ? history[history.length - 1][0] : Date.now() / 1000;
  // The last five minutes, or less while there is less (but a minute at least).
  const span = Math.min(WINDOW_SECS, Math.max(60, history.length ? now - history[0][0] : 0));
  let max = 1;
  for (const [, f, u] of history) max = Math.max(max, f, u);
  field(node, "rate-max").textContent = "(top of the plot: " + bytes(max) + "/s)";
  ctx.strokeStyle = "#e3e8ee";
  for (let i = 1; i < 4; i++) {
    ctx.beginPath(); ctx.moveTo(0, (height * i) / 4); ctx.lineTo(width, (height * i) / 4); ctx.stroke();
  }
  for (const [column, color] of [[1, "#1c7ed6"], [2, "#7b2cbf"]]) {
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    history.forEach((sample, i) => {
      const x = width - ((now - sample[0]) / span) * width;
      const y = height - 2 - (sample[column] / max) * (height - 4);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
  ctx.fillStyle = "#57606a";
  ctx.font = "11px sans-serif";
  ctx.fillText("−" + Math.round(span) + " s", 4, height - 4);
  ctx.fillText("now", width - 26, height - 4);
  const last = history[history.length - 1];
  canvas.setAttribute("aria-label", last
    ? "Fetching " + bytes(last[1]) + "/s, uploading " + bytes(last[2]) + "/s now"
    : "No rate samples yet");
}

function renderTimeline(node, t, hasVm) {
  const list = field(node, "timeline");
  list.textContent = "";
  const steps = [
    ["requested", t.requested], ["mounted", t.mounted],
    ["VM running", t.vm_running], ["first chunk fetched", t.first_progress],
  ];
  for (const [label, at] of steps) {
    let text = label + ": ";
    if (at === null || at === undefined) {
      text += label === "VM running" && !hasVm ? "no VM" : "not yet";
    } else {
      text += new Date(at).toLocaleTimeString();
      if (t.requested && label !== "requested") text += " (+" + ((at - t.requested) / 1000).toFixed(1) + " s)";
    }
    list.append(el("li", { class: at ? "done" : "", text }));
  }
}

function renderStatus(node, d) {
  const s = d.status;
  field(node, "chunks-local").textContent = s.chunks_local;
  field(node, "chunks-total").textContent = s.chunks_total;
  field(node, "where").textContent = "resumed from version " + s.base_version + ", mounted at " + s.mount +
    (s.mounted ? "" : " (not mounted: `isrctl resume " + s.parcel + "` mounts it again)");
  field(node, "bytes-to-go").textContent = d.bytes_to_go === null ? (s.chunks_total - s.chunks_local) + " chunks" : bytes(d.bytes_to_go);
  field(node, "eta").textContent = d.eta_secs === 0 ? "fully local" : d.eta_secs === null ? "not fetching" : duration(d.eta_secs);
  field(node, "backlog").textContent = bytes(s.pending_bytes) + " (" + s.pending_chunks + " chunks)";
  field(node, "fetched").textContent = bytes(s.fetch.fetched_bytes);
  field(node, "synced").textContent = s.committed_version === null || s.committed_version === undefined ? "not yet" : "version " + s.committed_version;
  const vm = field(node, "vm-state");
  vm.textContent = s.vm ? "VM (" + s.vm.kind + "): " + s.vm.state : "no VM";
  vm.className = "badge " + (s.vm ? s.vm.state : "");
  for (const [name, count] of Object.entries(d.counts)) {
    const span = $('[data-state-count="' + name + '"]', node);
    if (span) span.textContent = count;
  }
  renderTimeline(node, d.timeline, Boolean(s.vm));
}

function renderRates(entry) {
  const node = entry.el;
  const last = entry.data.history[entry.data.history.length - 1];
  field(node, "fetch-rate").textContent = last ? bytes(last[1]) + "/s" : "–";
  field(node, "upload-rate").textContent = last ? bytes(last[2]) + "/s" : "–";
  drawRates($("canvas.rates", node), entry.data.history, node);
}

function putSession(parcel, data) {
  let entry = sessions.get(parcel);
  if (!entry) {
    entry = { el: card(parcel), data };
    sessions.set(parcel, entry);
    const box = $("#sessions");
    const after = [...box.children].find((c) => c.dataset.parcel > parcel);
    box.insertBefore(entry.el, after || null);
  }
  entry.data = data;
  renderStatus(entry.el, data);
  renderFiles(entry.el, data.files);
  renderRates(entry);
}

function removeSession(parcel) {
  const entry = sessions.get(parcel);
  if (entry) entry.el.remove();
  sessions.delete(parcel);
}

function renderDaemon(state) {
  const note = $("#daemon-note");
  let text = "";
  if (state.error) text = "Asking isrfsd failed: " + state.error;
  else if (!state.daemon_running) text = "isrfsd is not running: no parcel is resumed here (`isrctl resume NAME` mounts one).";
  else if (!sessions.size && !state.resuming.length) text = "No resumed parcels (`isrctl resume NAME` mounts one).";
  if (state.resuming.length) text += " Resuming: " + state.resuming.join(", ") + "…";
  note.textContent = text.trim();
  note.hidden = !text;
}

function onEvent(message) {
  const event = JSON.parse(message.data);
  if (event.kind === "full") {
    for (const parcel of [...sessions.keys()]) removeSession(parcel);
    for (const [parcel, data] of Object.entries(event.state.sessions)) putSession(parcel, data);
    renderDaemon(event.state);
    return;
  }
  for (const parcel of event.removed) removeSession(parcel);
  for (const [parcel, change] of Object.entries(event.sessions)) {
    if (change.whole) { putSession(parcel, change.whole); continue; }
    const entry = sessions.get(parcel);
    if (!entry) continue;
    const d = entry.data;
    d.status = change.status; d.counts = change.counts; d.bytes_to_go = change.bytes_to_go;
    d.eta_secs = change.eta_secs; d.timeline = change.timeline;
    if (change.sample) {
      d.history.push(change.sample);
      const oldest = change.sample[0] - WINDOW_SECS;
      while (d.history.length && d.history[0][0] < oldest) d.history.shift();
    }
    for (const { index, file } of change.files) { d.files[index] = file; updateFile(entry.el, index, file); }
    renderStatus(entry.el, d);
    renderRates(entry);
  }
  renderDaemon(event);
}

function connect() {
  const connection = $("#connection");
  const source = new EventSource("/events");
  source.onopen = () => { connection.textContent = "live"; connection.dataset.connection = "live"; };
  source.onmessage = onEvent;
  source.onerror = () => {
    connection.textContent = "connection lost: retrying (is `isrctl ui` still running?)";
    connection.dataset.connection = "lost";
  };
}

// ---- actions ----------------------------------------------------------------

const ACTIONS = {
  sync: { title: "Sync", message: true, text: (p) => "Commit the current state of " + p + " as a new version. It stays mounted and the VM keeps running." },
  hoard: { title: "Hoard", message: false, text: (p) => "Fetch every chunk of " + p + " into this machine's cache, so it keeps working without the store. This can take long." },
  suspend: { title: "Suspend", message: true, text: (p) => "Save the VM's memory and stop the VM, commit a new version of " + p + ", unmount it and release its lock. Programs using the mount lose it." },
  checkin: { title: "Check in", message: true, text: (p) => "Commit a new version of " + p + ", unmount it and release its lock. A running VM loses its disks: suspend it instead to keep its memory." },
  discard: { title: "Discard", message: false, text: (p) => "Drop every change to " + p + " since its last commit, unmount it and release its lock. This cannot be undone." },
};

function confirmAction(action, parcel) {
  const spec = ACTIONS[action];
  const dialog = $("#confirm");
  $("#confirm-title").textContent = spec.title + " " + parcel + "?";
  $("#confirm-text").textContent = spec.text(parcel);
  $("#confirm-message-row").hidden = !spec.message;
  $("#confirm-message").value = "";
  const ok = $("#confirm-ok");
  ok.textContent = spec.title;
  ok.className = action === "discard" ? "danger" : "primary";
  dialog.returnValue = "";
  dialog.onclose = () => {
    if (dialog.returnValue === "ok") run(action, parcel, $("#confirm-message").value);
  };
  dialog.showModal();
  (spec.message ? $("#confirm-message") : $("#confirm-cancel")).focus();
}

function showError(box, error) {
  box.textContent = "";
  box.append(el("span", { class: "class", text: error.class + " (exit " + error.exit_code + ")" }), ": " + error.message);
  if (error.hint && error.message.indexOf(error.hint) === -1) box.append(el("br"), "Next: " + error.hint);
  box.hidden = false;
}

async function run(action, parcel, message) {
  const entry = sessions.get(parcel);
  const node = entry ? entry.el : null;
  const result = node ? field(node, "result") : null;
  const errorBox = node ? field(node, "error") : $("#parcels-error");
  const buttons = node ? node.querySelectorAll("button[data-action]") : [];
  buttons.forEach((b) => { b.disabled = true; });
  if (result) result.textContent = ACTIONS[action].title + " " + parcel + "…";
  errorBox.hidden = true;
  let answer;
  try {
    const response = await fetch("/api/action", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ action, parcel, message }),
    });
    answer = await response.json();
  } catch (e) {
    answer = { error: { class: "other", exit_code: 1, message: "the web UI did not answer: " + e, hint: "" } };
  }
  buttons.forEach((b) => { b.disabled = false; });
  if (answer.error) {
    if (result) result.textContent = "";
    showError(errorBox, answer.error);
  } else if (result) {
    result.textContent = describeResult(action, parcel, answer.result);
  }
  loadParcels();
}

function describeResult(action, parcel, r) {
  const report = r.checkin || r;
  switch (action) {
    case "sync": case "checkin": case "suspend":
      if (!report.committed) return parcel + ": nothing changed since version " + report.version + "; no new version";
      return parcel + ": " + (action === "sync" ? "synced" : "checked in") + " as version " + report.version +
        " (" + report.new_chunks + " new chunks, " + bytes(report.new_bytes) + ")";
    case "hoard": return parcel + ": all " + r.chunks + " chunks are local";
    case "discard": return parcel + ": discarded" + (r.lock_released ? ", lock released" : "");
  }
  return "done";
}

// ---- parcels ----------------------------------------------------------------

function versionsPlot(history) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "versions");
  const width = 40; // per version
  svg.setAttribute("viewBox", "0 0 " + Math.max(400, history.length * width) + " 100");
  svg.setAttribute("preserveAspectRatio", "xMinYMid meet");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "Stored bytes per version: " +
    history.map((v) => "version " + v.version + " " + bytes(v.stored_bytes)).join(", "));
  const max = Math.max(1, ...history.map((v) => v.stored_bytes));
  history.forEach((v, i) => {
    const h = (v.stored_bytes / max) * 86;
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("x", String(i * width + 1));
    rect.setAttribute("y", String(88 - h));
    rect.setAttribute("width", String(Math.max(width - 2, 1)));
    rect.setAttribute("height", String(h));
    const title = document.createElementNS(ns, "title");
    title.textContent = "version " + v.version + ": " + bytes(v.stored_bytes) + " stored, " + bytes(v.new_bytes) + " new";
    rect.append(title);
    svg.append(rect);
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", String(i * width + width / 2));
    label.setAttribute("y", "99");
    label.setAttribute("text-anchor", "middle");
    label.textContent = String(v.version);
    svg.append(label);
  });
  return svg;
}

function historyTable(history) {
  const body = el("tbody");
  for (const v of [...history].reverse()) {
    body.append(el("tr", { "data-version": String(v.version) }, [
      el("td", { class: "num", text: String(v.version) }),
      el("td", { text: clock(v.created) + " " + new Date(v.created).toLocaleDateString() }),
      el("td", { text: v.host }),
      el("td", { class: "num", text: bytes(v.new_bytes) }),
      el("td", { class: "num", text: bytes(v.stored_bytes) }),
      el("td", { text: v.message || "" }),
    ]));
  }
  return el("div", { class: "table-wrap" }, [el("table", {}, [
    el("thead", {}, [el("tr", {}, ["Version", "Created", "Host", "New", "Stored", "Message"]
      .map((h, i) => el("th", { class: i === 0 || i === 3 || i === 4 ? "num" : "", scope: "col", text: h })))]),
    body,
  ])]);
}

// Loads overlap (an action's refresh and a click on Refresh): only the
// newest request renders, and the box is aria-busy until it has.
let parcelsRequest = 0;

async function loadParcels() {
  const box = $("#parcels");
  const errorBox = $("#parcels-error");
  const request = ++parcelsRequest;
  box.setAttribute("aria-busy", "true");
  let answer;
  try {
    answer = await (await fetch("/api/parcels")).json();
  } catch (e) {
    answer = { error: { class: "other", exit_code: 1, message: "the web UI did not answer: " + e, hint: "" } };
  }
  if (request !== parcelsRequest) return;
  box.setAttribute("aria-busy", "false");
  if (answer.error) { showError(errorBox, answer.error); return; }
  errorBox.hidden = true;
  // A refresh keeps the version lists the reader opened.
  const open = new Set([...box.querySelectorAll("[data-store-parcel]")]
    .filter((card) => card.querySelector("details").open)
    .map((card) => card.dataset.storeParcel));
  box.textContent = "";
  if (!answer.parcels.length) {
    box.append(el("p", { class: "note", text: "No parcels in the store (`isrctl import NAME PATH...` creates one)." }));
    return;
  }
  for (const p of answer.parcels) {
    const lock = p.lock ? p.lock.holder + " on " + p.lock.host + " since " + clock(p.lock.since) : "not locked";
    const details = el("details", {}, [el("summary", { text: "Versions" })]);
    details.open = open.has(p.name);
    if (p.history) {
      details.append(
        el("p", { class: "note", text: "Stored bytes per version (each version's distinct chunks):" }),
        versionsPlot(p.history), historyTable(p.history));
    } else if (p.history_error) {
      const line = el("p", { class: "error-line" });
      showError(line, p.history_error);
      details.append(line);
    }
    box.append(el("article", { class: "card", "data-store-parcel": p.name }, [
      el("div", { class: "card-head" }, [
        el("h3", { text: p.name }),
        el("span", { class: "where", text: "newest version " + (p.newest_version === null ? "–" : p.newest_version) + ", " + p.versions + " versions" }),
        el("span", { class: "badge", "data-field": "lock", text: "lock: " + lock }),
      ]),
      p.problem ? el("p", { class: "error-line", text: p.problem }) : "",
      details,
    ]));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const style = getComputedStyle(document.documentElement);
  for (const [c, name] of Object.entries(STATES)) COLORS[c] = style.getPropertyValue("--" + name).trim();
  $("#refresh-parcels").addEventListener("click", loadParcels);
  // Enter in the message field confirms (the only submit button); Cancel
  // and Escape close without acting.
  $("#confirm-cancel").addEventListener("click", () => $("#confirm").close("cancel"));
  window.addEventListener("resize", () => sessions.forEach(renderRates));
  connect();
  loadParcels();
});
