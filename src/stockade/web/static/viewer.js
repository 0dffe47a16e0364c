// The built-in zero-footprint viewer (/ui/viewer?study=UID[&series=UID]): series strip,
// viewports in 1x1, 1x2 or 2x2, tools, presets, cine and the attribute panel. Data comes from
// DICOMweb with the session cookie: QIDO-RS for the series, WADO-RS for metadata and frames.

import { call, problem, value } from "./api.js";
import { T } from "./pixels.js";
import { PRESETS, Viewport, autoWindow } from "./viewport.js";

const params = new URLSearchParams(window.location.search);
const study = params.get("study") || "";
const wanted = params.get("series") || "";
const message = document.getElementById("message");
const grid = document.getElementById("grid");
const strip = document.getElementById("strip");
const viewports = [];
const metadata = new Map(); // series UID -> promise of its instances' metadata
let seriesList = [];
let active = null;
let tool = "wl";
let cine = null;

const QIDO_SERIES = ["0008103E", "00200011", "00080060", "00201209"];
// Keywords of the attributes the panel names (others show their tag only).
const NAMES = Object.fromEntries(Object.entries(T).map(([k, v]) => [v, k]));
Object.assign(NAMES, {
  "00080016": "SOPClassUID",
  "00080050": "AccessionNumber",
  "00080070": "Manufacturer",
  "00080090": "ReferringPhysicianName",
  "00081090": "ManufacturerModelName",
  "00180015": "BodyPartExamined",
  "00180060": "KVP",
  "00200010": "StudyID",
  "00200037": "ImageOrientationPatient",
  "00200052": "FrameOfReferenceUID",
  "00280006": "PlanarConfiguration",
  "00280102": "HighBit",
  "7FE00010": "PixelData",
});

function say(text) {
  message.textContent = text;
}

async function json(path) {
  const response = await call(path, { headers: { Accept: "application/dicom+json" } });
  if (response.status === 204) return [];
  if (!response.ok) throw new Error(await problem(response));
  return response.json();
}

function instancesOf(series) {
  if (!metadata.has(series)) {
    const path = `/dicomweb/studies/${encodeURIComponent(study)}/series/${encodeURIComponent(series)}/metadata`;
    const promise = json(path);
    promise.catch(() => metadata.delete(series));
    metadata.set(series, promise);
  }
  return metadata.get(series);
}

// -- viewports ------------------------------------------------------------------------------

function activate(viewport) {
  if (active === viewport) return;
  if (active) active.root.classList.remove("active");
  active = viewport;
  viewport.root.classList.add("active");
  for (const button of strip.querySelectorAll("button")) {
    button.classList.toggle("active", button.dataset.series === viewport.series);
  }
  refreshSide();
}

function addViewport() {
  const viewport = new Viewport(grid, activate);
  viewport.tool = tool;
  viewport.onChange = (v) => {
    if (v === active) refreshMeasurements();
    if (!document.body.dataset.firstImageMs && v.cache.get(v.index)?.frame) {
      performance.mark("stockade-first-image");
      document.body.dataset.firstImageMs = String(Math.round(performance.now()));
    }
  };
  viewports.push(viewport);
  return viewport;
}

// The first instance of a series (lowest Instance Number, from the index by QIDO-RS) and its
// own metadata: enough to show the first image before the whole series' metadata is here.
async function firstInstance(series) {
  const base = `/dicomweb/studies/${encodeURIComponent(study)}/series/${encodeURIComponent(series)}`;
  const found = await json(`${base}/instances?includefield=00200013&limit=5000`);
  if (!found.length) return null;
  const number = (item) => Number(value(item, T.InstanceNumber) || 0);
  found.sort((a, b) => number(a) - number(b) || value(a, T.SOPInstanceUID).localeCompare(value(b, T.SOPInstanceUID)));
  const sop = encodeURIComponent(value(found[0], T.SOPInstanceUID));
  const [item] = await json(`${base}/instances/${sop}/metadata`);
  return item || null;
}

async function open(viewport, series) {
  try {
    viewport.status.textContent = "loading";
    viewport.wanted = series;
    const whole = instancesOf(series);
    let done = false;
    firstInstance(series)
      .then((item) => {
        if (!done && item && viewport.wanted === series) viewport.load(study, series, [item], true);
      })
      .catch(() => {}); // the whole series' metadata still comes
    const instances = await whole;
    done = true;
    if (viewport.wanted !== series) return; // another series was asked for meanwhile
    viewport.load(study, series, instances);
    if (viewport === active) activate(viewport);
    for (const button of strip.querySelectorAll("button")) {
      button.classList.toggle("active", active && button.dataset.series === active.series);
    }
    document.getElementById("fps").value = String(Math.round(viewport.fps()));
    refreshSide();
  } catch (error) {
    viewport.status.textContent = `cannot open the series: ${error.message}`;
  }
}

