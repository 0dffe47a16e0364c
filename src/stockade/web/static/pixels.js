// Pixels of the built-in viewer: frames from WADO-RS, the grayscale pipeline of PS3.3 C.11
// (Modality LUT, VOI LUT, Presentation LUT) and the statistics of a region, all client-side.

import { call } from "./api.js";

// Tags of the image attributes the viewer reads (PS3.3 C.7.6.3, C.7.6.2, C.11).
export const T = {
  PatientName: "00100010",
  PatientID: "00100020",
  PatientBirthDate: "00100030",
  PatientSex: "00100040",
  StudyDate: "00080020",
  StudyDescription: "00081030",
  SeriesDescription: "0008103E",
  SeriesNumber: "00200011",
  Modality: "00080060",
  InstanceNumber: "00200013",
  SOPInstanceUID: "00080018",
  SeriesInstanceUID: "0020000E",
  StudyInstanceUID: "0020000D",
  Rows: "00280010",
  Columns: "00280011",
  SamplesPerPixel: "00280002",
  PhotometricInterpretation: "00280004",
  BitsAllocated: "00280100",
  BitsStored: "00280101",
  PixelRepresentation: "00280103",
  NumberOfFrames: "00280008",
  PixelSpacing: "00280030",
  ImagerPixelSpacing: "00181164",
  RescaleSlope: "00281053",
  RescaleIntercept: "00281052",
  RescaleType: "00281054",
  WindowCenter: "00281050",
  WindowWidth: "00281051",
  VOILUTFunction: "00281056",
  VOILUTSequence: "00283010",
  LUTDescriptor: "00283002",
  LUTData: "00283006",
  SliceLocation: "00201041",
  SliceThickness: "00180050",
  ImagePositionPatient: "00200032",
  CineRate: "00180040",
  RecommendedDisplayFrameRate: "00082144",
  FrameTime: "00181063",
  SharedFunctionalGroups: "52009229",
  PerFrameFunctionalGroups: "52009230",
  PixelMeasuresSequence: "00289110",
  PixelValueTransformationSequence: "00289145",
  FrameVOILUTSequence: "00289132",
};

// The values of a DICOM JSON attribute (PS3.18 F.2), or [].
export function all(item, tag) {
  const element = item && item[tag];
  return element && Array.isArray(element.Value) ? element.Value : [];
}

export function first(item, tag, fallback = undefined) {
  const v = all(item, tag);
  return v.length ? v[0] : fallback;
}

export function number(item, tag, fallback) {
  const n = Number(first(item, tag, NaN));
  return Number.isFinite(n) ? n : fallback;
}

// An attribute of one frame: its Per-Frame, then Shared Functional Groups (PS3.3 C.7.6.16),
// then the top level of the instance.
export function frameAttribute(item, frameIndex, macro, tag) {
  const perFrame = all(item, T.PerFrameFunctionalGroups)[frameIndex];
  for (const groups of [perFrame, first(item, T.SharedFunctionalGroups)]) {
    const m = groups && first(groups, macro);
    if (m && m[tag]) return m[tag].Value || [];
  }
  return all(item, tag);
}

// The image description of one frame of an instance (numbers only; never DICOM text as HTML).
export function describe(item, frameIndex) {
  const spacing = frameAttribute(item, frameIndex, T.PixelMeasuresSequence, T.PixelSpacing);
  const imager = all(item, T.ImagerPixelSpacing);
  const transform = (tag, fallback) => {
    const v = frameAttribute(item, frameIndex, T.PixelValueTransformationSequence, tag);
    const n = Number(v[0]);
    return v.length && Number.isFinite(n) ? n : fallback;
  };
  const centers = frameAttribute(item, frameIndex, T.FrameVOILUTSequence, T.WindowCenter).map(Number);
  const widths = frameAttribute(item, frameIndex, T.FrameVOILUTSequence, T.WindowWidth).map(Number);
  const voiFunction = frameAttribute(item, frameIndex, T.FrameVOILUTSequence, T.VOILUTFunction);
  const photometric = String(first(item, T.PhotometricInterpretation, "MONOCHROME2")).trim();
  let spacingMm = null;
  let spacingKind = "none";
  if (spacing.length === 2 && spacing.every((s) => Number(s) > 0)) {
    spacingMm = [Number(spacing[0]), Number(spacing[1])]; // row spacing, column spacing
    spacingKind = "patient";
  } else if (imager.length === 2 && imager.every((s) => Number(s) > 0)) {
    spacingMm = [Number(imager[0]), Number(imager[1])];
    spacingKind = "detector";
  }
  return {
    rows: number(item, T.Rows, 0),
    columns: number(item, T.Columns, 0),
    samples: number(item, T.SamplesPerPixel, 1),
    photometric,
    bitsAllocated: number(item, T.BitsAllocated, 16),
    bitsStored: number(item, T.BitsStored, number(item, T.BitsAllocated, 16)),
    signed: number(item, T.PixelRepresentation, 0) === 1,
    slope: transform(T.RescaleSlope, 1),
    intercept: transform(T.RescaleIntercept, 0),
    rescaleType: String(first(item, T.RescaleType, "")),
    windows: centers
      .map((c, i) => ({ center: c, width: widths[i] }))
      .filter((w) => Number.isFinite(w.center) && Number.isFinite(w.width) && w.width >= 1),
    voiFunction: String(voiFunction[0] || "LINEAR").trim().toUpperCase(),
    voiLut: voiLutOf(item),
    spacingMm,
    spacingKind,
    grayscale: photometric === "MONOCHROME1" || photometric === "MONOCHROME2",
  };
}

