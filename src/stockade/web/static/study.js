// The study page: patient and study attributes, the series with thumbnails, and the actions
// the caller's role allows. DICOM values go into the page as text only (textContent).
import { call, problem, value, values, text, signOutOn } from "./api.js";

const TAGS = {
  PatientName: "00100010",
  PatientID: "00100020",
  PatientBirthDate: "00100030",
  PatientSex: "00100040",
  StudyDate: "00080020",
  AccessionNumber: "00080050",
  StudyDescription: "00081030",
  ModalitiesInStudy: "00080061",
  NumberOfStudyRelatedSeries: "00201206",
  NumberOfStudyRelatedInstances: "00201208",
  SeriesInstanceUID: "0020000E",
  SeriesNumber: "00200011",
  Modality: "00080060",
  SeriesDescription: "0008103E",
  BodyPartExamined: "00180015",
  NumberOfSeriesRelatedInstances: "00201209",
};
const $ = (id) => document.getElementById(id);
const study = new URLSearchParams(window.location.search).get("study") || "";
const studyPath = `/dicomweb/studies/${encodeURIComponent(study)}`;
const apiPath = `/api/studies/${encodeURIComponent(study)}`;

function dicomDate(da) {
  return /^\d{8}$/.test(da) ? `${da.slice(0, 4)}-${da.slice(4, 6)}-${da.slice(6, 8)}` : da;
}

function viewerHref(series) {
  const params = new URLSearchParams({ study });
  if (series) params.set("series", series);
  return `/ui/viewer?${params}`;
}

function showResult(content, failed) {
  const result = $("result");
  text(result, content);
  result.classList.toggle("failed", failed);
}

function renderHeader(found) {
  const name = value(found, TAGS.PatientName);
  text($("patient-name"), name || "(no patient name)");
  for (const key of ["PatientID", "PatientSex", "AccessionNumber", "StudyDescription"]) {
    text($(key), value(found, TAGS[key]));
  }
  text($("PatientBirthDate"), dicomDate(value(found, TAGS.PatientBirthDate)));
  text($("StudyDate"), dicomDate(value(found, TAGS.StudyDate)));
  text($("ModalitiesInStudy"), values(found, TAGS.ModalitiesInStudy).join(", "));
  const series = value(found, TAGS.NumberOfStudyRelatedSeries);
  const instances = value(found, TAGS.NumberOfStudyRelatedInstances);
  text($("counts"), `${series} / ${instances}`);
  const who = value(found, TAGS.PatientID);
  text(
    $("confirm-text"),
    `Delete this study of ${name || "(no patient name)"}${who ? ` (${who})` : ""}, ` +
      `${instances} instance(s), for good?`,
  );
}

function seriesRow(item) {
  const uid = value(item, TAGS.SeriesInstanceUID);
  const row = document.createElement("tr");
  row.dataset.series = uid;
  const link = document.createElement("a");
  link.className = "thumb";
  link.href = viewerHref(uid);
  const image = document.createElement("img");
  image.alt = "";
  image.width = 96;
  image.height = 96;
  image.addEventListener("error", () => image.classList.add("missing"));
  image.src = `${studyPath}/series/${encodeURIComponent(uid)}/thumbnail`;
  link.append(image);
  const thumb = document.createElement("td");
  thumb.append(link);
  row.append(thumb);
  const number = document.createElement("td");
  const open = document.createElement("a");
  open.href = viewerHref(uid);
  text(open, value(item, TAGS.SeriesNumber) || "-");
  number.append(open);
  row.append(number);
  for (const tag of [TAGS.Modality, TAGS.SeriesDescription, TAGS.NumberOfSeriesRelatedInstances, TAGS.BodyPartExamined]) {
    row.append(text(document.createElement("td"), value(item, tag)));
  }
  return row;
}

