// Upload files and folders with STOW-RS (PS3.18 10.5), one file per request and a few
// requests at a time, with a progress bar and a result per file: stored, stored with a
// warning, quarantined, rejected or failed, with the reason in words. Names of files and
// everything the server answers go into the page as text only.

import { call, problem, text, value, signOutOn } from "./api.js";

const IN_FLIGHT = 3; // requests at once
const STOW = "/dicomweb/studies";
const TAG = {
  ReferencedSOPSequence: "00081199",
  FailedSOPSequence: "00081198",
  ReferencedSOPInstanceUID: "00081155",
  WarningReason: "00081196",
  FailureReason: "00081197",
  Reason: "00091001", // Stockade's private block: the reason in words
  Code: "00091002", // and its stable error code
};

// What each of Stockade's error codes means to a person.
const FAILURES = {
  "invalid-object": "not a readable DICOM file",
  "invalid-attribute": "a required DICOM attribute is missing or invalid",
  "limit-exceeded": "the file's structure is too large or too deeply nested",
  "dataset-mismatch": "the data set does not match its SOP class or the study",
  "too-large": "the file is larger than the server accepts",
  "sop-class-not-supported": "this kind of DICOM object is not accepted",
  "duplicate-conflict": "a different object with the same SOP Instance UID is already stored",
  "hierarchy-conflict": "it would move a stored study or series to another patient or study",
  "refused-by-policy": "refused: it carries hidden content (a program, a script or another file format)",
  quarantined: "held in quarantine for an administrator: it carries hidden content",
  "storage-failure": "the server could not store it now; try again later",
  "index-failure": "the server could not record it now; try again later",
  "not-authorized": "your role may not upload",
};
const WARNINGS = {
  0xb000: "stored with changes (a non-standard preamble was replaced by zeros)",
  0xb006: "stored without some parts (hidden or unneeded content was removed)",
  0xb007: "stored, but the data set does not fully match its SOP class",
};
const FAILURE_STATUS = {
  0xc000: "not a readable DICOM file",
  0xa700: "the server is out of resources",
  0xa900: "the data set does not match its SOP class or the study",
  0x0122: "this kind of DICOM object is not accepted",
  0x0111: "a different object with the same SOP Instance UID is already stored",
};

const rows = document.querySelector("#results tbody");
const progress = document.getElementById("progress");
const message = document.getElementById("message");
const queue = [];
let running = 0;
const tally = { files: 0, done: 0, bytes: 0, doneBytes: 0 };
const counts = { stored: 0, "stored with warning": 0, quarantined: 0, rejected: 0, failed: 0 };

