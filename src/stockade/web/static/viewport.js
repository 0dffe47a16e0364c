// One viewport of the built-in viewer: a stack of frames (the frames of a series), shown on a
// canvas with window/level, zoom, pan, inversion, measurements and the corner overlay. Mouse,
// pen and touch go through the same pointer events. DICOM text goes in as textContent only.

import { value } from "./api.js";
import {
  T,
  defaultWindow,
  describe,
  fetchFrame,
  fetchRendered,
  first,
  number,
  paint,
  regionStatistics,
} from "./pixels.js";

const MAX_CACHE_BYTES = 768 * 1024 * 1024;
const IN_FLIGHT = 4;

// Frames in flight across all viewports, nearest to what is shown first.
class Loader {
  constructor() {
    this.running = 0;
    this.queue = [];
  }

  request(job) {
    this.queue.push(job);
    this.pump();
  }

  drop(owner) {
    this.queue = this.queue.filter((job) => job.owner !== owner);
  }

  pump() {
    while (this.running < IN_FLIGHT && this.queue.length) {
      this.queue.sort((a, b) => a.priority() - b.priority());
      const job = this.queue.shift();
      this.running++;
      job.run().finally(() => {
        this.running--;
        this.pump();
      });
    }
  }
}

export const loader = new Loader();

// Window presets (center, width) for CT, in HU; "auto" is computed from the frame.
export const PRESETS = {
  "CT soft tissue": { center: 40, width: 400 },
  "CT lung": { center: -600, width: 1500 },
  "CT bone": { center: 400, width: 1800 },
  "CT brain": { center: 40, width: 80 },
};

// A window from the 1st to the 99th percentile of the frame's modality values (MR auto).
export function autoWindow(frame) {
  const values = frame.values;
  const d = frame.d;
  const counts = new Map();
  for (let i = 0; i < values.length; i++) counts.set(values[i], (counts.get(values[i]) || 0) + 1);
  const keys = [...counts.keys()].sort((a, b) => a - b);
  const low = values.length * 0.01;
  const high = values.length * 0.99;
  let seen = 0;
  let lo = keys[0];
  let hi = keys[keys.length - 1];
  let foundLow = false;
  for (const k of keys) {
    seen += counts.get(k);
    if (!foundLow && seen >= low) {
      lo = k;
      foundLow = true;
    }
    if (seen >= high) {
      hi = k;
      break;
    }
  }
  const a = lo * d.slope + d.intercept;
  const b = hi * d.slope + d.intercept;
  return { center: (a + b) / 2, width: Math.max(1, Math.abs(b - a)) };
}

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

function fmt(n, digits = 1) {
  return Number.isFinite(n) ? n.toFixed(digits) : "-";
}

export class Viewport {
  constructor(parent, onActivate) {
    this.root = el("div", "viewport");
    this.canvas = el("canvas");
    this.corners = {};
    for (const corner of ["tl", "tr", "bl", "br"]) {
      this.corners[corner] = el("div", `corner ${corner}`);
      this.root.append(this.corners[corner]);
    }
    this.scrollbar = el("input", "scrollbar");
    this.scrollbar.type = "range";
    this.scrollbar.min = "0";
    this.scrollbar.step = "1";
    this.scrollbar.setAttribute("aria-label", "Image");
    this.status = el("div", "status");
    this.root.prepend(this.canvas);
    this.root.append(this.scrollbar, this.status);
    parent.append(this.root);
    this.ctx = this.canvas.getContext("2d");
    this.offscreen = document.createElement("canvas");
    this.offctx = this.offscreen.getContext("2d");
    this.onActivate = onActivate;
    this.tool = "wl";
    this.stack = [];
    this.cache = new Map();
    this.measurements = new Map();
    this.pointers = new Map();
    this.index = 0;
    this.window = null;
    this.invert = false;
    this.view = null; // { scale, tx, ty } in device pixels; null: fit
    this.onChange = () => {};
    this.listen();
    new ResizeObserver(() => this.draw()).observe(this.root);
  }

  // -- the stack ----------------------------------------------------------------------------

