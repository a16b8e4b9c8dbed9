// vitscope serve: draw a digit (mouse, pen or touch) or open an image; the server preprocesses it exactly as
// `vitscope predict` does and answers with the prediction and the model's attention, drawn here.
"use strict";

const STROKE_WIDTH = 22;         // on the 280 px pad: thick, like a marker (MNIST strokes are ~1/8 of the digit)
const PREDICT_INTERVAL_MS = 150; // while drawing, at most one prediction this often, and one at the end
const TOP_CLASSES = 3;

const $ = (id) => document.getElementById(id);
const pad = $("pad");
const context = pad.getContext("2d");

let hasInk = false;
let generation = 0;     // bumped on every clear or new image: answers to older requests are dropped
let timer = null;
let inFlight = false;
let pending = false;
let lastResult = null;
const lastPoints = new Map(); // pointerId -> {x, y}

// ---- the pad ----------------------------------------------------------------------------------------

function clearPad() {
  context.fillStyle = "#ffffff";
  context.fillRect(0, 0, pad.width, pad.height);
}

function padPoint(event) {
  const box = pad.getBoundingClientRect();
  return {x: (event.clientX - box.left) * pad.width / box.width,
          y: (event.clientY - box.top) * pad.height / box.height};
}

function strokeTo(id, point) {
  const last = lastPoints.get(id) || point;
  // A segment from the last point, round-capped: fast strokes stay continuous between pointer events.
  context.beginPath();
  context.moveTo(last.x, last.y);
  context.lineTo(point.x, point.y);
  context.stroke();
  lastPoints.set(id, point);
}

function startInk() {
  if (!hasInk) {
    hasInk = true;
    generation += 1;
    $("hint").hidden = true;
    $("source").textContent = "Your drawing";
  }
}

pad.addEventListener("pointerdown", (event) => {
  if (event.button !== 0 && event.pointerType === "mouse") return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  startInk();
  context.lineCap = "round";
  context.lineJoin = "round";
  context.lineWidth = STROKE_WIDTH;
  context.strokeStyle = "#111111";
  lastPoints.delete(event.pointerId);
  strokeTo(event.pointerId, padPoint(event)); // a dot, if the pointer never moves
  schedulePrediction();
});

pad.addEventListener("pointermove", (event) => {
  if (!lastPoints.has(event.pointerId)) return;
  event.preventDefault();
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const each of events.length ? events : [event]) strokeTo(event.pointerId, padPoint(each));
  schedulePrediction();
});

function endStroke(event) {
  if (!lastPoints.has(event.pointerId)) return;
  lastPoints.delete(event.pointerId);
  schedulePrediction(0);
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);
// touch-action: none keeps a finger from scrolling; consuming the touches too keeps the browser from reading the
// stroke as a swipe at all (a fling it starts makes it take the next tap, on Clear say, as the fling's stop).
for (const type of ["touchstart", "touchmove"]) pad.addEventListener(type, (event) => event.preventDefault(), {passive: false});

// ---- predictions --------------------------------------------------------------------------------------

function schedulePrediction(delay = PREDICT_INTERVAL_MS) {
  if (timer !== null && delay > 0) return; // one is already due: throttled, not postponed
  clearTimeout(timer);
  timer = setTimeout(() => { timer = null; predictDrawing(); updateBusy(); }, delay);
  updateBusy();
}

// aria-busy on the answer while a prediction is due or on its way: what is shown may be about to change.
function updateBusy() {
  $("answer").setAttribute("aria-busy", String(inFlight || pending || timer !== null));
}

function predictDrawing() {
  if (!hasInk) return;
  if (inFlight) { pending = true; return; }
  const asked = generation;
  inFlight = true;
  pad.toBlob((blob) => send(blob, "image/png", asked), "image/png");
}

