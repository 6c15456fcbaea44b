// balloon-hints host dashboard: polls this host's admin API and /metrics, keeps the last
// minutes in memory, draws them with uPlot. No build step, no dependencies but uPlot.
//
// Query parameters: ?interval=SECONDS (poll period, default 2) &minutes=N (history, default 5).
// State for tests and curious users: <body data-state="loading|live|unreachable" data-polls=N>,
// one <tr data-guest=ID> per guest with <td data-field=NAME data-value=NUMBER> cells, and
// window.balloonDashboard (the history).
"use strict";

(function () {
  const PAGE_SIZE_DEFAULT = 4096;
  const params = new URLSearchParams(location.search);
  const positive = (name, fallback) => {
    const value = Number(params.get(name));
    return Number.isFinite(value) && value > 0 ? value : fallback;
  };
  const INTERVAL_S = positive("interval", 2);
  const WINDOW_S = positive("minutes", 5) * 60;
  const TIMEOUT_MS = Math.max(2000, INTERVAL_S * 1000);
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
                  "#e377c2", "#7f7f7f", "#bcbd22"];

  // ---- formatting -------------------------------------------------------------------------

  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];
  function bytes(value) {
    if (value === null || value === undefined || !Number.isFinite(value)) return "–";
    let v = Math.abs(value), unit = 0;
    while (v >= 1024 && unit < UNITS.length - 1) { v /= 1024; unit++; }
    const text = v >= 100 || unit === 0 ? v.toFixed(0) : v.toFixed(1).replace(/\.0$/, "");
    return (value < 0 ? "-" : "") + text + " " + UNITS[unit];
  }
  // A histogram quantile is a bucket's upper edge: "≤ 250 µs", never "250.00 µs".
  function bound(value) {
    if (value === null || value === undefined || !Number.isFinite(value)) return "–";
    const [scaled, unit] = value >= 1 ? [value, "s"] : value >= 1e-3 ? [value * 1e3, "ms"] : [value * 1e6, "µs"];
    return "≤ " + Number(scaled.toPrecision(3)) + " " + unit;
  }
  function seconds(value) {
    if (value === null || value === undefined || !Number.isFinite(value)) return "–";
    if (value === 0) return "0";
    if (value < 1e-3) return (value * 1e6).toFixed(0) + " µs";
    if (value < 1) return (value * 1e3).toFixed(value < 0.01 ? 2 : 1) + " ms";
    return value.toFixed(2) + " s";
  }

  // ---- Prometheus text format (the subset prometheus_client writes) -------------------------

  const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  function parseMetrics(text) {
    const samples = [];
    for (const line of text.split("\n")) {
      if (!line || line[0] === "#") continue;
      const m = SAMPLE.exec(line);
      if (!m) continue;
      const labels = {};
      if (m[2]) for (const l of m[2].matchAll(LABEL)) labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      samples.push({ name: m[1], labels, value: Number(m[3]) });
    }
    return samples;
  }

  // Like PromQL's histogram_quantile over the increase between two scrapes.
  function quantile(q, buckets) {
    const total = buckets.length ? buckets[buckets.length - 1].count : 0;
    if (!(total > 0)) return null;
    const rank = q * total;
    let lowerBound = 0, lowerCount = 0;
    for (const { le, count } of buckets) {
      if (count >= rank) {
        if (!Number.isFinite(le)) return lowerBound;
        const inBucket = count - lowerCount;
        return inBucket > 0 ? lowerBound + (le - lowerBound) * (rank - lowerCount) / inBucket : le;
      }
      lowerBound = le; lowerCount = count;
    }
    return lowerBound;
  }

  // ---- history ----------------------------------------------------------------------------

  // history.t: poll times (Unix seconds); every series array is as long as t (null: no value).
  const history = { t: [], guests: new Map(), host: { p50: [], p99: [] } };
  const GUEST_SERIES = ["memory", "actual", "balloon", "target", "reported", "reclaimed", "released",
                        "reportRate", "inflateRate"];
  let previous = null;  // {time, pages: Map(guest -> {report, inflate} pages), buckets: [{le, count}]}
  let polls = 0;

  function guestHistory(id) {
    let h = history.guests.get(id);
    if (!h) {
      h = { color: COLORS[history.guests.size % COLORS.length] };
      for (const s of GUEST_SERIES) h[s] = history.t.map(() => null);
      history.guests.set(id, h);
    }
    return h;
  }

  function record(now, guests, samples) {
    const released = new Map();  // guest -> {report, inflate}: pages so far
    const buckets = [];
    for (const s of samples) {
      if (s.name === "balloon_pages_total" && (s.labels.kind === "report" || s.labels.kind === "inflate")) {
        const pages = released.get(s.labels.guest) || { report: 0, inflate: 0 };
        pages[s.labels.kind] += s.value;
        released.set(s.labels.guest, pages);
      } else if (s.name === "balloon_batch_apply_seconds_bucket") {
        buckets.push({ le: s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), count: s.value });
      }
    }
    buckets.sort((a, b) => a.le - b.le);
    const dt = previous ? now - previous.time : 0;

    history.t.push(now);
    for (const h of history.guests.values()) for (const s of GUEST_SERIES) h[s].push(null);
    const last = history.t.length - 1;
    const rows = [];
    for (const g of guests) {
      const h = guestHistory(g.id);
      const pageSize = g.page_size || PAGE_SIZE_DEFAULT;
      const balloon = g.inflated_bytes ?? 0;
      const rates = { report: null, inflate: null };
      if (previous && dt > 0 && previous.pages.has(g.id) && released.has(g.id)) {
        for (const kind of ["report", "inflate"]) {
          // a counter that went down is a new session: count from zero, as rate() does on reset
          const before = previous.pages.get(g.id)[kind], after = released.get(g.id)[kind];
          rates[kind] = ((after >= before ? after - before : after) * pageSize) / dt;
        }
      }
      const values = {
        memory: g.memory_bytes, actual: g.actual_bytes ?? (g.memory_bytes - balloon), balloon,
        target: g.target_bytes, reported: g.reported_bytes, reclaimed: g.reclaimed_bytes,
        released: rates.report === null ? null : rates.report + rates.inflate,
        reportRate: rates.report, inflateRate: rates.inflate,
      };
      for (const s of GUEST_SERIES) h[s][last] = values[s] ?? null;
      rows.push({ g, h, values });
    }
    let p50 = null, p99 = null;
    if (previous && previous.buckets.length === buckets.length) {
      const increase = buckets.map((b, i) => ({ le: b.le, count: b.count - previous.buckets[i].count }));
      if (increase.every((b) => b.count >= 0)) { p50 = quantile(0.5, increase); p99 = quantile(0.99, increase); }
    }
    history.host.p50.push(p50);
    history.host.p99.push(p99);
    previous = { time: now, pages: released, buckets };

    // forget what fell out of the window, and guests with nothing left in it
    let drop = 0;
    while (drop < history.t.length && history.t[drop] < now - WINDOW_S) drop++;
    if (drop) {
      history.t.splice(0, drop);
      history.host.p50.splice(0, drop);
      history.host.p99.splice(0, drop);
      for (const [id, h] of history.guests) {
        for (const s of GUEST_SERIES) h[s].splice(0, drop);
        if (h.reported.every((v) => v === null) && h.memory.every((v) => v === null)) history.guests.delete(id);
      }
    }
    return rows;
  }

  // ---- table ------------------------------------------------------------------------------

  function cell(row, field, value, text, className) {
    const td = document.createElement("td");
    td.dataset.field = field;
    if (value !== null && value !== undefined) td.dataset.value = String(value);
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  // The VMM link (QMP): "-" none, "ok", "held: <why discards wait>", "down", "error".
  function vmmText(vmm) {
    if (!vmm) return "–";
    if (vmm.state === "connected") return vmm.discard_blocked ? `held: ${vmm.discard_blocked}` : "ok";
    return { unreachable: "down", connecting: "…" }[vmm.state] || vmm.state;
  }

  function renderTable(rows) {
    const body = document.querySelector("#guests tbody");
    body.replaceChildren();
    document.getElementById("empty").hidden = rows.length > 0;
    for (const { g, h, values } of rows) {
      const tr = document.createElement("tr");
      tr.dataset.guest = g.id;
      if (!g.connected) tr.className = "retained";
      const name = cell(tr, "id", null, "", "guest");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = h.color;
      name.append(swatch, g.id);
      // a stock guest (no agent) is "vmm" while its QEMU answers: its balloon is QEMU's own
      const viaVmm = !g.connected && g.driver === "virtio-balloon" && g.vmm && g.vmm.state === "connected";
      const up = cell(tr, "connected", g.connected || viaVmm ? 1 : 0, g.connected ? "up" : viaVmm ? "vmm" : "down");
      if (g.driver) up.title = `balloon driven by ${g.driver === "agent" ? "the agent" : "QEMU's virtio-balloon"}`;
      cell(tr, "memory_bytes", values.memory, bytes(values.memory));
      cell(tr, "actual_bytes", values.actual, bytes(values.actual));
      cell(tr, "inflated_bytes", values.balloon, bytes(values.balloon));
      const target = cell(tr, "target_bytes", values.target,
                          values.target === null || values.target === undefined ? "none" : bytes(values.target));
      if (g.target_state) target.dataset.state = g.target_state;
      if (g.target_state === "unreachable") {  // the host says the guest cannot give that much
        target.className = "short";
        target.title = `unreachable: ${bytes(g.target_shortfall_bytes)} short`;
      }
      cell(tr, "reported_bytes", values.reported, bytes(values.reported));
      const usable = cell(tr, "usable_bytes", g.usable_bytes, bytes(g.usable_bytes));
      if (g.stats_age_seconds !== null && g.stats_age_seconds !== undefined) {
        usable.title = `from STATS ${g.stats_age_seconds.toFixed(0)} s ago`;
      }
      cell(tr, "reclaimed_bytes", values.reclaimed, bytes(values.reclaimed));
      const perSecond = (v) => (v === null ? "–" : bytes(v) + "/s");
      cell(tr, "report_bytes_per_second", values.reportRate, perSecond(values.reportRate));
      cell(tr, "inflate_bytes_per_second", values.inflateRate, perSecond(values.inflateRate));
      const w = g.window || { in_use: 0, size: 0 };
      cell(tr, "window", w.in_use, `${w.in_use}/${w.size}`);
      cell(tr, "apply_seconds_p99_recent", g.apply_seconds_p99_recent, bound(g.apply_seconds_p99_recent));
      cell(tr, "driver", null, { "virtio-balloon": "virtio" }[g.driver] || g.driver || "–");
      const vmm = cell(tr, "vmm", null, vmmText(g.vmm));
      if (g.vmm) {
        vmm.title = g.vmm.detail || `${g.vmm.kind} ${g.vmm.address}`;
        if (g.vmm.discard_blocked || g.vmm.state !== "connected") vmm.className = "short";
      }
      body.appendChild(tr);
    }
  }

  // ---- charts -----------------------------------------------------------------------------

  const charts = new Map();  // key -> {plot, figure, signature}

  // Byte axes step in powers of two (64 MiB, 128 MiB, ...), not decimal 95.4 MiB.
  const BINARY_STEPS = [];
  for (let unit = 1; unit <= 1024 ** 4; unit *= 1024) for (const m of [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]) BINARY_STEPS.push(m * unit);
  const FORMATS = {
    bytes: { value: bytes, floor: 1 << 20, incrs: BINARY_STEPS },
    rate: { value: (v) => (v === null || v === undefined ? "–" : bytes(v) + "/s"), floor: 1 << 10, incrs: BINARY_STEPS },
    seconds: { value: seconds, floor: 1e-3, incrs: undefined },
  };
  function axisBytes(u, splits) { return splits.map((v) => bytes(v)); }
  function axisRate(u, splits) { return splits.map((v) => bytes(v) + "/s"); }
  function axisSeconds(u, splits) { return splits.map((v) => seconds(v)); }

  function chart(container, key, title, note, series, data, format) {
    const signature = series.map((s) => s.label + s.stroke).join("|");
    let entry = charts.get(key);
    if (entry && entry.signature !== signature) {
      entry.plot.destroy();
      entry.figure.remove();
      charts.delete(key);
      entry = null;
    }
    if (!entry) {
      const figure = document.createElement("figure");
      figure.dataset.chart = key;
      const caption = document.createElement("figcaption");
      caption.textContent = title + " ";
      if (note) {
        const small = document.createElement("span");
        small.className = "note";
        small.textContent = note;
        caption.appendChild(small);
      }
      figure.appendChild(caption);
      container.appendChild(figure);
      const width = Math.max(300, figure.clientWidth - 16);
      const f = FORMATS[format];
      const axis = { values: { bytes: axisBytes, rate: axisRate, seconds: axisSeconds }[format], size: 70 };
      if (f.incrs) axis.incrs = f.incrs;
      const plot = new uPlot({
        width, height: 190,
        series: [{}, ...series.map((s) => ({ width: 1.5, spanGaps: false, ...s, value: (u, v) => f.value(v) }))],
        axes: [{}, axis],
        // from 0, so a flat line at 200 MiB does not look like noise around a minimum
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(f.floor, max * 1.05)] } },
        legend: { live: true },
        cursor: { drag: { x: false, y: false } },
      }, data, figure);
      entry = { plot, figure, signature, hover: false };
      plot.over.addEventListener("mouseenter", () => { entry.hover = true; });
      plot.over.addEventListener("mouseleave", () => { entry.hover = false; showLatest(entry, entry.plot.data[0].length); });
      charts.set(key, entry);
    } else {
      entry.plot.setData(data);
    }
    showLatest(entry, data[0].length);
    entry.figure.dataset.points = String(data[0].length);
  }

  // The legend shows the newest values (of the last poll that had any) unless the pointer is on the chart.
  function showLatest(entry, length) {
    if (entry.hover || length === 0) return;
    const data = entry.plot.data;
    let idx = length - 1;
    while (idx > 0 && data.slice(1).every((series) => series[idx] === null || series[idx] === undefined)) idx--;
    entry.plot.setLegend({ idx });
  }

  function renderCharts() {
    const guests = [...history.guests.entries()].sort((a, b) => a[0].localeCompare(b[0]));
    const fleet = document.getElementById("fleet");
    const perGuest = () => guests.map(([id, h]) => ({ label: id, stroke: h.color }));
    const column = (field) => [history.t, ...guests.map(([, h]) => h[field])];
    chart(fleet, "reported", "Reported free", "bytes the host tracks as reported, per guest",
          perGuest(), column("reported"), "bytes");
    chart(fleet, "balloon", "Balloon", "inflated bytes, per guest", perGuest(), column("balloon"), "bytes");
    chart(fleet, "reclaimed", "Reclaimed", "holes in each guest's RAM file (kernel st_blocks); empty without " +
          "the host's --ram-dir; never-touched pages are holes too, so it starts above reported",
          perGuest(), column("reclaimed"), "bytes");
    chart(fleet, "released", "report/s + inflate/s", "pages reported or inflated, bytes/s per poll",
          perGuest(), column("released"), "rate");
    chart(fleet, "ack-latency", "ACK latency (host)", "batch received until its ACK is ready, per poll",
          // polls without a batch have no latency: join the points across them
          [{ label: "p50", stroke: "#1f77b4", spanGaps: true, points: { show: true, size: 4 } },
           { label: "p99", stroke: "#d62728", spanGaps: true, points: { show: true, size: 4 } }],
          [history.t, history.host.p50, history.host.p99], "seconds");

    const container = document.getElementById("per-guest");
    const live = new Set(guests.map(([id]) => "guest:" + id));
    for (const [key, entry] of charts) {
      if (key.startsWith("guest:") && !live.has(key)) { entry.plot.destroy(); entry.figure.remove(); charts.delete(key); }
    }
    for (const [id, h] of guests) {
      chart(container, "guest:" + id, id, "memory, actual, balloon, reported, reclaimed",
            [{ label: "memory", stroke: "#7f7f7f" }, { label: "actual", stroke: "#2ca02c" },
             { label: "balloon", stroke: "#ff7f0e" }, { label: "reported", stroke: "#1f77b4" },
             { label: "reclaimed", stroke: "#9467bd", dash: [4, 3] }],
            [history.t, h.memory, h.actual, h.balloon, h.reported, h.reclaimed], "bytes");
    }
  }

  // ---- polling ----------------------------------------------------------------------------

  async function fetchOk(url, type) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
    try {
      const response = await fetch(url, { signal: controller.signal, cache: "no-store" });
      if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
      return type === "json" ? await response.json() : await response.text();
    } finally {
      clearTimeout(timer);
    }
  }

  function setStatus(state, text) {
    document.body.dataset.state = state;
    document.getElementById("status").textContent = text;
  }

  async function poll() {
    try {
      const [api, text] = await Promise.all([fetchOk("../api/v1/guests", "json"), fetchOk("../metrics", "text")]);
      const samples = parseMetrics(text);
      const guests = (api.guests || []).slice().sort((a, b) => a.id.localeCompare(b.id));
      const rows = record(Date.now() / 1000, guests, samples);
      renderTable(rows);
      renderCharts();
      polls++;
      document.body.dataset.polls = String(polls);
      const build = samples.find((s) => s.name === "balloon_build_info");
      const connected = guests.filter((g) => g.connected).length;
      setStatus("live", `live, every ${INTERVAL_S} s`);
      document.getElementById("summary").textContent =
        `${connected} up, ${guests.length - connected} down` +
        (build ? ` · version ${build.labels.version}` : "") + ` · updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      // keep the history; the host may be restarting (guests reconnect and re-report)
      setStatus("unreachable", `host unreachable, retrying (${error.message || error})`);
    } finally {
      setTimeout(poll, INTERVAL_S * 1000);
    }
  }

  window.addEventListener("resize", () => {
    for (const { plot, figure } of charts.values()) plot.setSize({ width: Math.max(300, figure.clientWidth - 16), height: 190 });
  });
  document.getElementById("minutes").textContent = String(WINDOW_S / 60);
  window.balloonDashboard = { history, parseMetrics, quantile, bound };
  poll();
})();
