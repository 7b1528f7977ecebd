// A drawn digit, read as sklearn's load_digits would and sent to every digits model: the 8x8
// input (0..16), its preview, and each model's label and scores.
import { $, el } from "./dom.js";
import { request } from "./http.js";
import { pad } from "./state.js";

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

export async function predict() {
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
