// Small helpers for the page's DOM: elements built from text only, numbers shown short.

export function clamp(x, lo, hi) {
  return Math.min(hi, Math.max(lo, x));
}

export function $(id) {
  return document.getElementById(id);
}

// Elements are built with textContent only: no server string is ever parsed as HTML.
export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (name === "class") node.className = value;
    else if (name === "style") Object.assign(node.style, value); // CSSOM: allowed by the CSP
    else if (name.startsWith("data-")) node.setAttribute(name, String(value));
    else node[name] = value;
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function num(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (x === 0) return "0";
  const abs = Math.abs(x);
  if (abs >= 1000) return x.toFixed(0);
  if (abs < 1e-3) return x.toExponential(1);
  return Number(x.toPrecision(digits)).toString();
}

export function showMessage(text) {
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}