// A VOI LUT (PS3.3 C.11.2) whose data is inline in the metadata, or null.
function voiLutOf(item) {
  const lut = first(item, T.VOILUTSequence);
  if (!lut) return null;
  const descriptor = all(lut, T.LUTDescriptor).map(Number);
  const data = all(lut, T.LUTData).map(Number);
  if (descriptor.length !== 3 || data.length === 0) return null;
  const entries = descriptor[0] === 0 ? 65536 : descriptor[0];
  const bits = descriptor[2];
  if (data.length < Math.min(entries, 65536) || !(bits >= 8 && bits <= 16)) return null;
  return { first: descriptor[1], data: Uint16Array.from(data.slice(0, entries)), max: 2 ** bits - 1 };
}

// The first part of a multipart/related answer (PS3.18 8.7.3.5), as bytes.
export function firstPart(buffer, contentType) {
  const match = /boundary="?([^";]+)"?/i.exec(contentType || "");
  const bytes = new Uint8Array(buffer);
  if (!match) return bytes;
  const boundary = new TextEncoder().encode(`--${match[1]}`);
  const start = indexOf(bytes, boundary, 0);
  if (start < 0) throw new Error("no part in the answer");
  const headersEnd = indexOf(bytes, new TextEncoder().encode("\r\n\r\n"), start);
  if (headersEnd < 0) throw new Error("a part without headers");
  const bodyStart = headersEnd + 4;
  const next = indexOf(bytes, new TextEncoder().encode(`\r\n--${match[1]}`), bodyStart);
  return bytes.subarray(bodyStart, next < 0 ? bytes.length : next);
}