  // Show a series: its instances' metadata (WADO-RS), in Instance Number order.
  // preview: a stack of the first instance only, shown while the series' metadata loads;
  // the next load() of the same series keeps its frame, window and view.
  load(study, series, instances, preview = false) {
    loader.drop(this);
    // Frames already here for the same series (e.g. from a preview of its first instance).
    const kept = new Map();
    const upgrade = this.preview && this.series === series && this.study === study;
    if (upgrade) {
      for (const [i, record] of this.cache) if (record.started) kept.set(this.stack[i].url, record); // here or coming
    }
    this.preview = preview;
    const sorted = [...instances].sort(
      (a, b) =>
        number(a, T.InstanceNumber, 0) - number(b, T.InstanceNumber, 0) ||
        String(first(a, T.SOPInstanceUID, "")).localeCompare(String(first(b, T.SOPInstanceUID, ""))),
    );
    this.stack = [];
    for (const item of sorted) {
      if (!number(item, T.Rows, 0)) continue; // no image (e.g. a report in the series)
      const frames = Math.max(1, number(item, T.NumberOfFrames, 1));
      const sop = encodeURIComponent(String(first(item, T.SOPInstanceUID, "")));
      const base = `/dicomweb/studies/${encodeURIComponent(study)}/series/${encodeURIComponent(series)}/instances/${sop}`;
      for (let f = 0; f < frames; f++) {
        this.stack.push({ item, frame: f, frames, url: `${base}/frames/${f + 1}`, d: describe(item, f) });
      }
    }
    this.study = study;
    this.series = series;
    this.cache = new Map();
    this.loadedCount = 0;
    this.stack.forEach((entry, i) => {
      const record = kept.get(entry.url);
      if (record) {
        this.cache.set(i, record);
        if (record.frame) this.loadedCount++;
      }
    });
    this.measurements = new Map();
    this.index = 0;
    if (!upgrade) {
      this.window = null;
      this.invert = false;
      this.view = null;
    }
    this.scrollbar.max = String(Math.max(0, this.stack.length - 1));
    this.scrollbar.value = "0";
    this.root.dataset.series = series;
    this.root.dataset.count = String(this.stack.length);
    this.status.textContent = this.stack.length ? "" : "no image in this series";
    this.root.dataset.preview = String(preview);
    if (this.stack.length) {
      this.show(0);
      if (!preview) this.prefetch();
    } else {
      this.draw();
    }
  }

  get entry() {
    return this.stack[this.index];
  }

  frameBytes() {
    const d = this.stack[0].d;
    return d.rows * d.columns * Math.max(1, d.bitsAllocated / 8) * (d.grayscale ? 1 : 4);
  }

  fetch(index) {
    const known = this.cache.get(index);
    if (known) return known.promise;
    const entry = this.stack[index];
    const job = { owner: this, priority: () => Math.abs(index - this.index) };
    const promise = new Promise((resolve, reject) => {
      job.run = () => {
        record.started = true;
        const got = entry.d.grayscale ? fetchFrame(entry.url, entry.d) : fetchRendered(entry.url);
        return got.then(
          (frame) => {
            record.frame = frame;
            resolve(frame);
            if (!this.holds(record)) return; // another series was opened meanwhile
            this.loadedCount++;
            this.root.dataset.loaded = String(this.loadedCount);
            if (this.cache.get(this.index) === record) this.draw();
          },
          (error) => {
            for (const [i, r] of this.cache) if (r === record) this.cache.delete(i);
            reject(error);
          },
        );
      };
    });
    const record = { promise, frame: null, started: false };
    promise.catch(() => {});
    this.cache.set(index, record);
    loader.request(job);
    this.evict();
    return promise;
  }

  holds(record) {
    for (const r of this.cache.values()) if (r === record) return true;
    return false;
  }

  evict() {
    const limit = Math.max(16, Math.floor(MAX_CACHE_BYTES / this.frameBytes()));
    if (this.cache.size <= limit) return;
    const far = [...this.cache.keys()].sort((a, b) => Math.abs(b - this.index) - Math.abs(a - this.index));
    for (const key of far.slice(0, this.cache.size - limit)) if (this.cache.get(key).frame) this.cache.delete(key);
  }

  // Fetch every frame of the stack, nearest to the shown one first.
  prefetch() {
    const limit = Math.max(16, Math.floor(MAX_CACHE_BYTES / this.frameBytes()));
    const order = [...this.stack.keys()].sort((a, b) => Math.abs(a - this.index) - Math.abs(b - this.index));
    for (const i of order.slice(0, limit)) this.fetch(i);
  }

  loaded() {
    let n = 0;
    for (const r of this.cache.values()) if (r.frame) n++;
    return n;
  }

