/* catzilla dashboard: renders the JSON snapshots streamed from {base}/api/stream.
 * All data reaches the page through textContent / attributes only (never innerHTML). */
"use strict";
(() => {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content || "";
  const base = meta("catzilla-base").replace(/\/+$/, "");
  const csrf = meta("csrf-token");
  const $ = (id) => document.getElementById(id);
  const LANES = ["critical", "high", "normal", "low", "scheduled"];

  const pending = new Set();     // "task:<id>" / "schedule:<name>" with a request in flight
  const openTraces = new Set();  // failure task ids whose traceback the user expanded
  let last = null;               // last rendered snapshot
  let now = Date.now() / 1000;   // server time of that snapshot (relative times use it)
  let source = null;
  let noticeTimer = 0;

  // ---------------------------------------------------------------- formatting
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const fmtInt = (v) => (isNum(v) ? String(Math.round(v)) : "–");
  const fmt1 = (v) => (isNum(v) ? v.toFixed(1) : "–");
  const str = (v) => (v === null || v === undefined ? "" : String(v));
  const shortId = (id) => (id.length > 12 ? `${id.slice(0, 8)}…` : id);

  function fmtDur(sec) {
    sec = Math.max(0, Math.floor(sec));
    const d = Math.floor(sec / 86400), h = Math.floor((sec % 86400) / 3600);
    const m = Math.floor((sec % 3600) / 60), s = sec % 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s}s`;
    return `${s}s`;
  }

  function fmtRel(t) {
    if (!isNum(t)) return "–";
    const d = now - t;
    return d >= 0 ? `${fmtDur(d)} ago` : `in ${fmtDur(Math.ceil(-d))}`;
  }

  function fmtAbs(t) {
    if (!isNum(t)) return "–";
    const d = new Date(t * 1000);
    return d.toDateString() === new Date().toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
  }

  // ---------------------------------------------------------------- DOM helpers
  /* el("td", "name", child, "text", ...): children are nodes or strings (inserted as text). */
  function el(tag, cls, ...children) {
    const n = document.createElement(tag);
    if (cls) n.className = cls;
    n.append(...children);
    return n;
  }

  function setText(node, text) {
    if (typeof node === "string") node = $(node);
    text = str(text);
    if (node && node.textContent !== text) node.textContent = text;
  }

  /* Sets the text of the descendants of `root` found by class name: {cls: text}. */
  function texts(root, map) {
    for (const [cls, text] of Object.entries(map)) setText(root.querySelector(`.${cls}`), text);
  }

  function setTitle(node, title) {
    if (node.title !== title) node.title = title;
  }

  /* Keyed reconciliation: reuses the child whose `attr` equals the item's key, so an open
   * <details>, a focused button or a text selection survive the once-a-second re-render. */
  function syncRows(parent, items, attr, keyOf, build, update) {
    const old = new Map();
    for (const n of parent.children) old.set(n.getAttribute(attr), n);
    items.forEach((item, i) => {
      const key = str(keyOf(item));
      let node = old.get(key);
      if (node) old.delete(key);
      else {
        node = build(key);
        node.setAttribute(attr, key);
      }
      update(node, item, key);
      const at = parent.children[i];
      if (at !== node) parent.insertBefore(node, at || null);
    });
    for (const n of old.values()) n.remove();
    const empty = parent.closest(".card")?.querySelector(".empty");
    if (empty) empty.hidden = items.length > 0;
  }

  const tbody = (id) => $(id).tBodies[0];

  const idTd = () => el("td", "", el("code", "id"));

  function setId(tr, id) {
    const code = tr.querySelector("code.id");
    setText(code, shortId(id));
    setTitle(code, id);
  }

  function button(cls, label, action, key) {
    const b = el("button", cls, label);
    b.type = "button";
    b.dataset.action = action;
    b.dataset.key = key;
    return b;
  }

  // ---------------------------------------------------------------- bars
  function buildBar() {
    return el("div", "bar-row", el("span", "name"), el("div", "meter", el("div", "fill")), el("span", "count"));
  }

  function renderBars(container, entries, attr) {
    const max = Math.max(1, ...entries.map(([, v]) => (isNum(v) ? v : 0)));
    syncRows(container, entries, attr, ([k]) => k, buildBar, (node, [k, v]) => {
      texts(node, { name: k, count: fmtInt(isNum(v) ? v : 0) });
      setTitle(node.querySelector(".name"), k);
      node.querySelector(".fill").style.width = `${((isNum(v) ? v : 0) / max) * 100}%`;
    });
  }

  // ---------------------------------------------------------------- tables
  function renderRunning(items) {
    const build = () => {
      const progress = el("div", "progress", el("div", "bar"));
      progress.setAttribute("role", "progressbar");
      return el("tr", "", el("td", "name"), idTd(), el("td", "progress-cell", progress, el("span", "pct")),
        el("td", "step"), el("td", "started"), el("td", "num attempts"));
    };
    syncRows(tbody("running"), items, "data-task-id", (t) => t.task_id, build, (tr, t, id) => {
      const p = isNum(t.progress) ? Math.min(100, Math.max(0, t.progress)) : 0;
      setId(tr, id);
      texts(tr, {
        name: t.name, step: t.step || "–", started: fmtRel(t.started_at),
        attempts: fmtInt(t.attempts), pct: isNum(t.progress) ? `${p.toFixed(0)}%` : "–",
      });
      setTitle(tr.querySelector(".started"), fmtAbs(t.started_at));
      tr.querySelector(".bar").style.width = `${p}%`;
      tr.querySelector(".progress").setAttribute("aria-valuenow", p.toFixed(0));
    });
  }

  function renderQueued(items) {
    const build = (id) => el("tr", "", el("td", "name"), idTd(), el("td", "", el("span", "prio")),
      el("td", "status"), el("td", "created"), el("td", "", button("cancel", "Cancel", "cancel", id)));
    syncRows(tbody("queued"), items, "data-task-id", (t) => t.task_id, build, (tr, t, id) => {
      const prio = str(t.priority);
      setId(tr, id);
      texts(tr, { name: t.name, prio, status: t.status, created: fmtRel(t.created_at) });
      setTitle(tr.querySelector(".created"), fmtAbs(t.created_at));
      tr.querySelector(".prio").className = `prio prio-${prio.replace(/[^a-z]/gi, "")}`;
      tr.querySelector("button.cancel").disabled = pending.has(`task:${id}`);
    });
  }

  function renderFailures(items) {
    const build = (id) => {
      const details = el("details", "", el("summary", "", "traceback"), el("pre", "trace"));
      details.addEventListener("toggle", () => {
        if (details.open) openTraces.add(id);
        else openTraces.delete(id);
      });
      return el("tr", "", el("td", "name"), idTd(), el("td", "finished"), el("td", "num attempts"),
        el("td", "", el("div", "err-msg"), details), el("td", "", button("retry", "Retry", "retry", id)));
    };
    syncRows(tbody("failures"), items, "data-task-id", (t) => t.task_id, build, (tr, t, id) => {
      setId(tr, id);
      texts(tr, {
        name: t.name, finished: fmtRel(t.finished_at), attempts: fmtInt(t.attempts),
        "err-msg": t.error || "–", trace: t.traceback,
      });
      setTitle(tr.querySelector(".finished"), fmtAbs(t.finished_at));
      const details = tr.querySelector("details");
      details.hidden = !t.traceback;
      if (openTraces.has(id) && !details.open) details.open = true;
      const retry = tr.querySelector("button.retry");
      retry.disabled = pending.has(`task:${id}`) || Boolean(t.retried_as);
      retry.textContent = t.retried_as ? "Retried" : "Retry";
      setTitle(retry, t.retried_as ? `retried as ${str(t.retried_as)}` : "");
    });
    const ids = new Set(items.map((t) => str(t.task_id)));
    for (const id of openTraces) if (!ids.has(id)) openTraces.delete(id);
  }

  function renderSchedules(items) {
    const when = (cls) => el("td", cls, el("span", "abs"), el("span", "sub rel"));
    const build = (name) => el("tr", "", el("td", "name"), el("td", "", el("code", "sched")),
      when("next"), when("last"), el("td", "num runs"), el("td", "num fails"), el("td", "", el("span", "state")),
      el("td", "", button("pause", "Pause", "pause", name)));
    syncRows(tbody("schedules"), items, "data-schedule", (s) => s.name, build, (tr, s, name) => {
      const paused = !!s.paused;
      texts(tr, { name, sched: s.schedule, runs: fmtInt(s.runs), fails: fmtInt(s.failures) });
      for (const [cls, t, never] of [["next", s.next_run_at, "–"], ["last", s.last_run_at, "never"]]) {
        const cell = tr.querySelector(`.${cls}`);
        setText(cell.querySelector(".abs"), isNum(t) ? fmtAbs(t) : never);
        setText(cell.querySelector(".rel"), isNum(t) ? fmtRel(t) : "");
      }
      const state = tr.querySelector(".state");
      setText(state, paused ? "paused" : "active");
      state.className = `state ${paused ? "paused" : "active"}`;
      tr.classList.toggle("paused", paused);
      const b = tr.querySelector("button");
      const action = paused ? "resume" : "pause";
      if (b.dataset.action !== action) {
        b.className = action;
        b.dataset.action = action;
        b.textContent = paused ? "Resume" : "Pause";
      }
      b.disabled = pending.has(`schedule:${name}`);
    });
  }

  // ---------------------------------------------------------------- charts
  const cssVar = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim() || "#888";

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const e = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * e >= v) return m * e;
    return 10 * e;
  }

  const fmtAxis = (v) => (Number.isInteger(v) ? String(v) : v.toFixed(v < 1 ? 2 : 1));

  function drawChart(canvas, hist, series) {
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (!w || !h) return;
    const dpr = window.devicePixelRatio || 1;
    const pw = Math.round(w * dpr), ph = Math.round(h * dpr);
    if (canvas.width !== pw || canvas.height !== ph) {
      canvas.width = pw;
      canvas.height = ph;
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);

    const pad = { l: 40, r: 10, t: 26, b: 20 };
    const cw = w - pad.l - pad.r, ch = h - pad.t - pad.b;
    const ts = hist.map((p, i) => (isNum(p.t) ? p.t : i));
    const tEnd = ts.length ? ts[ts.length - 1] : 0;
    const span = Math.max(60, ts.length ? tEnd - ts[0] : 0);
    const val = (p, key) => (isNum(p[key]) ? p[key] : 0);
    let max = 0;
    for (const p of hist) for (const s of series) max = Math.max(max, val(p, s.key));
    max = niceMax(max);
    const x = (t) => pad.l + cw * (1 - (tEnd - t) / span);
    const y = (v) => pad.t + ch * (1 - v / max);
    const muted = cssVar("--muted");

    ctx.strokeStyle = cssVar("--grid");
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let i = 0; i <= 4; i++) {
      const gy = Math.round(pad.t + (ch * i) / 4) + 0.5;
      ctx.moveTo(pad.l, gy);
      ctx.lineTo(pad.l + cw, gy);
    }
    ctx.stroke();

    ctx.fillStyle = muted;
    ctx.font = "11px system-ui, sans-serif";
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    ctx.fillText(fmtAxis(max), pad.l - 6, pad.t);
    ctx.fillText(fmtAxis(max / 2), pad.l - 6, pad.t + ch / 2);
    ctx.fillText("0", pad.l - 6, pad.t + ch);
    ctx.textBaseline = "top";
    ctx.fillText("now", pad.l + cw, pad.t + ch + 5);
    ctx.textAlign = "left";
    ctx.fillText(`-${Math.round(span)}s`, pad.l, pad.t + ch + 5);

    ctx.lineWidth = 1.6;
    ctx.lineJoin = "round";
    let lx = pad.l;
    for (const s of series) {
      const color = cssVar(s.color);
      ctx.strokeStyle = color;
      ctx.beginPath();
      hist.forEach((p, i) => {
        const px = x(ts[i]), py = y(val(p, s.key));
        if (i) ctx.lineTo(px, py);
        else ctx.moveTo(px, py);
      });
      ctx.stroke();
      // legend entry: colour swatch, label and the latest value
      const label = `${s.label} ${hist.length ? fmtAxis(val(hist[hist.length - 1], s.key)) : "–"}`;
      ctx.fillStyle = color;
      ctx.fillRect(lx, 6, 12, 3);
      ctx.fillStyle = muted;
      ctx.textBaseline = "middle";
      ctx.fillText(label, lx + 16, 8);
      lx += 16 + ctx.measureText(label).width + 16;
    }
  }

  function drawCharts() {
    const hist = Array.isArray(last?.history) ? last.history : [];
    drawChart($("throughput-chart"), hist, [
      { key: "completed", label: "completed/s", color: "--c-completed" },
      { key: "failed", label: "failed/s", color: "--c-failed" },
    ]);
    drawChart($("http-chart"), hist, [
      { key: "requests", label: "requests/s", color: "--c-requests" },
      { key: "errors", label: "errors/s", color: "--c-errors" },
    ]);
  }

  // ---------------------------------------------------------------- render
  function render(snap) {
    last = snap;
    now = isNum(snap.time) ? snap.time : Date.now() / 1000;
    const st = snap.stats || {};
    const stats = {
      processed: st.total_tasks_processed, failed: st.failed_tasks, submitted: st.total_tasks_submitted,
      running: st.running_tasks, queued: st.total_queued,
    };
    for (const [k, v] of Object.entries(stats)) setText(`stat-${k}`, fmtInt(v));
    setText("stat-tps", fmt1(st.tasks_per_second));
    setText("uptime", isNum(st.uptime_seconds) ? fmtDur(st.uptime_seconds) : "–");
    setText("last-update", new Date(now * 1000).toLocaleTimeString());

    const w = snap.workers || {};
    const busy = w.busy ?? st.active_workers, total = w.total ?? st.total_workers;
    setText("workers-busy", fmtInt(busy));
    setText("workers-idle", fmtInt(w.idle ?? st.idle_workers));
    setText("workers-total", fmtInt(total));
    $("workers-bar").style.width = `${isNum(busy) && total > 0 ? (busy / total) * 100 : 0}%`;

    const lat = snap.latency_ms || {};
    for (const p of ["p50", "p95", "p99"]) setText(`latency-${p}`, fmt1(lat[p]));

    const http = snap.http;
    setText("http-rps", http ? fmt1(http.requests_per_second) : "–");
    setText("http-error-rate", http && isNum(http.error_rate) ? (http.error_rate * 100).toFixed(1) : "–");
    setText("http-total", http ? fmtInt(http.total) : "–");
    $("http-note").hidden = !!http;

    const lanes = snap.lanes || {};
    const extra = Object.keys(lanes).filter((k) => !LANES.includes(k));
    renderBars($("lanes"), [...LANES, ...extra].map((k) => [k, lanes[k] ?? 0]), "data-lane");
    renderBars($("queues"), Object.entries(snap.queues || {}), "data-queue");

    const list = (v) => (Array.isArray(v) ? v : []);
    renderRunning(list(snap.running));
    renderQueued(list(snap.queued));
    renderFailures(list(snap.failures));
    renderSchedules(list(snap.schedules));
    drawCharts();
  }

  function safeRender(snap) {
    try {
      render(snap);
    } catch (err) {
      console.error("catzilla dashboard: cannot render snapshot", err);
    }
  }

  // ---------------------------------------------------------------- notices & actions
  function notify(text, kind = "") {
    const n = $("notice");
    n.textContent = text;
    n.className = kind;
    n.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { n.hidden = true; }, kind === "error" ? 10000 : 5000);
  }

  const toLogin = () => { window.location.href = `${base}/login`; };

  /* path: "%" is replaced by the URL-encoded key; done(key, json) returns notify() arguments. */
  const ACTIONS = {
    cancel: { scope: "task", path: "tasks/%/cancel", done: (k, r) => (r.cancelled
      ? [`Cancelled task ${k}`] : [`Task ${k} could not be cancelled`, "warn"]) },
    retry: { scope: "task", path: "tasks/%/retry",
      done: (k, r) => [`Retried task ${k} as ${str(r.task_id)}`] },
    pause: { scope: "schedule", path: "schedules/%/pause", done: (k) => [`Paused schedule ${k}`] },
    resume: { scope: "schedule", path: "schedules/%/resume", done: (k) => [`Resumed schedule ${k}`] },
  };

  async function act(btn) {
    const key = btn.dataset.key || "";
    const spec = ACTIONS[btn.dataset.action];
    const tag = spec && `${spec.scope}:${key}`;
    if (!spec || pending.has(tag)) return;
    pending.add(tag);
    btn.disabled = true;
    try {
      const res = await fetch(`${base}/api/${spec.path.replace("%", encodeURIComponent(key))}`, {
        method: "POST", headers: { "X-CSRF-Token": csrf }, credentials: "same-origin",
      });
      const body = await res.json().catch(() => null);
      if (res.status === 401) return toLogin();
      if (!res.ok) {
        notify(str(body?.error) || res.statusText || `HTTP ${res.status}`, "error");
        return;
      }
      notify(...spec.done(key, body || {}));
      refresh();
    } catch (err) {
      notify(`Request failed: ${err.message}`, "error");
    } finally {
      pending.delete(tag);
      btn.disabled = false;
    }
  }

  // ---------------------------------------------------------------- data sources
  async function refresh() {
    try {
      const res = await fetch(`${base}/api/snapshot`, {
        credentials: "same-origin", headers: { Accept: "application/json" },
      });
      if (res.status === 401) { toLogin(); return false; }
      if (!res.ok) return false;
      const snap = await res.json();
      if (!last || !(snap.time < last.time)) safeRender(snap);
      return true;
    } catch {
      return false;
    }
  }

  function setLive(text, state) {
    const n = $("live-status");
    setText(n, text);
    n.className = `pill ${state}`;
  }

  function connect() {
    source = new EventSource(`${base}/api/stream`);
    source.addEventListener("open", () => setLive("live", "ok"));
    source.addEventListener("snapshot", (ev) => {
      setLive("live", "ok");
      let snap;
      try { snap = JSON.parse(ev.data); } catch { return; }
      if (!last || !(snap.time < last.time)) safeRender(snap);
    });
    source.addEventListener("error", () => {
      if (source.readyState !== EventSource.CLOSED) { setLive("reconnecting…", "warn"); return; }
      // The browser gave up (e.g. a non-200 answer): check the session, then start a new stream.
      source.close();
      setLive("offline", "down");
      const retry = async () => { if (await refresh()) connect(); else setTimeout(retry, 5000); };
      setTimeout(retry, 3000);
    });
  }

  document.addEventListener("click", (ev) => {
    const btn = ev.target.closest("button[data-action]");
    if (btn && !btn.disabled) act(btn);
  });
  $("notice").addEventListener("click", (ev) => { ev.currentTarget.hidden = true; });
  let resizeTimer = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(drawCharts, 100);
  });

  connect();
  refresh();
})();