async function send(body, contentType, asked) {
  inFlight = true;
  updateBusy();
  try {
    const response = await fetch("api/predict", {method: "POST", headers: {"Content-Type": contentType}, body});
    const answer = await response.json().catch(() => ({error: `the server answered ${response.status}`}));
    if (asked !== generation) return;
    if (response.ok) showResult(answer); else showError(answer.error || `the server answered ${response.status}`);
  } catch (error) {
    if (asked === generation) showError("The server cannot be reached. Is `vitscope serve` still running?");
  } finally {
    inFlight = false;
    if (pending) { pending = false; predictDrawing(); }
    updateBusy();
  }
}

function openFile(file) {
  if (!file) return;
  resetAll();
  generation += 1;
  $("source").textContent = `Image file: ${file.name}`;
  send(file, file.type || "application/octet-stream", generation);
}

// ---- showing the answer -------------------------------------------------------------------------------

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

function showResult(result) {
  lastResult = result;
  $("error").hidden = true;
  $("empty").hidden = true;
  $("prediction").hidden = false;
  $("label").textContent = String(result.label);
  $("confidence").textContent = percent(result.probs[result.label]);
  const bars = $("bars");
  bars.replaceChildren();
  const ranked = result.probs.map((p, digit) => [digit, p]).sort((a, b) => b[1] - a[1]).slice(0, TOP_CLASSES);
  for (const [digit, p] of ranked) {
    const item = document.createElement("li");
    item.setAttribute("aria-label", `${digit}: ${percent(p)}`);
    item.innerHTML = `<span class="digit">${digit}</span><span class="track"><span class="fill"></span></span>` +
                     `<span class="value">${percent(p)}</span>`;
    item.querySelector(".fill").style.width = `${Math.max(0, Math.min(100, 100 * p))}%`;
    bars.append(item);
  }
  for (const span of document.querySelectorAll(".reader")) span.textContent = result.reader;
  fillPickers(result.attention.length, result.attention[0].length);
  drawInput($("input"), result.input);
  drawMap($("rollout"), result.input, result.rollout);
  drawAttention();
  document.body.dataset.state = "predicted";
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("prediction").hidden = true;
  $("empty").hidden = true;
  blankMaps();
  document.body.dataset.state = "error";
}

function resetAll() {
  generation += 1;
  clearTimeout(timer);
  timer = null;
  pending = false;
  hasInk = false;
  lastResult = null;
  lastPoints.clear();
  clearPad();
  $("hint").hidden = false;
  $("source").textContent = "";
  $("prediction").hidden = true;
  $("error").hidden = true;
  $("empty").hidden = false;
  blankMaps();
  document.body.dataset.state = "empty";
  updateBusy();
}

function fillPickers(layers, heads) {
  const layer = $("layer");
  const head = $("head");
  if (layer.options.length !== layers) {
    layer.replaceChildren(...Array.from({length: layers}, (_, i) => new Option(String(i + 1), String(i))));
    layer.value = String(layers - 1); // the last layer: what the head reads
  }
  if (head.options.length !== heads + 1) {
    head.replaceChildren(new Option("mean", "mean"),
                         ...Array.from({length: heads}, (_, i) => new Option(String(i + 1), String(i))));
  }
}

function drawAttention() {
  if (!lastResult) return;
  const perHead = lastResult.attention[Number($("layer").value)]; // (H, grid, grid)
  const choice = $("head").value;
  const weights = choice === "mean"
    ? perHead[0].map((row, r) => row.map((_, c) => perHead.reduce((sum, h) => sum + h[r][c], 0) / perHead.length))
    : perHead[Number(choice)];
  drawMap($("attention"), lastResult.input, weights);
  const onPatches = weights.flat().reduce((a, b) => a + b, 0);
  $("attention-note").textContent = lastResult.reader === "class token"
    ? `${percent(onPatches)} on the patches, ${percent(Math.max(0, 1 - onPatches))} on itself`
    : "";
}

$("layer").addEventListener("change", drawAttention);
$("head").addEventListener("change", drawAttention);