  async show(index) {
    if (!this.stack.length) return;
    this.index = Math.max(0, Math.min(this.stack.length - 1, index));
    this.scrollbar.value = String(this.index);
    this.draw();
    try {
      await this.fetch(this.index);
      this.status.textContent = "";
    } catch (error) {
      this.status.textContent = `cannot show this image: ${error.message}`;
    }
    if (this.cache.size < this.stack.length) this.prefetch();
  }

  scroll(step) {
    this.show(this.index + step);
  }

  // -- geometry -----------------------------------------------------------------------------

  fit() {
    const d = this.entry.d;
    const w = this.canvas.width;
    const h = this.canvas.height;
    const scale = Math.min(w / d.columns, h / d.rows);
    return { scale, tx: (w - d.columns * scale) / 2, ty: (h - d.rows * scale) / 2 };
  }

  geometry() {
    return this.view || this.fit();
  }

  // Image coordinates (pixels, 0 at the top left corner of the first pixel) of a pointer event.
  imagePoint(event) {
    const box = this.canvas.getBoundingClientRect();
    const ratio = this.canvas.width / Math.max(1, box.width);
    const g = this.geometry();
    return {
      x: ((event.clientX - box.left) * ratio - g.tx) / g.scale,
      y: ((event.clientY - box.top) * ratio - g.ty) / g.scale,
    };
  }

  zoomAt(factor, cx, cy) {
    const g = this.geometry();
    const scale = Math.min(64, Math.max(0.05, g.scale * factor));
    const f = scale / g.scale;
    this.view = { scale, tx: cx - (cx - g.tx) * f, ty: cy - (cy - g.ty) * f };
    this.draw();
  }

  reset() {
    this.view = null;
    this.window = null;
    this.invert = false;
    this.draw();
  }

  // -- drawing ------------------------------------------------------------------------------

  currentWindow(frame) {
    if (!this.window) this.window = defaultWindow(frame);
    return this.window;
  }

