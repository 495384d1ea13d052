// The page of `jaxtag serve` (jaxtag/server/app.py): one upload, its tags, its taggram, and
// the explain figure of a clicked chunk. Plain DOM and canvas: nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const LEFT = 170, TOP = 8, ROW = 12, AXIS = 34, BAR = 70;  // taggram layout, px
// viridis at 0, .25, .5, .75, 1 (matplotlib's), interpolated linearly
const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
let current = null;  // {file, data}

function colour(p) {
  const x = Math.min(Math.max(p, 0), 1) * (STOPS.length - 1);
  const i = Math.min(Math.floor(x), STOPS.length - 2), f = x - i;
  const c = STOPS[i].map((v, k) => Math.round(v + f * (STOPS[i + 1][k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function post(path, file, params, asImage = false) {  // JSON, or [blob, headers]
  const form = new FormData();
  form.append("audio", file, file.name);
  const response = await fetch(`${path}?${new URLSearchParams(params)}`, { method: "POST", body: form });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return asImage ? [await response.blob(), response.headers] : response.json();
}

function showTags(data) {
  $("duration").textContent = `(${data.duration.toFixed(1)} s, the mean of its windows)`;
  $("tags").replaceChildren(...data.tags.map((t) => {
    const li = document.createElement("li");
    li.dataset.label = t.label;
    li.textContent = `${t.label} ${t.score.toFixed(2)}`;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.round(t.score * 200)}px`;
    li.append(bar);
    return li;
  }));
}

function plotWidth(data) {
  return Math.max(500, Math.min(2400, data.starts.length * 14));
}

function drawTaggram(data) {
  const canvas = $("taggram"), ctx = canvas.getContext("2d");
  const order = data.labels.map((_, i) => i)
    .sort((a, b) => data.probabilities[data.labels[b]] - data.probabilities[data.labels[a]]);
  const width = plotWidth(data), height = order.length * ROW;
  canvas.width = LEFT + width + BAR;
  canvas.height = TOP + height + AXIS;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const x = (t) => LEFT + (t / data.duration) * width;
  order.forEach((tag, row) => {
    data.starts.forEach((start, w) => {
      const x0 = x(start), x1 = x(Math.min(start + data.window_seconds, data.duration));
      ctx.fillStyle = colour(data.taggram[w][tag]);
      ctx.fillRect(x0, TOP + row * ROW, Math.max(x1 - x0, 1) + 0.5, ROW);  // +0.5: no seams
    });
  });
  ctx.fillStyle = "#222";
  ctx.font = "11px sans-serif";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  order.forEach((tag, row) => ctx.fillText(data.labels[tag], LEFT - 6, TOP + row * ROW + ROW / 2));
  // time axis, in seconds
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const step = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600].find((s) => data.duration / s <= 10) || 1200;
  for (let t = 0; t <= data.duration + 1e-9; t += step) {
    ctx.fillRect(x(t), TOP + height, 1, 4);
    ctx.fillText(`${t}`, x(t), TOP + height + 6);
  }
  ctx.fillText("time (s)", LEFT + width / 2, TOP + height + 20);
  // colour bar: probability 0..1
  const gradient = ctx.createLinearGradient(0, TOP + height, 0, TOP);
  STOPS.forEach((c, i) => gradient.addColorStop(i / (STOPS.length - 1), `rgb(${c})`));
  ctx.fillStyle = gradient;
  ctx.fillRect(LEFT + width + 12, TOP, 12, height);
  ctx.fillStyle = "#222";
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  ctx.fillText("1", LEFT + width + 28, TOP + 4);
  ctx.fillText("0", LEFT + width + 28, TOP + height - 4);
  ctx.save();
  ctx.translate(LEFT + width + 50, TOP + height / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center";
  ctx.fillText("probability", 0, 0);
  ctx.restore();
  $("playhead").style.height = `${height}px`;
  $("playhead").style.top = `${TOP}px`;
  movePlayhead();
}

function movePlayhead() {
  if (!current) return;
  const t = $("player").currentTime || 0;
  $("playhead").style.left = `${LEFT + (t / current.data.duration) * plotWidth(current.data)}px`;
}

async function explainAt(seconds) {
  const { file, data } = current;
  const start = Math.max(0, Math.min(seconds - data.window_seconds / 2, data.duration - data.window_seconds));
  const rounded = Math.floor(Math.max(start, 0) * 100) / 100;
  setStatus(`explaining the chunk at ${rounded.toFixed(2)} s…`);
  try {
    const tags = data.tags.slice(0, 3).map((t) => t.label).join(",");
    const [png, headers] = await post("/api/explain", file, { start: rounded, tags, format: "png" }, true);
    const img = $("maps");
    img.onload = () => { document.body.dataset.state = "explained"; setStatus(""); };
    img.src = URL.createObjectURL(png);
    $("chunk-start").textContent = Number(headers.get("X-Chunk-Start")).toFixed(2);
    $("explanation").hidden = false;
  } catch (err) {
    setStatus(`${file.name}: ${err.message}`, true);
  }
}

async function analyse(file) {
  document.body.dataset.state = "working";
  setStatus(`tagging ${file.name}…`);
  $("result").hidden = true;
  $("explanation").hidden = true;
  try {
    const data = await post("/api/taggram", file, { top_k: 10 });
    current = { file, data };
    $("player").src = URL.createObjectURL(file);
    $("result").hidden = false;
    showTags(data);
    drawTaggram(data);
    setStatus("");
    document.body.dataset.state = "tagged";
  } catch (err) {
    document.body.dataset.state = "error";
    setStatus(`${file.name}: ${err.message}`, true);
  }
}

$("file").addEventListener("change", (e) => e.target.files[0] && analyse(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) analyse(e.dataTransfer.files[0]);
});
$("player").addEventListener("timeupdate", movePlayhead);
$("taggram").addEventListener("click", (e) => {
  if (!current) return;
  const rect = e.target.getBoundingClientRect();
  const fraction = (e.clientX - rect.left - LEFT) / plotWidth(current.data);
  if (fraction >= 0 && fraction <= 1) explainAt(fraction * current.data.duration);
});

fetch("/api/health").then((r) => r.json()).then((h) => {
  $("model").textContent = `${h.model}: ${h.tags.length} tags, ${h.engine} engine, jaxtag ${h.version}`;
  document.body.dataset.state = "ready";
}).catch(() => setStatus("the server does not answer", true));
