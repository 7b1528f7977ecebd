// GET metrics, read: the Prometheus text format parsed, histograms summed, and the rates and
// quantiles between two scrapes. Pure functions: nothing here fetches or draws.

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

// What the live charts need from one scrape of GET metrics, taken at `at` (ms).
export function scrape(text, at) {
  const samples = parseMetrics(text);
  return {
    at,
    requests: total(samples, "foldserve_requests_total"),
    latency: histogram(samples, "foldserve_request_duration_seconds"),
    batch: histogram(samples, "foldserve_batch_size"),
  };
}

// Between two scrapes: requests per second, latency mean and p95 (ms), rows per batch (mean);
// null where nothing was answered.
export function between(now, before) {
  const seconds = (now.at - before.at) / 1000;
  const requests = delta(now.requests, before.requests);
  const answered = delta(now.latency.count, before.latency.count);
  const batches = delta(now.batch.count, before.batch.count);
  const p95 = quantile(0.95, now.latency, before.latency);
  return {
    rate: requests / seconds,
    mean: answered ? (1000 * delta(now.latency.sum, before.latency.sum)) / answered : null,
    p95: p95 === null ? null : 1000 * p95,
    batch: batches ? delta(now.batch.sum, before.batch.sum) / batches : null,
  };
}
