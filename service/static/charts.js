// Charts on <canvas>, sized for the screen's pixel ratio: a line chart of recent history, and
// signed bar pairs around a zero line. They draw what they are given; nothing here fetches.
import { num } from "./dom.js";
import { EVERY_MS, HISTORY, PALETTE } from "./state.js";

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
export function lineChart(canvas, lines) {
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

export function last(series) {
  for (let i = series.length - 1; i >= 0; i--) if (series[i] !== null) return series[i];
  return null;
}

// Two bars per item (first, second), signed around a zero line.
export function barChart(canvas, first, second) {
  const { ctx, width, height } = sized(canvas);
  const max = niceMax(Math.max(0.5, ...first.map(Math.abs), ...second.map(Math.abs)));
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
  const slot = Math.min(28, (width - left) / Math.max(1, first.length));
  const bar = Math.max(1, slot / 2 - 1);
  first.forEach((_, i) => {
    const x = left + i * slot;
    ctx.fillStyle = PALETTE[0];
    ctx.fillRect(x, Math.min(mid, mid - first[i] * scale), bar, Math.abs(first[i] * scale));
    ctx.fillStyle = PALETTE[1];
    ctx.fillRect(x + bar, Math.min(mid, mid - second[i] * scale), bar, Math.abs(second[i] * scale));
  });
  canvas.dataset.bars = String(first.length);
}