async function loadSeries() {
  const response = await call(`${studyPath}/series`, { headers: { Accept: "application/dicom+json" } });
  if (!response.ok) {
    text($("message"), await problem(response));
    return;
  }
  const found = response.status === 204 ? [] : await response.json();
  const number = (item) => Number.parseInt(value(item, TAGS.SeriesNumber), 10);
  found.sort((a, b) => (Number.isNaN(number(a)) ? 1e9 : number(a)) - (Number.isNaN(number(b)) ? 1e9 : number(b)));
  $("series").querySelector("tbody").replaceChildren(...found.map(seriesRow));
}

async function loadNodes() {
  const response = await call("/api/nodes");
  if (!response.ok) return;
  const nodes = await response.json();
  const select = $("node");
  for (const node of nodes) {
    const option = document.createElement("option");
    option.value = node.name;
    text(option, `${node.name} (${node.ae_title})`);
    select.append(option);
  }
  $("send-button").disabled = nodes.length === 0;
  if (nodes.length === 0) {
    const option = document.createElement("option");
    text(option, "no node configured");
    select.append(option);
    select.disabled = true;
  }
  $("send").hidden = false;
}

async function showOhif() {
  try {
    const response = await call("/api/ohif");
    if (!response.ok) return;
    const state = await response.json();
    if (state && state.installed === true) {
      $("ohif").href = `/ohif/viewer?StudyInstanceUIDs=${encodeURIComponent(study)}`;
      $("ohif").hidden = false;
    }
  } catch {
    // no OHIF: the link stays hidden
  }
}

async function send(event) {
  event.preventDefault();
  const node = $("node").value;
  const button = $("send-button");
  button.disabled = true;
  showResult(`Sending to ${node}...`, false);
  try {
    const response = await call(`${apiPath}/send`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ node }),
    });
    if (!response.ok) {
      showResult(`Not sent: ${await problem(response)}`, true);
      return;
    }
    const done = await response.json();
    showResult(
      `Sent to ${done.node} (${done.ae_title}): ${done.completed} completed, ` +
        `${done.warning} with warnings, ${done.failed} failed.`,
      done.failed > 0,
    );
  } finally {
    button.disabled = false;
  }
}

async function remove() {
  const button = $("confirm-delete");
  button.disabled = true;
  const response = await call(apiPath, { method: "DELETE" });
  if (!response.ok) {
    button.disabled = false;
    showResult(`Not deleted: ${await problem(response)}`, true);
    return;
  }
  window.location.assign("/ui/");
}

$("delete").addEventListener("click", () => {
  $("confirm").hidden = false;
  $("delete").hidden = true;
  $("cancel-delete").focus();
});
$("cancel-delete").addEventListener("click", () => {
  $("confirm").hidden = true;
  $("delete").hidden = false;
});
$("confirm-delete").addEventListener("click", remove);
$("send").addEventListener("submit", send);
signOutOn(document.getElementById("logout"));

async function start() {
  const me = await call("/auth/me");
  if (!me.ok) {
    text($("message"), await problem(me));
    return;
  }
  const who = await me.json();
  text($("who"), `${who.user} (${who.role})`);
  const may = new Set(who.permissions || []);
  if (!/^[0-9.]{1,64}$/.test(study)) {
    text($("message"), "No study given: open one from the study list.");
    return;
  }
  const params = new URLSearchParams({ StudyInstanceUID: study });
  const response = await call(`/dicomweb/studies?${params}`, { headers: { Accept: "application/dicom+json" } });
  if (!response.ok) {
    text($("message"), await problem(response));
    return;
  }
  const found = response.status === 204 ? [] : await response.json();
  if (found.length === 0) {
    text($("message"), "No such study is stored here (or it is not one you may see).");
    return;
  }
  renderHeader(found[0]);
  document.title = `Stockade: ${value(found[0], TAGS.PatientName) || "study"}`;
  $("study").hidden = false;
  if (may.has("view")) {
    $("view").href = viewerHref("");
    $("view").hidden = false;
    showOhif();
  }
  if (may.has("download")) {
    $("download").href = `${apiPath}/zip`;
    $("download").hidden = false;
    loadNodes();
  }
  if (may.has("delete")) $("delete").hidden = false;
  await loadSeries();
}

start();
