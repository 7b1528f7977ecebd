// What the page's modules share: its settings, and what it has read so far.
import { clamp } from "./dom.js";

const query = new URLSearchParams(location.search);
export const EVERY_MS = clamp(Number(query.get("every_ms")) || 2000, 250, 60000);
export const HISTORY = 90; // points kept per chart
export const PALETTE = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2"];

export const state = {
  needKey: false,
  modelsText: "",
  models: [], // [{name, versions: [...]}] as GET /models gives them
  reports: new Map(), // "name/version" -> the BN report of ui/api/batch-norm
  previous: null, // the last /metrics scrape
  series: { rate: [], mean: [], p95: [], batch: [] },
  drift: new Map(), // name -> {off: reason} | the drift answer
  ticks: 0,
};

// The drawing pad: the models it asks, the strokes drawn, whether its events are wired.
export const pad = { models: [], strokes: 0, ready: false };
