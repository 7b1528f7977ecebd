// The live section: GET metrics scraped every period, a point per scrape on each chart, and the
// last value in each caption.
import { $, num } from "./dom.js";
import { request } from "./http.js";
import { between, scrape } from "./metrics.js";
import { last, lineChart } from "./charts.js";
import { EVERY_MS, HISTORY, PALETTE, state } from "./state.js";

export async function refreshMetrics() {
  const now = scrape(await (await request("metrics")).text(), performance.now());
  const before = state.previous;
  state.previous = now;
  if (!before) return;
  const point = between(now, before);
  for (const name of ["rate", "mean", "p95", "batch"]) {
    const series = state.series[name];
    series.push(point[name]);
    if (series.length > HISTORY) series.shift();
  }
  drawCharts();
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
