// foldserve's status page. Plain JavaScript modules, nothing built or downloaded: it reads the
// server's own endpoints (relative URLs, so it also works behind a path prefix) and draws on
// <canvas>. This is the entry: the key, the loop, and the wiring of the modules it imports.
//   models, versions, checks:  GET models, GET ui/api/batch-norm     (models.js)
//   live charts:               GET metrics (Prometheus text), rates   (live.js, metrics.js, charts.js)
//   drift:                     GET models/{name}/drift                (drift.js)
//   draw a digit:              POST models/{name}/predict             (pad.js, digits.js)
import { $, num, showMessage } from "./dom.js";
import { HttpError, Unauthorized, forgetKey, storeKey, storedKey } from "./http.js";
import { refreshModels } from "./models.js";
import { refreshMetrics } from "./live.js";
import { refreshDrift } from "./drift.js";
import { setUpImages } from "./images.js";
import { setUpPad } from "./pad.js";
import { EVERY_MS, state } from "./state.js";

function failed(error) {
  if (error instanceof Unauthorized) {
    state.needKey = true;
    const had = Boolean(storedKey());
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
      if (await refreshModels()) {
        setUpPad(failed); // the pad and the image drop follow the models
        setUpImages(failed);
      }
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
    input.placeholder = storedKey()
      ? "a key is set (this tab only)"
      : "only if the server asks for one";
  };
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (input.value.trim()) storeKey(input.value.trim());
    shown();
    state.needKey = false;
    state.modelsText = ""; // render again with what the key shows
    state.drift.clear();
    showMessage("");
  });
  $("key-forget").addEventListener("click", () => {
    forgetKey();
    shown();
  });
  shown();
}

setUpKey();
tick();
