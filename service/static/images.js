// The image drop: shown while a serving model takes images (its manifest records the
// preprocessing they need); a PNG or JPEG dropped on it, or chosen, is sent as it is, and each
// such model's prediction shown.
import { $, el } from "./dom.js";
import { request } from "./http.js";
import { state } from "./state.js";

const TYPES = ["image/png", "image/jpeg"];
let wired = false;

const imageModels = () =>
  state.models.filter((m) => m.versions.some((v) => v.status === "ready" && v.image)).map((m) => m.name);

// `failed` takes what a prediction throws (the loop's handler: a 401 asks for the key).
export function setUpImages(failed) {
  const models = imageModels();
  $("image-section").hidden = models.length === 0;
  $("image-drop").dataset.models = models.join(",");
  if (wired || !models.length) return;
  wired = true;
  const zone = $("image-drop");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) send(file).catch(failed);
  });
  $("image-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) send(file).catch(failed);
  });
}

async function send(file) {
  const out = $("image-predictions");
  if (!TYPES.includes(file.type)) {
    out.replaceChildren(el("p", { class: "muted" }, `${file.name}: send a PNG or a JPEG`));
    return;
  }
  const results = [];
  for (const name of $("image-drop").dataset.models.split(",").filter(Boolean)) {
    const answer = await (
      await request(`models/${encodeURIComponent(name)}/predict`, {
        method: "POST",
        headers: { "Content-Type": file.type },
        body: file,
      })
    ).json();
    const label = String(answer.predictions ? answer.predictions[0] : "");
    results.push(
      el(
        "div",
        { class: "prediction card", "data-model": name, "data-label": label },
        el("div", { class: "muted" }, `${name} v${answer.version}`),
        el("div", { class: "label" }, label || "(no label: see the outputs)"),
      ),
    );
  }
  out.replaceChildren(...results);
  out.dataset.file = file.name;
}