  draw() {
    const box = this.root.getBoundingClientRect();
    const ratio = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(box.width * ratio));
    const h = Math.max(1, Math.round(box.height * ratio));
    if (this.canvas.width !== w || this.canvas.height !== h) {
      this.canvas.width = w;
      this.canvas.height = h;
    }
    const ctx = this.ctx;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, w, h);
    const entry = this.entry;
    const record = entry && this.cache.get(this.index);
    const frame = record && record.frame;
    this.overlay(entry, frame);
    if (!frame) return;
    const d = entry.d;
    if (d.grayscale) {
      if (this.offscreen.width !== d.columns || this.offscreen.height !== d.rows) {
        this.offscreen.width = d.columns;
        this.offscreen.height = d.rows;
        this.image = null;
      }
      if (!this.image) this.image = this.offctx.createImageData(d.columns, d.rows);
      paint(frame, this.currentWindow(frame), this.invert, this.image);
      this.offctx.putImageData(this.image, 0, 0);
    }
    const g = this.geometry();
    ctx.imageSmoothingEnabled = g.scale < 3;
    ctx.setTransform(g.scale, 0, 0, g.scale, g.tx, g.ty);
    if (d.grayscale) {
      ctx.drawImage(this.offscreen, 0, 0);
    } else {
      if (this.invert) ctx.filter = "invert(1)";
      ctx.drawImage(frame, 0, 0, d.columns, d.rows);
      ctx.filter = "none";
    }
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    this.drawMeasurements(g);
    const ratioCss = this.canvas.width / Math.max(1, box.width);
    Object.assign(this.root.dataset, {
      index: String(this.index),
      instanceNumber: String(number(entry.item, T.InstanceNumber, "")),
      scale: String(g.scale / ratioCss),
      originX: String(g.tx / ratioCss),
      originY: String(g.ty / ratioCss),
      windowCenter: this.window ? String(this.window.center) : "",
      windowWidth: this.window ? String(this.window.width) : "",
      invert: String(this.invert),
      drawn: String(Number(this.root.dataset.drawn || 0) + 1),
    });
    this.onChange(this);
  }

  overlay(entry, frame) {
    const c = this.corners;
    if (!entry) {
      for (const node of Object.values(c)) node.replaceChildren();
      return;
    }
    const item = entry.item;
    const lines = (node, texts) => node.replaceChildren(...texts.filter(Boolean).map((t) => {
      const line = el("div");
      line.textContent = t;
      return line;
    }));
    lines(c.tl, [
      value(item, T.PatientName),
      value(item, T.PatientID),
      [value(item, T.PatientBirthDate), value(item, T.PatientSex)].filter(Boolean).join(" "),
    ]);
    lines(c.tr, [
      value(item, T.StudyDescription),
      value(item, T.StudyDate),
      [value(item, T.SeriesNumber) && `Se ${value(item, T.SeriesNumber)}`, value(item, T.SeriesDescription)]
        .filter(Boolean)
        .join(" "),
    ]);
    const n = number(item, T.InstanceNumber, "");
    const frameText = entry.frames > 1 ? ` fr ${entry.frame + 1}/${entry.frames}` : "";
    const location = first(item, T.SliceLocation);
    lines(c.bl, [
      `Im ${n}${frameText} (${this.index + 1}/${this.stack.length})`,
      location !== undefined ? `Loc ${fmt(Number(location))} mm` : "",
      first(item, T.SliceThickness) !== undefined ? `Thick ${fmt(Number(first(item, T.SliceThickness)))} mm` : "",
    ]);
    const g = this.canvas.width > 1 && entry ? this.geometry() : null;
    const d = entry.d;
    const spacing = d.spacingKind === "none" ? "no Pixel Spacing" : d.spacingKind === "detector" ? "spacing at detector" : "";
    lines(c.br, [
      d.grayscale && this.window ? `W ${fmt(this.window.width, 0)} L ${fmt(this.window.center, 0)}` : d.grayscale ? "" : d.photometric,
      g ? `Zoom ${fmt(g.scale / (window.devicePixelRatio || 1), 2)}` : "",
      this.invert ? "inverted" : "",
      spacing,
      frame ? "" : "loading",
    ]);
    this.root.dataset.loading = String(!frame);
  }

  // -- measurements -------------------------------------------------------------------------

  list() {
    if (!this.measurements.has(this.index)) this.measurements.set(this.index, []);
    return this.measurements.get(this.index);
  }

  // Length in mm (or pixels without spacing) between two image points (PS3.3 C.7.6.2.1.1:
  // Pixel Spacing is row spacing, then column spacing).
  distance(a, b) {
    const s = this.entry.d.spacingMm;
    const dx = (b.x - a.x) * (s ? s[1] : 1);
    const dy = (b.y - a.y) * (s ? s[0] : 1);
    return Math.hypot(dx, dy);
  }

  unit() {
    return this.entry.d.spacingMm ? "mm" : "px";
  }

  result(m) {
    const d = this.entry.d;
    const flag = d.spacingKind === "none" ? " (no Pixel Spacing)" : d.spacingKind === "detector" ? " (at detector)" : "";
    if (m.type === "length") {
      m.value = this.distance(m.points[0], m.points[1]);
      return `Length ${fmt(m.value, 1)} ${this.unit()}${flag}`;
    }
    if (m.type === "angle") {
      if (m.points.length < 3) return "Angle: click the third point";
      const [a, b, c] = m.points;
      const s = d.spacingMm || [1, 1];
      const v1 = { x: (a.x - b.x) * s[1], y: (a.y - b.y) * s[0] };
      const v2 = { x: (c.x - b.x) * s[1], y: (c.y - b.y) * s[0] };
      const cos = (v1.x * v2.x + v1.y * v2.y) / (Math.hypot(v1.x, v1.y) * Math.hypot(v2.x, v2.y));
      m.value = (Math.acos(Math.max(-1, Math.min(1, cos))) * 180) / Math.PI;
      return `Angle ${fmt(m.value, 1)}°`;
    }
    const [p, q] = m.points;
    const box = { x0: Math.min(p.x, q.x), y0: Math.min(p.y, q.y), x1: Math.max(p.x, q.x), y1: Math.max(p.y, q.y) };
    const s = d.spacingMm || [1, 1];
    const width = (box.x1 - box.x0) * s[1];
    const height = (box.y1 - box.y0) * s[0];
    const ellipse = m.type === "ellipse";
    const area = ellipse ? (Math.PI * width * height) / 4 : width * height;
    const frame = this.cache.get(this.index)?.frame;
    let stats = "";
    if (frame && d.grayscale) {
      const cx = (box.x0 + box.x1) / 2;
      const cy = (box.y0 + box.y1) / 2;
      const rx = (box.x1 - box.x0) / 2;
      const ry = (box.y1 - box.y0) / 2;
      const inside = ellipse
        ? (x, y) => rx > 0 && ry > 0 && ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
        : (x, y) => x >= box.x0 && x <= box.x1 && y >= box.y0 && y <= box.y1;
      const r = regionStatistics(frame, box, inside);
      const hu = d.rescaleType === "HU" || value(this.entry.item, T.Modality) === "CT" ? " HU" : "";
      m.stats = r;
      stats = ` mean ${fmt(r.mean, 1)}${hu} SD ${fmt(r.sd, 1)}${hu} (${r.count} px)`;
    }
    m.value = area;
    const unit = d.spacingMm ? "mm²" : "px²";
    return `${ellipse ? "Ellipse" : "Rectangle"} area ${fmt(area, 1)} ${unit}${flag}${stats}`;
  }

  drawMeasurements(g) {
    const ctx = this.ctx;
    const ratio = window.devicePixelRatio || 1;
    const at = (p) => ({ x: p.x * g.scale + g.tx, y: p.y * g.scale + g.ty });
    ctx.lineWidth = 1.5 * ratio;
    ctx.font = `${12 * ratio}px system-ui, sans-serif`;
    for (const m of this.measurements.get(this.index) || []) {
      ctx.strokeStyle = "#ffd400";
      ctx.fillStyle = "#ffd400";
      const pts = m.points.map(at);
      ctx.beginPath();
      if (m.type === "length" || m.type === "angle") {
        ctx.moveTo(pts[0].x, pts[0].y);
        for (const p of pts.slice(1)) ctx.lineTo(p.x, p.y);
      } else if (m.type === "rect") {
        ctx.rect(pts[0].x, pts[0].y, pts[1].x - pts[0].x, pts[1].y - pts[0].y);
      } else {
        ctx.ellipse(
          (pts[0].x + pts[1].x) / 2,
          (pts[0].y + pts[1].y) / 2,
          Math.abs(pts[1].x - pts[0].x) / 2,
          Math.abs(pts[1].y - pts[0].y) / 2,
          0,
          0,
          2 * Math.PI,
        );
      }
      ctx.stroke();
      const last = pts[pts.length - 1];
      ctx.fillText(m.label || "", last.x + 6 * ratio, last.y - 6 * ratio);
    }
  }

  // -- input --------------------------------------------------------------------------------

  listen() {
    const c = this.canvas;
    c.addEventListener("contextmenu", (e) => e.preventDefault());
    c.addEventListener("pointerdown", (e) => this.down(e));
    c.addEventListener("pointermove", (e) => this.move(e));
    c.addEventListener("pointerup", (e) => this.up(e));
    c.addEventListener("pointercancel", (e) => this.up(e));
    c.addEventListener("wheel", (e) => {
      e.preventDefault();
      this.onActivate(this);
      if (e.ctrlKey) {
        const box = c.getBoundingClientRect();
        const ratio = c.width / Math.max(1, box.width);
        this.zoomAt(e.deltaY < 0 ? 1.1 : 1 / 1.1, (e.clientX - box.left) * ratio, (e.clientY - box.top) * ratio);
      } else {
        this.scroll(Math.sign(e.deltaY) || 0);
      }
    }, { passive: false });
    this.scrollbar.addEventListener("input", () => this.show(Number(this.scrollbar.value)));
  }

  down(e) {
    if (!this.stack.length) return;
    this.onActivate(this);
    this.canvas.setPointerCapture(e.pointerId);
    this.pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
    if (this.pointers.size === 2) {
      this.gesture = { kind: "pinch", ...this.pinchState() };
      return;
    }
    let kind = this.tool;
    if (e.button === 1 || (e.button === 0 && (e.ctrlKey || e.metaKey))) kind = "pan";
    else if (e.button === 2) kind = "zoom";
    const start = { x: e.clientX, y: e.clientY, window: this.window && { ...this.window }, view: this.geometry(), index: this.index };
    const p = this.imagePoint(e);
    if (this.pending && kind === "angle") {
      this.pending.points[2] = p;
      this.gesture = { kind: "angle-third", start, m: this.pending };
      return;
    }
    this.pending = null;
    if (["length", "angle", "rect", "ellipse"].includes(kind)) {
      const m = { type: kind, points: [p, { ...p }] };
      this.list().push(m);
      this.gesture = { kind: "measure", start, m };
      return;
    }
    this.gesture = { kind, start };
  }

  pinchState() {
    const [a, b] = [...this.pointers.values()];
    return { distance: Math.hypot(a.x - b.x, a.y - b.y), mid: { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 }, view: this.geometry() };
  }

  move(e) {
    if (!this.pointers.has(e.pointerId) || !this.gesture) return;
    this.pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
    const g = this.gesture;
    const ratio = this.canvas.width / Math.max(1, this.canvas.getBoundingClientRect().width);
    if (g.kind === "pinch") {
      if (this.pointers.size < 2) return;
      const now = this.pinchState();
      const f = now.distance / Math.max(1, g.distance);
      const box = this.canvas.getBoundingClientRect();
      const cx = (g.mid.x - box.left) * ratio;
      const cy = (g.mid.y - box.top) * ratio;
      const scale = Math.min(64, Math.max(0.05, g.view.scale * f));
      const k = scale / g.view.scale;
      this.view = {
        scale,
        tx: cx - (cx - g.view.tx) * k + (now.mid.x - g.mid.x) * ratio,
        ty: cy - (cy - g.view.ty) * k + (now.mid.y - g.mid.y) * ratio,
      };
      this.draw();
      return;
    }
    const dx = e.clientX - g.start.x;
    const dy = e.clientY - g.start.y;
    if (g.kind === "wl" && g.start.window) {
      // Horizontal: width; vertical: level. One screen pixel moves by 1/256 of the width.
      const step = Math.max(1, g.start.window.width) / 256;
      this.window = {
        center: g.start.window.center - dy * step,
        width: Math.max(1, g.start.window.width + dx * step),
      };
      this.draw();
    } else if (g.kind === "pan") {
      this.view = { ...g.start.view, tx: g.start.view.tx + dx * ratio, ty: g.start.view.ty + dy * ratio };
      this.draw();
    } else if (g.kind === "zoom") {
      const box = this.canvas.getBoundingClientRect();
      const f = Math.exp(-dy / 150);
      const cx = (g.start.x - box.left) * ratio;
      const cy = (g.start.y - box.top) * ratio;
      const v = g.start.view;
      const scale = Math.min(64, Math.max(0.05, v.scale * f));
      const k = scale / v.scale;
      this.view = { scale, tx: cx - (cx - v.tx) * k, ty: cy - (cy - v.ty) * k };
      this.draw();
    } else if (g.kind === "scroll") {
      this.show(g.start.index + Math.round(dy / 8));
    } else if (g.kind === "measure") {
      g.m.points[1] = this.imagePoint(e);
      g.m.label = this.result(g.m);
      this.draw();
    } else if (g.kind === "angle-third") {
      g.m.points[2] = this.imagePoint(e);
      g.m.label = this.result(g.m);
      this.draw();
    }
  }

  up(e) {
    this.pointers.delete(e.pointerId);
    const g = this.gesture;
    if (this.pointers.size > 0) {
      if (g && g.kind === "pinch") this.gesture = null;
      return;
    }
    this.gesture = null;
    if (!g) return;
    if (g.kind === "measure") {
      const m = g.m;
      m.points[1] = this.imagePoint(e);
      if (this.distance(m.points[0], m.points[1]) === 0 && m.type !== "angle") {
        this.list().splice(this.list().indexOf(m), 1);
      } else if (m.type === "angle") {
        this.pending = m;
      }
      m.label = this.result(m);
      this.draw();
    } else if (g.kind === "angle-third") {
      g.m.points[2] = this.imagePoint(e);
      g.m.label = this.result(g.m);
      this.pending = null;
      this.draw();
    }
  }

  clearMeasurements() {
    this.measurements.set(this.index, []);
    this.pending = null;
    this.draw();
  }

  labels() {
    return (this.measurements.get(this.index) || []).map((m) => m.label || this.result(m));
  }

  attributes() {
    return this.entry ? this.entry.item : null;
  }

  fps() {
    const item = this.entry && this.entry.item;
    if (!item) return 10;
    const rate = number(item, T.RecommendedDisplayFrameRate, 0) || number(item, T.CineRate, 0);
    if (rate > 0) return rate;
    const frameTime = number(item, T.FrameTime, 0);
    return frameTime > 0 ? 1000 / frameTime : 10;
  }

  destroy() {
    loader.drop(this);
    this.root.remove();
  }
}