function setLayout(layout) {
  const [rows, columns] = layout.split("x").map(Number);
  const count = rows * columns;
  grid.className = `layout-${layout}`;
  while (viewports.length > count) viewports.pop().destroy();
  while (viewports.length < count) {
    const viewport = addViewport();
    const used = new Set(viewports.map((v) => v.series));
    const next = seriesList.find((s) => !used.has(s)) || seriesList[0];
    if (next) open(viewport, next);
  }
  if (!viewports.includes(active)) {
    active = null;
    activate(viewports[0]);
  }
  for (const v of viewports) v.draw();
}

// -- the series strip -----------------------------------------------------------------------

async function loadStrip() {
  const query = new URLSearchParams();
  for (const tag of QIDO_SERIES) query.append("includefield", tag);
  const found = await json(`/dicomweb/studies/${encodeURIComponent(study)}/series?${query}`);
  found.sort((a, b) => Number(value(a, T.SeriesNumber) || 0) - Number(value(b, T.SeriesNumber) || 0));
  seriesList = found.map((s) => value(s, T.SeriesInstanceUID));
  strip.replaceChildren();
  for (const s of found) {
    const uid = value(s, T.SeriesInstanceUID);
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.series = uid;
    const image = document.createElement("img");
    image.alt = "";
    image.loading = "lazy";
    image.src = `/dicomweb/studies/${encodeURIComponent(study)}/series/${encodeURIComponent(uid)}/thumbnail`;
    const caption = document.createElement("span");
    caption.textContent = [value(s, T.Modality), value(s, T.SeriesNumber), value(s, T.SeriesDescription)]
      .filter(Boolean)
      .join(" ");
    const count = document.createElement("span");
    count.textContent = `${value(s, "00201209")} images`;
    button.append(image, caption, count);
    button.addEventListener("click", () => open(active, uid));
    strip.append(button);
  }
  return found;
}

// -- side panel ------------------------------------------------------------------------------

function refreshMeasurements() {
  const list = document.getElementById("measurements");
  const labels = active ? active.labels() : [];
  list.replaceChildren(
    ...labels.map((label) => {
      const item = document.createElement("li");
      item.textContent = label;
      return item;
    }),
  );
}

function shown(element) {
  if (!element) return "";
  if (element.InlineBinary !== undefined || element.BulkDataURI !== undefined) return "(bulk data)";
  const values = element.Value || [];
  return values
    .map((v) => {
      if (v && typeof v === "object") return [v.Alphabetic, v.Ideographic, v.Phonetic].filter((x) => x !== undefined).join("=");
      return String(v);
    })
    .join("\\");
}

function attributeRows(item, depth, filter, out) {
  for (const tag of Object.keys(item).sort()) {
    if (out.length > 5000) return;
    const element = item[tag];
    const name = NAMES[tag] || "";
    const sequence = element.vr === "SQ";
    const text = sequence ? `${(element.Value || []).length} item(s)` : shown(element);
    const match = !filter || `${tag} ${name} ${text}`.toLowerCase().includes(filter);
    if (match || sequence) {
      const row = document.createElement("tr");
      if (depth) row.className = "nested";
      const cells = [`${"> ".repeat(depth)}(${tag.slice(0, 4)},${tag.slice(4)})`, name, element.vr || "", text];
      cells.forEach((content, i) => {
        const cell = document.createElement("td");
        if (i === 0) cell.className = "tag";
        cell.textContent = content.length > 256 ? `${content.slice(0, 256)}…` : content;
        row.append(cell);
      });
      out.push(row);
    }
    if (sequence && depth < 8) for (const child of element.Value || []) attributeRows(child, depth + 1, filter, out);
  }
}

function refreshAttributes() {
  const panel = document.getElementById("attributes");
  if (panel.hidden) return;
  const rows = [];
  const item = active && active.attributes();
  if (item) attributeRows(item, 0, document.getElementById("filter").value.trim().toLowerCase(), rows);
  document.getElementById("attribute-rows").replaceChildren(...rows);
}

function refreshSide() {
  refreshMeasurements();
  refreshAttributes();
  const item = active && active.attributes();
  if (item) {
    document.getElementById("patient").textContent = [value(item, T.PatientName), value(item, T.PatientID), value(item, T.StudyDate)]
      .filter(Boolean)
      .join("  ");
  }
}