function size(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function boundary() {
  const random = new Uint8Array(16);
  crypto.getRandomValues(random);
  return "stockade-" + Array.from(random, (b) => b.toString(16).padStart(2, "0")).join("");
}

function showProgress() {
  progress.max = Math.max(tally.bytes, 1);
  progress.value = tally.doneBytes;
  text(
    document.getElementById("progress-text"),
    tally.files ? `${tally.done} of ${tally.files} files (${size(tally.doneBytes)} of ${size(tally.bytes)})` : "",
  );
  const parts = Object.entries(counts)
    .filter(([, n]) => n)
    .map(([result, n]) => `${n} ${result}`);
  text(document.getElementById("summary"), parts.join(", "));
}

function add(file, path) {
  const row = document.createElement("tr");
  row.dataset.name = path;
  row.dataset.result = "waiting";
  for (const content of [path, size(file.size), "waiting", "", ""]) {
    row.append(text(document.createElement("td"), content));
  }
  rows.append(row);
  queue.push({ file, row });
  tally.files += 1;
  tally.bytes += file.size;
}

function finish(item, result, reason, uid = "") {
  const cells = item.row.children;
  item.row.dataset.result = result;
  item.row.className = result.replaceAll(" ", "-");
  text(cells[2], result);
  text(cells[3], reason);
  text(cells[4], uid);
  counts[result] += 1;
  tally.done += 1;
  tally.doneBytes += item.file.size;
  showProgress();
}

function sequence(answer, tag) {
  const element = answer[tag];
  return element && Array.isArray(element.Value) ? element.Value : [];
}

function explain(answer, item) {
  const stored = sequence(answer, TAG.ReferencedSOPSequence);
  const failed = sequence(answer, TAG.FailedSOPSequence);
  if (stored.length) {
    const it = stored[0];
    const uid = value(it, TAG.ReferencedSOPInstanceUID);
    const warning = value(it, TAG.WarningReason);
    if (warning !== "") {
      const said = value(it, TAG.Reason);
      const words = WARNINGS[Number(warning)] || `stored with warning ${Number(warning).toString(16).toUpperCase()}H`;
      finish(item, "stored with warning", said ? `${words}: ${said}` : words, uid);
    } else {
      finish(item, "stored", "", uid);
    }
    return;
  }
  if (failed.length) {
    const it = failed[0];
    const code = value(it, TAG.Code);
    const status = Number(value(it, TAG.FailureReason));
    const said = value(it, TAG.Reason);
    const words = FAILURES[code] || FAILURE_STATUS[status] || `failed with status ${status.toString(16).toUpperCase()}H`;
    const result = code === "quarantined" ? "quarantined" : code === "refused-by-policy" ? "rejected" : "failed";
    finish(item, result, said ? `${words} (${said})` : words, value(it, TAG.ReferencedSOPInstanceUID));
    return;
  }
  finish(item, "failed", "the server's answer names no instance");
}

async function send(item) {
  const cut = boundary();
  const body = new Blob([
    `--${cut}\r\nContent-Type: application/dicom\r\n\r\n`,
    item.file,
    `\r\n--${cut}--\r\n`,
  ]);
  text(item.row.children[2], "sending");
  item.row.dataset.result = "sending";
  let response;
  try {
    response = await call(STOW, {
      method: "POST",
      headers: {
        "Content-Type": `multipart/related; type="application/dicom"; boundary=${cut}`,
        Accept: "application/dicom+json",
      },
      body,
    });
  } catch (error) {
    finish(item, "failed", `network error: ${error.message}`);
    return;
  }
  const type = response.headers.get("Content-Type") || "";
  if (type.startsWith("application/dicom+json")) {
    try {
      explain(await response.json(), item);
    } catch {
      finish(item, "failed", "the server's answer could not be read");
    }
    return;
  }
  const detail = await problem(response);
  const words = {
    403: "your role may not upload",
    413: "the file is larger than the server accepts",
  }[response.status];
  finish(item, "failed", words ? `${words} (${detail})` : `HTTP ${response.status}: ${detail}`);
}

function pump() {
  while (running < IN_FLIGHT && queue.length) {
    const item = queue.shift();
    running += 1;
    send(item).finally(() => {
      running -= 1;
      pump();
    });
  }
  showProgress();
}

function addFiles(files) {
  for (const file of files) add(file, file.webkitRelativePath || file.name);
  pump();
}

// -- drag and drop (folders through FileSystemEntry) --------------------------------------

function readAll(reader) {
  return new Promise((resolve, reject) => {
    const found = [];
    const next = () =>
      reader.readEntries((batch) => {
        if (!batch.length) {
          resolve(found);
          return;
        }
        found.push(...batch);
        next();
      }, reject);
    next();
  });
}

async function walk(entry, out) {
  if (entry.isFile) {
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    out.push([file, entry.fullPath.replace(/^\//, "")]);
  } else if (entry.isDirectory) {
    for (const child of await readAll(entry.createReader())) await walk(child, out);
  }
}

const drop = document.getElementById("drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
}
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", async (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const items = event.dataTransfer.items;
  const entries = [];
  const loose = [];
  for (const item of items ? [...items] : []) {
    if (item.kind !== "file") continue;
    const entry = item.webkitGetAsEntry ? item.webkitGetAsEntry() : null;
    if (entry) entries.push(entry);
    else if (item.getAsFile()) loose.push(item.getAsFile());
  }
  if (!items) loose.push(...event.dataTransfer.files);
  const found = [];
  try {
    for (const entry of entries) await walk(entry, found);
  } catch (error) {
    message.textContent = `could not read a dropped folder: ${error.message}`;
  }
  for (const [file, path] of found) add(file, path);
  addFiles(loose);
});

for (const id of ["files", "folder"]) {
  const input = document.getElementById(id);
  input.addEventListener("change", () => {
    addFiles([...input.files]);
    input.value = "";
  });
}

document.getElementById("clear").addEventListener("click", () => {
  for (const row of [...rows.children]) {
    if (!["waiting", "sending"].includes(row.dataset.result)) row.remove();
  }
  if (!queue.length && !running) {
    Object.assign(tally, { files: 0, done: 0, bytes: 0, doneBytes: 0 });
    for (const key of Object.keys(counts)) counts[key] = 0;
  }
  showProgress();
});

signOutOn(document.getElementById("logout"));

const me = await call("/auth/me");
if (me.ok) {
  const who = await me.json();
  text(document.getElementById("who"), `${who.user} (${who.role})`);
  if (!who.permissions.includes("upload")) {
    message.textContent = "Your role may not upload; ask an administrator.";
    for (const id of ["files", "folder"]) document.getElementById(id).disabled = true;
  }
}