function indexOf(haystack, needle, from) {
  const last = haystack.length - needle.length;
  outer: for (let i = from; i <= last; i++) {
    if (haystack[i] !== needle[0]) continue;
    for (let j = 1; j < needle.length; j++) if (haystack[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

// One uncompressed frame (Explicit VR Little Endian) as stored values, sign-extended or masked
// to Bits Stored (PS3.5 8.1.1).
export function storedValues(bytes, d) {
  const count = d.rows * d.columns;
  if (bytes.byteLength < count * (d.bitsAllocated / 8)) throw new Error("the frame is shorter than its description");
  const copy = bytes.slice(); // aligned
  let raw;
  if (d.bitsAllocated === 8) raw = d.signed ? new Int8Array(copy.buffer, 0, count) : new Uint8Array(copy.buffer, 0, count);
  else if (d.bitsAllocated === 16) raw = new Uint16Array(copy.buffer, 0, count);
  else if (d.bitsAllocated === 32) raw = new Uint32Array(copy.buffer, 0, count);
  else throw new Error(`${d.bitsAllocated}-bit pixels are not shown by this viewer`);
  if (d.bitsAllocated === 8) return raw;
  const out = d.signed ? (d.bitsAllocated === 16 ? new Int16Array(count) : new Int32Array(count)) : raw;
  const shift = 32 - d.bitsStored;
  const mask = d.bitsStored >= 32 ? 0xffffffff : 2 ** d.bitsStored - 1;
  if (d.signed) for (let i = 0; i < count; i++) out[i] = (raw[i] << shift) >> shift;
  else if (d.bitsStored < d.bitsAllocated) for (let i = 0; i < count; i++) out[i] = raw[i] & mask;
  return out;
}

// A frame ready to show: stored values plus their range after the Modality LUT.
export class Frame {
  constructor(values, description) {
    this.values = values;
    this.d = description;
    let lo = Infinity;
    let hi = -Infinity;
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    const a = lo * description.slope + description.intercept;
    const b = hi * description.slope + description.intercept;
    this.min = Math.min(a, b);
    this.max = Math.max(a, b);
  }

  // The modality value (e.g. HU) of pixel (x, y) (PS3.3 C.11.1: slope and intercept).
  modality(x, y) {
    return this.values[y * this.d.columns + x] * this.d.slope + this.d.intercept;
  }
}

// The default window of a frame: its first Window Center/Width, else its full range.
export function defaultWindow(frame) {
  if (frame.d.windows.length) return { ...frame.d.windows[0] };
  if (frame.d.voiLut) return null;
  return { center: (frame.max + frame.min) / 2, width: Math.max(1, frame.max - frame.min) };
}

// Grayscale to 8-bit display values: Modality LUT, then the window (PS3.3 C.11.2.1.2 LINEAR,
// LINEAR_EXACT, SIGMOID) or the VOI LUT, then MONOCHROME1 (and the user's) inversion.
// Writes RGBA into image (an ImageData of the frame's size). Done through a 65536-entry
// table over stored values for 8- and 16-bit data.
export function paint(frame, window, invert, image) {
  const d = frame.d;
  const flip = (d.photometric === "MONOCHROME1") !== Boolean(invert);
  const toDisplay = displayFunction(d, window);
  const out = image.data;
  const values = frame.values;
  const n = values.length;
  if (d.bitsAllocated <= 16) {
    const offset = d.signed ? 32768 : 0;
    const table = new Uint8ClampedArray(65536);
    const lo = d.signed ? -32768 : 0;
    for (let s = lo; s < lo + 65536; s++) {
      const g = toDisplay(s * d.slope + d.intercept);
      table[s + offset] = flip ? 255 - g : g;
    }
    for (let i = 0, j = 0; i < n; i++, j += 4) {
      const g = table[values[i] + offset];
      out[j] = g;
      out[j + 1] = g;
      out[j + 2] = g;
      out[j + 3] = 255;
    }
  } else {
    for (let i = 0, j = 0; i < n; i++, j += 4) {
      let g = toDisplay(values[i] * d.slope + d.intercept);
      if (flip) g = 255 - g;
      out[j] = g;
      out[j + 1] = g;
      out[j + 2] = g;
      out[j + 3] = 255;
    }
  }
}

// The function from a modality value to a display value 0..255 (rounded).
export function displayFunction(d, window) {
  if (!window && d.voiLut) {
    const lut = d.voiLut;
    const last = lut.data.length - 1;
    return (x) => {
      const i = Math.min(last, Math.max(0, Math.round(x) - lut.first));
      return Math.round((lut.data[i] / lut.max) * 255);
    };
  }
  const c = window.center;
  const w = window.width;
  if (d.voiFunction === "SIGMOID") {
    return (x) => Math.round(255 / (1 + Math.exp((-4 * (x - c)) / w)));
  }
  if (d.voiFunction === "LINEAR_EXACT") {
    return (x) => {
      if (x <= c - w / 2) return 0;
      if (x > c + w / 2) return 255;
      return Math.round(((x - c) / w + 0.5) * 255);
    };
  }
  const low = c - 0.5 - (w - 1) / 2;
  const high = c - 0.5 + (w - 1) / 2;
  return (x) => {
    if (x <= low) return 0;
    if (x > high) return 255;
    return Math.round(((x - (c - 0.5)) / (w - 1) + 0.5) * 255);
  };
}

// Mean, standard deviation (population), count and area of the modality values inside a
// region of the frame; inside(x, y) says whether a pixel centre is in it.
export function regionStatistics(frame, box, inside) {
  const d = frame.d;
  const x0 = Math.max(0, Math.floor(box.x0));
  const y0 = Math.max(0, Math.floor(box.y0));
  const x1 = Math.min(d.columns - 1, Math.ceil(box.x1));
  const y1 = Math.min(d.rows - 1, Math.ceil(box.y1));
  let count = 0;
  let sum = 0;
  let squares = 0;
  for (let y = y0; y <= y1; y++) {
    for (let x = x0; x <= x1; x++) {
      if (!inside(x + 0.5, y + 0.5)) continue;
      const v = frame.modality(x, y);
      count++;
      sum += v;
      squares += v * v;
    }
  }
  const mean = count ? sum / count : NaN;
  const sd = count ? Math.sqrt(Math.max(0, squares / count - mean * mean)) : NaN;
  return { count, mean, sd };
}

// Fetch one frame uncompressed (PS3.18 10.4.1.1.3), ready to paint.
export async function fetchFrame(url, description, signal) {
  const response = await call(url, {
    headers: { Accept: 'multipart/related; type="application/octet-stream"; transfer-syntax=*' },
    signal,
  });
  if (!response.ok) throw new Error(`frame ${url}: ${response.status}`);
  const body = firstPart(await response.arrayBuffer(), response.headers.get("Content-Type"));
  return new Frame(storedValues(body, description), description);
}

// Fetch one frame rendered by the server (colour images: RGB, YBR, palette; PS3.18 10.4.1.1.4)
// as an ImageBitmap.
export async function fetchRendered(url, signal) {
  const response = await call(`${url}/rendered`, { headers: { Accept: "image/png" }, signal });
  if (!response.ok) throw new Error(`rendered ${url}: ${response.status}`);
  return createImageBitmap(await response.blob());
}
