// The drawing pad: shown while a serving model takes the digits' shape; each stroke drawn (mouse,
// pen or finger) is predicted.
import { $, el } from "./dom.js";
import { predict } from "./digits.js";
import { pad, state } from "./state.js";

const DIGITS_SHAPES = ["64", "1,8,8", "8,8"]; // sklearn's load_digits: 8x8 pixels, 0..16

function digitsModels() {
  return state.models.filter((m) =>
    m.versions.some((v) => v.status === "ready" && v.input_shape && (v.inputs || []).length <= 1 && DIGITS_SHAPES.includes(v.input_shape.join(","))),
  );
}

// `failed` takes what a prediction throws (the loop's handler: a 401 asks for the key).
export function setUpPad(failed) {
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