// -- tools and keys --------------------------------------------------------------------------

function setTool(name) {
  tool = name;
  for (const button of document.querySelectorAll("[data-tool]")) button.classList.toggle("on", button.dataset.tool === name);
  for (const v of viewports) {
    v.tool = name;
    v.pending = null;
  }
}

function currentFrame() {
  return active && active.cache.get(active.index)?.frame;
}

function applyPreset(name) {
  if (!active) return;
  const frame = currentFrame();
  if (name === "auto") {
    if (frame && frame.values) active.window = autoWindow(frame);
  } else if (PRESETS[name]) {
    active.window = { ...PRESETS[name] };
  } else {
    active.window = null;
  }
  active.draw();
}

function play() {
  const button = document.getElementById("play");
  if (cine) {
    cancelAnimationFrame(cine.request);
    cine = null;
    button.textContent = "Play";
    button.setAttribute("aria-pressed", "false");
    return;
  }
  button.textContent = "Stop";
  button.setAttribute("aria-pressed", "true");
  cine = { viewport: active, last: performance.now(), request: 0 };
  const step = (now) => {
    if (!cine) return;
    const fps = Math.min(60, Math.max(1, Number(document.getElementById("fps").value) || 10));
    const v = cine.viewport;
    // Advance only once the next frame is here: cine never shows a blank.
    const next = (v.index + 1) % v.stack.length;
    if (now - cine.last >= 1000 / fps && v.cache.get(next)?.frame) {
      cine.last = now;
      v.show(next);
    } else if (!v.cache.get(next)) {
      v.fetch(next);
    }
    cine.request = requestAnimationFrame(step);
  };
  cine.request = requestAnimationFrame(step);
}

const KEYS = { w: "wl", p: "pan", z: "zoom", s: "scroll", l: "length", a: "angle", r: "rect", e: "ellipse" };

document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement || !active) return;
  const page = Math.max(1, Math.round(active.stack.length / 10));
  const moves = { ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1, PageDown: page, PageUp: -page };
  if (event.key in moves) {
    active.scroll(moves[event.key]);
  } else if (event.key === "Home") {
    active.reset();
  } else if (event.key === "End") {
    active.show(active.stack.length - 1);
  } else if (event.key === " ") {
    play();
  } else if (event.key === "i") {
    active.invert = !active.invert;
    active.draw();
  } else if (event.key === "f") {
    active.view = null;
    active.draw();
  } else if (event.key in KEYS) {
    setTool(KEYS[event.key]);
  } else if (event.key === "Escape") {
    active.pending = null;
  } else {
    return;
  }
  event.preventDefault();
});

for (const button of document.querySelectorAll("[data-tool]")) button.addEventListener("click", () => setTool(button.dataset.tool));
document.getElementById("preset").addEventListener("change", (e) => applyPreset(e.target.value));
document.getElementById("fit").addEventListener("click", () => {
  if (!active) return;
  active.view = null;
  active.draw();
});
document.getElementById("reset").addEventListener("click", () => {
  if (!active) return;
  document.getElementById("preset").value = "";
  active.reset();
});
document.getElementById("invert").addEventListener("click", () => {
  if (!active) return;
  active.invert = !active.invert;
  active.draw();
});
document.getElementById("clear").addEventListener("click", () => active && active.clearMeasurements());
document.getElementById("play").addEventListener("click", play);
document.getElementById("layout").addEventListener("change", (e) => setLayout(e.target.value));
document.getElementById("tags").addEventListener("click", (e) => {
  const panel = document.getElementById("attributes");
  panel.hidden = !panel.hidden;
  e.target.setAttribute("aria-pressed", String(!panel.hidden));
  refreshAttributes();
});
document.getElementById("filter").addEventListener("input", refreshAttributes);

// -- start ----------------------------------------------------------------------------------

async function start() {
  if (!study) {
    say("no study given (open the viewer from a study)");
    return;
  }
  document.getElementById("back").href = `/ui/study?study=${encodeURIComponent(study)}`;
  const first = addViewport();
  activate(first);
  // The wanted series first: its metadata and the strip load side by side.
  if (wanted) instancesOf(wanted);
  try {
    const found = await loadStrip();
    if (!found.length) {
      say("this study has no series you may see");
      return;
    }
  } catch (error) {
    say(`cannot load the study: ${error.message}`);
    return;
  }
  await open(first, wanted && seriesList.includes(wanted) ? wanted : seriesList[0]);
}

start();
