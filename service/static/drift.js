// Input drift against the frozen BatchNorm statistics: GET models/{name}/drift per serving model,
// a verdict and, per feature (channel), the mean shift and log variance ratio as bar pairs; the
// same for each hidden BatchNorm the manifest monitors.
import { $, el, num } from "./dom.js";
import { HttpError, getJson } from "./http.js";
import { barChart } from "./charts.js";
import { state } from "./state.js";

const field = (f, ...names) => names.map((n) => f[n]).find((v) => typeof v === "number") ?? null;

export async function refreshDrift() {
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

// The two bar series of a layer's features: standardized mean shift, log variance ratio.
function bars(features) {
  return [
    features.map((f) => field(f, "mean_shift", "standardized_mean_shift", "shift") ?? 0),
    features.map((f) => field(f, "log_var_ratio", "log_variance_ratio") ?? 0),
  ];
}

// A hidden BatchNorm watched through the map from raw inputs to its input (docs/drift.md).
function hiddenLayer(h) {
  const canvas = el("canvas", { height: 110, "data-layer": h.layer });
  const verdict = h.score === null || h.score === undefined ? "collecting" : h.drifted ? "drifted" : "ok";
  const part = el(
    "div",
    { class: "hidden-layer", "data-layer": h.layer, "data-hidden-drift": verdict },
    el(
      "p",
      { class: "muted" },
      `hidden layer ${h.layer} (its input is a ${h.map || "linear"} map of the model's input): ` +
        `score ${num(h.score)}${h.drifted ? ", drifted" : ""}; per ${h.axis || "feature"}.`,
    ),
    canvas,
  );
  part._draw = () => barChart(canvas, ...bars(h.features || []));
  return part;
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
      const hidden = (d.hidden || []).map(hiddenLayer);
      block.append(...hidden);
      block._draw = () => {
        barChart(canvas, ...bars(features));
        for (const part of hidden) part._draw();
      };
      return block;
    });
  $("drift").replaceChildren(...(blocks.length ? blocks : [el("p", { class: "muted" }, "no model serving")]));
  for (const block of blocks) if (block._draw) block._draw();
}