function drawInput(canvas, input) {
  const size = input.length;
  canvas.width = size;
  canvas.height = size;
  const image = canvas.getContext("2d").createImageData(size, size);
  input.forEach((row, r) => row.forEach((value, c) => {
    const at = 4 * (r * size + c);
    image.data[at] = image.data[at + 1] = image.data[at + 2] = value;
    image.data[at + 3] = 255;
  }));
  canvas.getContext("2d").putImageData(image, 0, 0);
  canvas.dataset.drawn = "true";
}

// A perceptual dark-to-bright colour map (black, purple, red, orange, pale yellow), t in [0, 1].
const STOPS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
function heat(t) {
  const x = Math.max(0, Math.min(1, t)) * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(x));
  const f = x - i;
  return STOPS[i].map((v, k) => Math.round(v + f * (STOPS[i + 1][k] - v)));
}

// The weights over the patch grid as colour, each patch one block, with the digit drawn over it in white.
function drawMap(canvas, input, weights) {
  const side = canvas.width;
  const ctx = canvas.getContext("2d");
  const grid = weights.length;
  const cell = side / grid;
  const top = Math.max(...weights.flat(), 1e-12);
  for (let r = 0; r < grid; r++) {
    for (let c = 0; c < grid; c++) {
      const [red, green, blue] = heat(weights[r][c] / top);
      ctx.fillStyle = `rgb(${red}, ${green}, ${blue})`;
      ctx.fillRect(Math.floor(c * cell), Math.floor(r * cell), Math.ceil(cell), Math.ceil(cell));
    }
  }
  const size = input.length;
  const pixel = side / size;
  for (let r = 0; r < size; r++) {
    for (let c = 0; c < size; c++) {
      if (input[r][c] === 0) continue;
      ctx.fillStyle = `rgba(255, 255, 255, ${(input[r][c] / 255).toFixed(3)})`;
      ctx.fillRect(c * pixel, r * pixel, pixel, pixel);
    }
  }
  ctx.strokeStyle = "rgba(255, 255, 255, 0.18)";
  ctx.lineWidth = 1;
  for (let i = 1; i < grid; i++) {
    const at = Math.round(i * cell) + 0.5;
    ctx.beginPath(); ctx.moveTo(at, 0); ctx.lineTo(at, side); ctx.stroke();
    ctx.beginPath(); ctx.moveTo(0, at); ctx.lineTo(side, at); ctx.stroke();
  }
  canvas.dataset.drawn = "true";
}

function blankMaps() {
  for (const id of ["input", "rollout", "attention"]) {
    const canvas = $(id);
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    delete canvas.dataset.drawn;
  }
  $("attention-note").textContent = "";
}

// ---- files, buttons, keys -----------------------------------------------------------------------------

$("clear").addEventListener("click", resetAll);
$("open").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", (event) => { openFile(event.target.files[0]); event.target.value = ""; });

const dropZone = $("drop-zone");
for (const type of ["dragenter", "dragover"]) {
  dropZone.addEventListener(type, (event) => { event.preventDefault(); dropZone.classList.add("dragging"); });
}
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("dragging");
  openFile(event.dataTransfer.files[0]);
});
// A file dropped anywhere else would make the browser navigate away from the page.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && !(event.target instanceof HTMLSelectElement)) resetAll();
});

async function showRun() {
  try {
    const run = await (await fetch("api/model")).json();
    const model = run.model || {};
    const parts = [`<strong>${escapeHtml(run.name)}</strong>`];
    if (run.preset) parts.push(`${escapeHtml(run.preset)} preset`);
    if (typeof run.test_accuracy === "number") parts.push(`${(100 * run.test_accuracy).toFixed(2)}% MNIST test accuracy`);
    if (model.depth) {
      fillPickers(model.depth, model.heads);
      const grid = model.image_size / model.patch_size;
      parts.push(`${model.depth} layers × ${model.heads} heads, ${grid * grid} patches of ` +
                 `${model.patch_size}×${model.patch_size} px`);
    }
    $("run").innerHTML = parts.join(" · ");
  } catch (error) {
    $("run").textContent = "The server cannot be reached.";
  }
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (ch) => `&#${ch.charCodeAt(0)};`);
}

resetAll();
showRun();
