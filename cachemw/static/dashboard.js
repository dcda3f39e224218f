// The cachemw dashboard: polls api/state, renders it, and sends purges. No dependencies, no build step.
"use strict";

(function () {
  const POLL_MS = 2000;
  const SERIES = ["hit", "stale", "miss", "bypass"];
  const COLORS = { hit: "#1a7f37", stale: "#bf8700", miss: "#cf222e", bypass: "#6e7781" };
  const SVG = "http://www.w3.org/2000/svg";
  // Relative to the page, whatever path the dashboard is mounted at.
  const base = new URL(".", location.href.endsWith("/") ? location.href : location.href + "/");
  let last = null;

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(name, value);
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  function percent(ratio) { return (ratio * 100).toFixed(1) + "%"; }

  function quantile(h, q) {
    if (!h || !h.count) return null;
    const rank = q * h.count;
    for (let i = 0; i < h.cumulative.length; i++) {
      if (h.cumulative[i] >= rank) return i < h.buckets.length ? h.buckets[i] : Infinity;
    }
    return Infinity;
  }

  function seconds(s) {
    if (s === null || s === undefined) return "–";
    if (s === Infinity) return "> 10 s";
    return s < 1 ? "≤ " + (s * 1000).toFixed(s < 0.001 ? 2 : 0) + " ms" : "≤ " + s.toFixed(1) + " s";
  }

  function replaceRows(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  function renderRoutes(snapshot, canPurge) {
    const rows = [];
    for (const r of snapshot.routes) {
      if (r.policy === null) continue;  // no policy: passed through, nothing to show or purge
      const ratioBar = el("span", { class: "bar" }, el("span", { style: "width:" + (r.hit_ratio * 100) + "%" }));
      const button = el("button", { class: "purge", type: "button", "data-route": r.route,
                                    title: "drop every entry of " + r.route }, "Purge");
      button.disabled = !canPurge;
      button.addEventListener("click", () => purge({ route: r.route }, r.route));
      rows.push(el("tr", { "data-route": r.route, class: r.cached ? "cached" : "uncached" },
        el("td", { class: "route" }, r.route),
        el("td", { class: "policy", title: r.description || "" }, r.policy),
        // "…/app/cachemw.toml rule 2" shown as "cachemw.toml rule 2", the whole path on hover.
        el("td", { class: "source", title: r.source || "" }, (r.source || "–").split("/").pop()),
        el("td", { class: "requests" }, r.requests),
        el("td", { class: "hit-ratio" }, el("span", { class: "ratio" }, percent(r.hit_ratio)), ratioBar),
        el("td", { class: "hit" }, r.hit),
        el("td", { class: "stale" }, r.stale),
        el("td", { class: "miss" }, r.miss),
        el("td", { class: "bypass" }, r.bypass),
        el("td", { class: "stale-if-error" }, r.stale_if_error),
        el("td", { class: "collapsed" }, r.collapsed),
        el("td", { class: "origin-busy" }, r.origin_busy),
        el("td", { class: "refresh" }, r.refresh_ok + " / " + r.refresh_failed),
        el("td", { class: "origin-p50" }, seconds(quantile(r.origin_latency, 0.5))),
        el("td", { class: "stored" }, bytes(r.stored_bytes)),
        el("td", {}, r.cached ? button : "")));
    }
    replaceRows($("routes").tBodies[0], rows);

    const select = $("chart-route");
    const wanted = ["", ...snapshot.routes.filter((r) => r.cached).map((r) => r.route)];
    const have = Array.from(select.options).map((o) => o.value);
    if (wanted.join("\n") !== have.join("\n")) {
      const chosen = select.value;
      select.replaceChildren(...wanted.map((v) => el("option", { value: v }, v || "all routes")));
      select.value = wanted.includes(chosen) ? chosen : "";
    }
    $("purge-tag-button").disabled = !canPurge;
  }

  function renderChart(history) {
    const svg = $("chart");
    const route = $("chart-route").value;
    const W = 600, H = 180, LEFT = 36, BOTTOM = 16, TOP = 8;
    const points = [];
    for (let i = 1; i < history.length; i++) {
      const a = history[i - 1], b = history[i];
      const dt = Math.max(b.t - a.t, 0.001);
      const rates = {};
      SERIES.forEach((name, k) => {
        const before = route ? (a.routes[route] || [0, 0, 0, 0])[k] : a[name];
        const after = route ? (b.routes[route] || [0, 0, 0, 0])[k] : b[name];
        rates[name] = Math.max(after - before, 0) / dt;  // a restart resets the counts: no negative rates
      });
      points.push({ t: b.t, rates });
    }
    const nodes = [];
    const max = Math.max(1, ...points.flatMap((p) => SERIES.map((s) => p.rates[s])));
    nodes.push(svgEl("line", { class: "axis", x1: LEFT, y1: H - BOTTOM, x2: W, y2: H - BOTTOM }));
    nodes.push(svgEl("line", { class: "axis", x1: LEFT, y1: TOP, x2: LEFT, y2: H - BOTTOM }));
    nodes.push(svgText(2, TOP + 8, max.toFixed(max < 10 ? 1 : 0) + "/s"));
    nodes.push(svgText(2, H - BOTTOM, "0"));
    if (points.length < 2) {
      nodes.push(svgText(W / 2 - 40, H / 2, "collecting samples…"));
    } else {
      const t0 = points[0].t, span = Math.max(points[points.length - 1].t - t0, 1);
      nodes.push(svgText(LEFT, H - 2, "−" + Math.round(span) + " s"));
      nodes.push(svgText(W - 24, H - 2, "now"));
      for (const name of SERIES) {
        const coords = points.map((p) => {
          const x = LEFT + ((p.t - t0) / span) * (W - LEFT - 4);
          const y = H - BOTTOM - (p.rates[name] / max) * (H - BOTTOM - TOP);
          return x.toFixed(1) + "," + y.toFixed(1);
        });
        nodes.push(svgEl("polyline", { "data-series": name, points: coords.join(" "), fill: "none",
                                       stroke: COLORS[name], "stroke-width": 2 }));
      }
    }
    svg.replaceChildren(...nodes);
    svg.setAttribute("data-samples", String(history.length));
  }

  function svgEl(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    return node;
  }

  function svgText(x, y, text) {
    const node = svgEl("text", { x, y });
    node.textContent = text;
    return node;
  }

  function renderStore(store) {
    const ping = store.ping;
    let health = "ok", label = "healthy";
    if (store.kind === "memory") { label = "in-process memory"; }
    else if (store.kind === "none") { health = "warn"; label = "not started"; }
    else if (store.breaker === "open" || (ping && !ping.ok)) { health = "bad"; label = "down"; }
    else if (store.breaker !== "closed" || !store.listening) { health = "warn"; label = "degraded"; }
    $("store").setAttribute("data-health", health);
    const pill = $("store-health");
    pill.className = "pill " + health;
    pill.textContent = label;
    const facts = [
      ["kind", store.kind + (store.where ? " at " + store.where : "")],
      ["ping", ping ? (ping.ok ? ping.ms.toFixed(2) + " ms" : "failed: " + ping.error) : "–"],
      ["circuit breaker", store.breaker],
      ["subscribed", store.kind === "redis" ? (store.listening ? "yes" : "no: L1 bypassed") : "–"],
      ["errors", store.errors],
      ["lookup p50 / p99", seconds(quantile(store.latency, 0.5)) + " / " + seconds(quantile(store.latency, 0.99))],
    ];
    if (store.memory) facts.push(["entries", store.memory.entries + " (" + bytes(store.memory.bytes_used) + ")"]);
    $("store-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  }

  function renderQueue(supervisor) {
    const rows = Object.entries(supervisor.kinds).map(([kind, c]) =>
      el("tr", { "data-kind": kind }, el("td", {}, kind), el("td", { class: "queued" }, c.queued),
         el("td", { class: "running" }, c.running), el("td", {}, c.done), el("td", { class: "failed" }, c.failed),
         el("td", { class: "shed" }, c.shed), el("td", {}, c.abandoned)));
    replaceRows($("queue").tBodies[0], rows);
    const t = supervisor.totals;
    $("queue-summary").textContent = (supervisor.running ? "running" : "not running") + ": " + t.queued +
      " queued of " + supervisor.queue_size + ", " + t.running + " running of " + supervisor.concurrency +
      ", " + t.shed + " shed, " + t.failed + " failed";
  }

  function renderWriteBehind(statuses) {
    const rows = statuses.map((s) => s.error
      ? el("tr", { "data-queue": s.name }, el("td", {}, s.name), el("td", { colspan: 4, class: "bad" }, s.error))
      : el("tr", { "data-queue": s.name }, el("td", {}, s.name), el("td", { class: "backlog" }, s.backlog),
           el("td", { class: "lag" }, s.lag.toFixed(1) + " s"), el("td", { class: "dead" }, s.dead),
           el("td", {}, s.flushed)));
    replaceRows($("write-behind").tBodies[0], rows);
    $("write-behind-none").style.display = statuses.length ? "none" : "";
  }

  function renderL1(l1) {
    const facts = [["entries", l1.entries], ["size", bytes(l1.bytes_used) + " of " + bytes(l1.max_bytes)],
                   ["hits", l1.hits + " (" + percent(l1.hit_share) + " of HITs)"], ["dropped", l1.dropped]];
    $("l1").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  }

  function render(state) {
    const s = state.snapshot;
    $("process").textContent = s.process.host + " pid " + s.process.pid + (s.prefix ? " · prefix " + s.prefix : "");
    $("updated").textContent = "updated " + new Date(s.time * 1000).toLocaleTimeString();
    renderRoutes(s, state.can_purge);
    renderChart(state.history);
    renderStore(s.store);
    renderQueue(s.supervisor);
    renderWriteBehind(s.write_behind);
    renderL1(s.l1);
    document.body.setAttribute("data-loaded", "true");
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.style.display = message ? "block" : "none";
  }

  async function poll() {
    try {
      const response = await fetch(new URL("api/state", base), { cache: "no-store", credentials: "same-origin" });
      if (!response.ok) throw new Error((await response.text()) || response.statusText);
      last = await response.json();
      render(last);
      showError("");
    } catch (err) {
      showError("cannot read the cache's state: " + err.message);
    }
  }

  async function purge(target, label) {
    if (!window.confirm("Drop every cached entry of " + label + "?")) return;
    const out = $("purge-result");
    out.textContent = "purging " + label + "…";
    try {
      const response = await fetch(new URL("api/purge", base), {
        method: "POST",
        credentials: "same-origin",
        // The custom header is what a cross-site form or image cannot send.
        headers: { "Content-Type": "application/json", "X-Cachemw-Purge": "1" },
        body: JSON.stringify(target),
      });
      const body = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(body.error || response.statusText);
      out.textContent = "purged " + label + ": " + body.dropped + " entr" + (body.dropped === 1 ? "y" : "ies") +
        " dropped";
      out.setAttribute("data-dropped", String(body.dropped));
    } catch (err) {
      out.textContent = "purge of " + label + " failed: " + err.message;
      out.setAttribute("data-dropped", "");
    }
    poll();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("purge-tag-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const tag = $("purge-tag").value.trim();
      if (tag) purge({ tag }, "tag " + tag);
    });
    $("chart-route").addEventListener("change", () => { if (last) renderChart(last.history); });
    poll();
    setInterval(poll, POLL_MS);
  });
})();
