// foldserve's status page. Plain JavaScript, nothing built or downloaded: it reads the server's
// own endpoints (relative URLs, so it also works behind a path prefix) and draws on <canvas>.
//   models, versions, checks:  GET models, GET ui/api/batch-norm
//   live charts:               GET metrics (Prometheus text), rates from successive scrapes
//   drift:                     GET models/{name}/drift
//   draw a digit:              POST models/{name}/predict
"use strict";

(() => {
  const KEY_STORE = "foldserve.apiKey"; // sessionStorage: this tab only, gone when it closes
  const query = new URLSearchParams(location.search);
  const EVERY_MS = clamp(Number(query.get("every_ms")) || 2000, 250, 60000);
  const HISTORY = 90; // points kept per chart
  const PALETTE = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2"];
  const DIGITS_SHAPES = ["64", "1,8,8", "8,8"]; // sklearn's load_digits: 8x8 pixels, 0..16

  const state = {
    needKey: false,
    modelsText: "",
    models: [], // [{name, versions: [...]}] as GET /models gives them
    reports: new Map(), // "name/version" -> the BN report of ui/api/batch-norm
    previous: null, // the last /metrics scrape
    series: { rate: [], mean: [], p95: [], batch: [] },
    drift: new Map(), // name -> {off: reason} | the drift answer
    ticks: 0,
  };

  // ------------------------------------------------------------------ small helpers

  function clamp(x, lo, hi) {
    return Math.min(hi, Math.max(lo, x));
  }

  function $(id) {
    return document.getElementById(id);
  }

  // Elements are built with textContent only: no server string is ever parsed as HTML.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (name === "class") node.className = value;
      else if (name === "style") Object.assign(node.style, value); // CSSOM: allowed by the CSP
      else if (name.startsWith("data-")) node.setAttribute(name, String(value));
      else node[name] = value;
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function num(x, digits = 3) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    if (x === 0) return "0";
    const abs = Math.abs(x);
    if (abs >= 1000) return x.toFixed(0);
    if (abs < 1e-3) return x.toExponential(1);
    return Number(x.toPrecision(digits)).toString();
  }

  function showMessage(text) {
    const box = $("message");
    box.textContent = text || "";
    box.hidden = !text;
  }

  // ------------------------------------------------------------------ HTTP, with the key

  class Unauthorized extends Error {}

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function headers(extra) {
    const key = sessionStorage.getItem(KEY_STORE);
    const all = { ...extra };
    if (key) all.Authorization = `Bearer ${key}`; // or X-API-Key: the server takes either
    return all;
  }

  async function request(path, options = {}) {
    const answer = await fetch(path, {
      cache: "no-store",
      ...options,
      headers: headers(options.headers),
    });
    if (answer.status === 401) throw new Unauthorized(path);
    if (!answer.ok) {
      let why = answer.statusText;
      try {
        why = (await answer.json()).error || why;
      } catch (_) {
        // not a JSON error body: the status text says enough
      }
      throw new HttpError(answer.status, `${path}: ${answer.status} ${why}`);
    }
    return answer;
  }

  const getJson = async (path) => (await request(path)).json();

  // ------------------------------------------------------------------ models and BN report

  function key(name, version) {
    return `${name}/${version}`;
  }

  async function refreshModels() {
    const text = await (await request("models")).text();
    if (text === state.modelsText) return;
    const reports = await getJson("ui/api/batch-norm");
    state.modelsText = text;
    state.models = JSON.parse(text).models;
    state.reports = new Map(reports.versions.map((r) => [key(r.name, r.version), r]));
    renderModels(JSON.parse(text).default_model);
    setUpPad();
  }

  function statusBadge(version) {
    const kind = { ready: "ok", failed: "bad", loading: "warn" }[version.status] || "";
    const label = version.status === "ready" ? "serving" : version.status;
    return el("span", { class: `badge ${kind}`, "data-status": version.status }, label);
  }

  function check(ok) {
    return ok ? "✓" : "✗";
  }

  function verificationRows(version, report) {
    const rows = [];
    const tol = version.tolerance;
    if (version.golden_max_abs_diff !== undefined && tol) {
      const g = tol.golden;
      rows.push([
        "golden outputs",
        `max |Δ| ${num(version.golden_max_abs_diff)} (atol ${num(g.atol)}, rtol ${num(g.rtol)})`,
      ]);
      const b = tol.batch_invariance;
      rows.push([
        "batch invariance",
        `max |Δ| ${num(version.batch_invariance_max_diff)} in batches of ${b.batch_sizes.join(", ")}`,
      ]);
    }
    const bits = version.bitwise_batch_invariance;
    if (bits) {
      const measured = bits.measured === null ? "not measured" : bits.measured ? "yes" : "no";
      rows.push(["bitwise invariant", `${measured}${bits.max_rows ? ` up to ${bits.max_rows} rows` : ""}`]);
    }
    if (report && report.exporter) {
      const e = report.exporter;
      const diffs = Object.entries(e.max_abs_diff)
        .map(([fmt, d]) => `${fmt} ${num(d)}`)
        .join(", ");
      rows.push([
        "exporter",
        `${check(e.batch_statistics_ops === 0)} ${e.batch_statistics_ops} batch-statistics ops; ` +
          `max |Δ| vs unfolded ${diffs} on ${e.samples_checked} samples`,
      ]);
    }
    if (report && report.provenance) {
      const p = report.provenance;
      const acc = p.accuracy_population ?? p.accuracy_ema;
      rows.push([
        "provenance",
        `${p.entry_point}, folded by ${p.fold_path}, BN statistics: ${p.bn_stats}` +
          (acc !== null && acc !== undefined ? `, held-out accuracy ${num(acc * 100)} %` : ""),
      ]);
    }
    return rows;
  }

  const PLACEMENT = {
    folded_into_previous: "folded into the layer before",
    folded_into_next: "folded into the layer after",
    frozen_affine: "frozen per-channel affine",
  };

  function bnTable(report) {
    if (!report || !report.batch_norm) return el("p", { class: "muted" }, "no manifest read");
    if (!report.batch_norm.length) return el("p", { class: "muted" }, "no BatchNorm layers");
    return el(
      "table",
      { class: "bn" },
      el("thead", {}, el("tr", {}, ["BatchNorm", "features", "placement", "into"].map((h) => el("th", {}, h)))),
      el(
        "tbody",
        {},
        report.batch_norm.map((bn) =>
          el(
            "tr",
            { "data-bn": bn.name, "data-placement": bn.placement },
            el("td", {}, el("code", {}, bn.name)),
            el("td", {}, bn.features),
            el("td", { class: `placement-${bn.placement}` }, PLACEMENT[bn.placement] || bn.placement),
            el("td", {}, bn.target ? el("code", {}, bn.target) : "–"),
          ),
        ),
      ),
    );
  }

  function renderModels(defaultModel) {
    const cards = state.models.map((model) =>
      el(
        "div",
        { class: "card", "data-model": model.name },
        el("h3", {}, model.name, model.name === defaultModel ? el("span", { class: "muted" }, " (default)") : null),
        model.versions.map((v) => {
          const report = state.reports.get(key(v.name, v.version));
          const facts = [
            ["version", el("span", {}, `${v.version} `, statusBadge(v))],
            v.reason ? ["reason", v.reason] : null,
            report && report.architecture ? ["architecture", report.architecture] : null,
            v.backend ? ["runs on", `${v.backend} on ${v.device}`] : null,
            v.input_shape ? ["input", `[${v.input_shape.join(", ")}] per sample`] : null,
            v.batching ? ["batching", `up to ${v.batching.max_batch_size} rows, ${num(v.batching.max_delay_ms)} ms`] : null,
            ...verificationRows(v, report),
          ].filter(Boolean);
          return el(
            "div",
            { class: "version", "data-version": v.version },
            el("dl", {}, facts.map(([term, value]) => [el("dt", {}, term), el("dd", {}, value)])),
            bnTable(report),
          );
        }),
      ),
    );
    $("models").replaceChildren(
      cards.length ? el("div", { class: "cards" }, cards) : el("p", { class: "muted" }, "no models in the store"),
    );
  }

  // ------------------------------------------------------------------ /metrics

  // The Prometheus text format: `name{label="value",...} number`; comments start with '#'.
  const SAMPLE = /^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const LABEL = /([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

  function parseMetrics(text) {
    const samples = [];
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const m = SAMPLE.exec(line);
      if (!m) continue;
      const labels = {};
      for (const [, name, value] of (m[2] || "").matchAll(LABEL)) labels[name] = value;
      const value = m[3] === "+Inf" ? Infinity : m[3] === "-Inf" ? -Infinity : Number(m[3]);
      samples.push({ name: m[1], labels, value });
    }
    return samples;
  }

  function total(samples, name) {
    return samples.filter((s) => s.name === name).reduce((acc, s) => acc + s.value, 0);
  }

  // One histogram summed over every label set (models, versions): count, sum, cumulative buckets.
  function histogram(samples, base) {
    const buckets = new Map();
    for (const s of samples) {
      if (s.name === `${base}_bucket`) {
        const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
        buckets.set(le, (buckets.get(le) || 0) + s.value);
      }
    }
    return { count: total(samples, `${base}_count`), sum: total(samples, `${base}_sum`), buckets };
  }

  // A counter went down: the server restarted (or a worker did); count from zero again.
  function delta(now, before) {
    return now >= before ? now - before : now;
  }

  // Quantile q of the observations between two scrapes, interpolated in their bucket.
  function quantile(q, now, before) {
    const bounds = [...now.buckets.keys()].sort((a, b) => a - b);
    const counts = bounds.map((le) => delta(now.buckets.get(le), before.buckets.get(le) || 0));
    const n = counts[counts.length - 1];
    if (!n) return null;
    const rank = q * n;
    for (let i = 0; i < bounds.length; i++) {
      if (counts[i] >= rank) {
        const lo = i ? bounds[i - 1] : 0;
        const hi = bounds[i] === Infinity ? lo : bounds[i];
        const below = i ? counts[i - 1] : 0;
        const inside = counts[i] - below;
        return lo + (hi - lo) * (inside ? (rank - below) / inside : 0);
      }
    }
    return null;
  }

  async function refreshMetrics() {
    const samples = parseMetrics(await (await request("metrics")).text());
    const scrape = {
      at: performance.now(),
      requests: total(samples, "foldserve_requests_total"),
      latency: histogram(samples, "foldserve_request_duration_seconds"),
      batch: histogram(samples, "foldserve_batch_size"),
    };
    const before = state.previous;
    state.previous = scrape;
    if (!before) return;
    const seconds = (scrape.at - before.at) / 1000;
    const requests = delta(scrape.requests, before.requests);
    const answered = delta(scrape.latency.count, before.latency.count);
    const batches = delta(scrape.batch.count, before.batch.count);
    const push = (series, value) => {
      series.push(value);
      if (series.length > HISTORY) series.shift();
    };
    push(state.series.rate, requests / seconds);
    push(state.series.mean, answered ? (1000 * delta(scrape.latency.sum, before.latency.sum)) / answered : null);
    const p95 = quantile(0.95, scrape.latency, before.latency);
    push(state.series.p95, p95 === null ? null : 1000 * p95);
    push(state.series.batch, batches ? delta(scrape.batch.sum, before.batch.sum) / batches : null);
    drawCharts();
  }

  function niceMax(x) {
    if (!(x > 0)) return 1;
    const step = 10 ** Math.floor(Math.log10(x));
    return [1, 2, 2.5, 5, 10].map((m) => m * step).find((m) => m >= x);
  }

  function sized(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(100, canvas.clientWidth);
    const height = canvas.height / (canvas._ratio || 1);
    if (canvas._ratio !== ratio || canvas.width !== Math.round(width * ratio)) {
      canvas._ratio = ratio;
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
      canvas.style.height = `${height}px`;
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = "11px system-ui, sans-serif";
    return { ctx, width, height };
  }

  // A line chart of the last HISTORY points, right-aligned; null leaves a gap (nothing measured).
  function lineChart(canvas, lines) {
    const { ctx, width, height } = sized(canvas);
    const left = 40;
    const top = 8;
    const bottom = height - 16;
    const values = lines.flatMap((l) => l.values).filter((v) => v !== null);
    const max = niceMax(Math.max(0, ...values));
    const y = (v) => bottom - (v / max) * (bottom - top);
    const x = (i, n) => width - 4 - (n - 1 - i) * ((width - left - 4) / (HISTORY - 1));
    ctx.strokeStyle = "#dde2e8";
    ctx.fillStyle = "#6a7380";
    for (const v of [0, max / 2, max]) {
      ctx.beginPath();
      ctx.moveTo(left, y(v));
      ctx.lineTo(width - 4, y(v));
      ctx.stroke();
      ctx.fillText(num(v), 2, y(v) + 4);
    }
    ctx.fillText(`${Math.round(((HISTORY - 1) * EVERY_MS) / 1000)} s`, left, height - 3);
    ctx.fillText("now", width - 26, height - 3);
    lines.forEach((line, index) => {
      ctx.strokeStyle = line.color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      let drawing = false;
      line.values.forEach((v, i) => {
        if (v === null) {
          drawing = false;
          return;
        }
        const px = x(i, line.values.length);
        if (drawing) ctx.lineTo(px, y(v));
        else ctx.moveTo(px, y(v));
        drawing = true;
      });
      ctx.stroke();
      if (lines.length > 1) {
        ctx.fillStyle = line.color;
        ctx.fillText(line.label, left + 6 + index * 50, top + 10);
      }
    });
    canvas.dataset.points = String(lines[0].values.length);
  }

  function last(series) {
    for (let i = series.length - 1; i >= 0; i--) if (series[i] !== null) return series[i];
    return null;
  }

  function caption(id, text, value) {
    const figure = $(id);
    figure.querySelector(".value").textContent = text;
    figure.dataset.last = value === null ? "" : String(value);
  }

  function drawCharts() {
    const s = state.series;
    lineChart($("chart-rate"), [{ values: s.rate, color: PALETTE[0] }]);
    lineChart($("chart-latency"), [
      { label: "mean", values: s.mean, color: PALETTE[0] },
      { label: "p95", values: s.p95, color: PALETTE[1] },
    ]);
    lineChart($("chart-batch"), [{ values: s.batch, color: PALETTE[2] }]);
    const rate = last(s.rate);
    caption("fig-rate", `${num(rate)} /s`, rate);
    const p95 = last(s.p95);
    caption("fig-latency", `${num(last(s.mean))} / ${num(p95)} ms`, last(s.mean));
    const batch = last(s.batch);
    caption("fig-batch", num(batch), batch);
    $("live-note").textContent = `every ${num(EVERY_MS / 1000)} s from /metrics`;
  }

  // ------------------------------------------------------------------ drift

  const field = (f, ...names) => names.map((n) => f[n]).find((v) => typeof v === "number") ?? null;

  async function refreshDrift() {
    for (const model of state.models) {
      if (!model.versions.some((v) => v.status === "ready")) continue;
      const known = state.drift.get(model.name);
      if (known && known.off !== undefined) continue; // asked once: no input BN stays no input BN
      try {
        const answer = await getJson(`models/${encodeURIComponent(model.name)}/drift`);
        state.drift.set(model.name, answer.available === false ? { off: answer.reason || "" } : answer);
      } catch (error) {
        if (!(error instanceof HttpError) || error.status !== 404) throw error;
        state.drift.set(model.name, { off: "" }); // no drift endpoint, or nothing monitored
      }
    }
    renderDrift();
  }

  function renderDrift() {
    const blocks = state.models
      .filter((m) => state.drift.has(m.name))
      .map((model) => {
        const d = state.drift.get(model.name);
        if (d.off !== undefined) {
          return el(
            "div",
            { class: "drift", "data-model": model.name, "data-drift": "off" },
            el("h3", {}, model.name),
            el("p", { class: "muted" }, "no input BN monitored", d.off ? ` (${d.off})` : ""),
          );
        }
        const features = d.features || [];
        const collecting = d.score === null || d.score === undefined || (d.samples ?? 0) < (d.min_samples ?? 0);
        const verdict = collecting ? "collecting" : d.drifted ? "drifted" : "ok";
        const badge = {
          collecting: ["warn", `collecting: ${Math.round(d.samples ?? 0)} of ${d.min_samples} samples`],
          drifted: ["bad", "drifted"],
          ok: ["ok", "in distribution"],
        }[verdict];
        const canvas = el("canvas", { height: 130 });
        const block = el(
          "div",
          { class: "drift card", "data-model": model.name, "data-drift": verdict },
          el("h3", {}, `${model.name} v${d.version ?? ""} `, el("span", { class: `badge ${badge[0]}` }, badge[1])),
          el(
            "p",
            { class: "muted" },
            `score ${num(d.score)} (threshold ${num(d.threshold)}) against ${d.layer || "the input BN"}'s ` +
              `${d.source || "frozen"} statistics, ${Math.round(d.samples ?? 0)} samples in the window` +
              (d.window ? ` of ${d.window}` : "") +
              `. Per ${d.axis || "feature"}: standardized mean shift (blue), log variance ratio (orange).`,
          ),
          canvas,
        );
        block._draw = () => barChart(canvas, features);
        return block;
      });
    $("drift").replaceChildren(...(blocks.length ? blocks : [el("p", { class: "muted" }, "no model serving")]));
    for (const block of blocks) if (block._draw) block._draw();
  }

  // Two bars per feature, signed around a zero line.
  function barChart(canvas, features) {
    const { ctx, width, height } = sized(canvas);
    const shift = features.map((f) => field(f, "mean_shift", "standardized_mean_shift", "shift") ?? 0);
    const ratio = features.map((f) => field(f, "log_var_ratio", "log_variance_ratio") ?? 0);
    const max = niceMax(Math.max(0.5, ...shift.map(Math.abs), ...ratio.map(Math.abs)));
    const left = 34;
    const mid = height / 2;
    const scale = (mid - 8) / max;
    ctx.fillStyle = "#6a7380";
    ctx.strokeStyle = "#dde2e8";
    for (const v of [max, 0, -max]) {
      ctx.beginPath();
      ctx.moveTo(left, mid - v * scale);
      ctx.lineTo(width, mid - v * scale);
      ctx.stroke();
      ctx.fillText(num(v), 2, mid - v * scale + 4);
    }
    const slot = Math.min(28, (width - left) / Math.max(1, features.length));
    const bar = Math.max(1, slot / 2 - 1);
    features.forEach((_, i) => {
      const x = left + i * slot;
      ctx.fillStyle = PALETTE[0];
      ctx.fillRect(x, Math.min(mid, mid - shift[i] * scale), bar, Math.abs(shift[i] * scale));
      ctx.fillStyle = PALETTE[1];
      ctx.fillRect(x + bar, Math.min(mid, mid - ratio[i] * scale), bar, Math.abs(ratio[i] * scale));
    });
    canvas.dataset.bars = String(features.length);
  }

  // ------------------------------------------------------------------ draw a digit

  const pad = { models: [], strokes: 0, ready: false };

  function digitsModels() {
    return state.models.filter((m) =>
      m.versions.some((v) => v.status === "ready" && v.input_shape && DIGITS_SHAPES.includes(v.input_shape.join(","))),
    );
  }

  function setUpPad() {
    pad.models = digitsModels().map((m) => m.name);
    $("draw-section").hidden = pad.models.length === 0;
    if (pad.ready || !pad.models.length) return;
    pad.ready = true;
    const canvas = $("pad");
    const ctx = canvas.getContext("2d");
    let drawing = false;
    const at = (event) => {
      const box = canvas.getBoundingClientRect();
      return [(event.clientX - box.left) * (canvas.width / box.width), (event.clientY - box.top) * (canvas.height / box.height)];
    };
    // Pointer events: the mouse, a pen and a finger alike.
    canvas.addEventListener("pointerdown", (event) => {
      event.preventDefault();
      canvas.setPointerCapture(event.pointerId);
      drawing = true;
      ctx.lineWidth = 26; // about a fifth of a digit's height: strokes as thick as load_digits'
      ctx.lineCap = "round";
      ctx.lineJoin = "round";
      ctx.strokeStyle = "#000";
      ctx.beginPath();
      ctx.moveTo(...at(event));
      ctx.lineTo(...at(event));
      ctx.stroke();
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!drawing) return;
      ctx.lineTo(...at(event));
      ctx.stroke();
    });
    const end = () => {
      if (!drawing) return;
      drawing = false;
      pad.strokes += 1;
      predict().catch(failed);
    };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    $("pad-clear").addEventListener("click", () => {
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      $("pad-8x8").getContext("2d").clearRect(0, 0, 64, 64);
      const out = $("predictions");
      delete out.dataset.input;
      out.replaceChildren(el("p", { class: "muted" }, "draw with the mouse or a finger"));
    });
  }

  // As sklearn's load_digits (UCI optdigits): the digit scaled to fill a 32x32 bitmap, then the
  // pixels that are on counted in each 4x4 block: 64 values from 0 to 16.
  function toDigits(canvas) {
    const { width, height } = canvas;
    const ink = canvas.getContext("2d").getImageData(0, 0, width, height).data;
    let [x0, y0, x1, y1] = [width, height, -1, -1];
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        if (ink[(y * width + x) * 4 + 3] > 0) {
          x0 = Math.min(x0, x);
          x1 = Math.max(x1, x);
          y0 = Math.min(y0, y);
          y1 = Math.max(y1, y);
        }
      }
    }
    if (x1 < 0) return null;
    const side = Math.max(x1 - x0 + 1, y1 - y0 + 1); // the longer side fills the bitmap
    const ox = x0 - (side - (x1 - x0 + 1)) / 2;
    const oy = y0 - (side - (y1 - y0 + 1)) / 2;
    const cover = new Float64Array(32 * 32);
    for (let y = y0; y <= y1; y++) {
      for (let x = x0; x <= x1; x++) {
        const alpha = ink[(y * width + x) * 4 + 3];
        if (!alpha) continue;
        const cx = Math.min(31, Math.floor(((x - ox) * 32) / side));
        const cy = Math.min(31, Math.floor(((y - oy) * 32) / side));
        cover[cy * 32 + cx] += alpha / 255;
      }
    }
    const area = (side / 32) ** 2;
    const digits = new Array(64).fill(0);
    cover.forEach((c, i) => {
      if (c >= area / 2) digits[Math.floor(i / 32 / 4) * 8 + Math.floor((i % 32) / 4)] += 1;
    });
    return digits;
  }

  function preview(digits) {
    const ctx = $("pad-8x8").getContext("2d");
    digits.forEach((v, i) => {
      const shade = Math.round(255 * (1 - v / 16));
      ctx.fillStyle = `rgb(${shade}, ${shade}, ${shade})`;
      ctx.fillRect((i % 8) * 8, Math.floor(i / 8) * 8, 8, 8);
    });
  }

  function softmax(logits) {
    const top = Math.max(...logits);
    const e = logits.map((z) => Math.exp(z - top));
    const s = e.reduce((a, b) => a + b, 0);
    return e.map((v) => v / s);
  }

  async function predict() {
    const stroke = pad.strokes;
    const digits = toDigits($("pad"));
    if (!digits) return;
    preview(digits);
    const out = $("predictions");
    const body = JSON.stringify({ inputs: [digits] });
    const results = [];
    for (const name of pad.models) {
      const answer = await (
        await request(`models/${encodeURIComponent(name)}/predict`, {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body,
        })
      ).json();
      const label = String(answer.predictions ? answer.predictions[0] : "");
      const scores = softmax(answer.outputs[0]);
      results.push(
        el(
          "div",
          { class: "prediction card", "data-model": name, "data-label": label },
          el("div", { class: "muted" }, `${name} v${answer.version}`),
          el("div", { class: "label" }, label),
          el(
            "div",
            { class: "scores" },
            scores.map((p, i) => [
              el("span", {}, i),
              el("span", { class: "bar", style: { width: `${(100 * p).toFixed(1)}%` } }),
              el("span", {}, `${(100 * p).toFixed(1)}%`),
            ]),
          ),
        ),
      );
    }
    if (stroke !== pad.strokes) return; // a later stroke's answers are coming: those count
    out.replaceChildren(...results);
    out.dataset.input = JSON.stringify(digits); // what was sent: the test predicts it again
    out.dataset.strokes = String(stroke);
  }

  // ------------------------------------------------------------------ the loop, the key

  function failed(error) {
    if (error instanceof Unauthorized) {
      state.needKey = true;
      const had = Boolean(sessionStorage.getItem(KEY_STORE));
      showMessage(
        had
          ? "401 Unauthorized: the server refused this key. Paste another one above."
          : "401 Unauthorized: this server requires an API key. Paste one above: it is kept in " +
              "this tab only (sessionStorage) and sent as Authorization: Bearer.",
      );
      document.body.dataset.auth = "needed";
    } else if (error instanceof HttpError) {
      showMessage(error.message);
    } else {
      showMessage(`The server cannot be reached (${error.message}); retrying every ${num(EVERY_MS / 1000)} s.`);
    }
  }

  async function readiness() {
    // Open to all, like the other probes: readiness without a key.
    const answer = await fetch("readyz", { cache: "no-store" });
    const body = await answer.json();
    const badge = $("readiness");
    badge.className = `badge ${body.ready ? "ok" : "bad"}`;
    badge.textContent = body.ready ? "ready" : `not ready: ${body.reason}`;
  }

  async function tick() {
    try {
      await readiness();
      if (!state.needKey) {
        await refreshModels();
        await refreshMetrics();
        await refreshDrift();
        showMessage("");
        document.body.dataset.auth = "ok";
      }
    } catch (error) {
      failed(error);
    } finally {
      state.ticks += 1;
      document.body.dataset.ticks = String(state.ticks);
      setTimeout(tick, EVERY_MS);
    }
  }

  function setUpKey() {
    const input = $("key");
    const shown = () => {
      input.value = "";
      input.placeholder = sessionStorage.getItem(KEY_STORE)
        ? "a key is set (this tab only)"
        : "only if the server asks for one";
    };
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      if (input.value.trim()) sessionStorage.setItem(KEY_STORE, input.value.trim());
      shown();
      state.needKey = false;
      state.modelsText = ""; // render again with what the key shows
      state.drift.clear();
      showMessage("");
    });
    $("key-forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORE);
      shown();
    });
    shown();
  }

  setUpKey();
  tick();
})();
