// The models: each version's status, the load-time checks, and its BatchNorm layers (the BN
// report of ui/api/batch-norm, which GET models leaves out).
import { $, el, num } from "./dom.js";
import { getJson, request } from "./http.js";
import { state } from "./state.js";

function key(name, version) {
  return `${name}/${version}`;
}

// Reads GET models; true when it changed (and so was drawn again).
export async function refreshModels() {
  const text = await (await request("models")).text();
  if (text === state.modelsText) return false;
  const reports = await getJson("ui/api/batch-norm");
  state.modelsText = text;
  state.models = JSON.parse(text).models;
  state.reports = new Map(reports.versions.map((r) => [key(r.name, r.version), r]));
  renderModels(JSON.parse(text).default_model);
  return true;
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
