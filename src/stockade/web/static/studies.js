import { call, problem, value, values, text, signOutOn } from "./api.js";

const PAGE = 25;
const TAGS = {
  PatientName: "00100010",
  PatientID: "00100020",
  StudyDate: "00080020",
  ModalitiesInStudy: "00080061",
  StudyDescription: "00081030",
  AccessionNumber: "00080050",
  NumberOfStudyRelatedSeries: "00201206",
  NumberOfStudyRelatedInstances: "00201208",
  StudyInstanceUID: "0020000D",
};
const message = document.getElementById("message");
const rows = document.querySelector("#studies tbody");
let offset = 0;
// Sorted by the server (QIDO-RS orderby), so pages follow the order: newest first by default.
let sortKey = "StudyDate";
let sortDown = true;
let shown = [];

function dicomDate(iso) {
  return iso ? iso.replaceAll("-", "") : "";
}

function query() {
  const params = new URLSearchParams();
  for (const key of ["PatientName", "PatientID", "AccessionNumber", "ModalitiesInStudy", "StudyDescription"]) {
    const entered = document.getElementById(key).value.trim();
    if (entered) params.set(key, entered);
  }
  const from = dicomDate(document.getElementById("from").value);
  const to = dicomDate(document.getElementById("to").value);
  if (from || to) params.set("StudyDate", `${from}-${to}`);
  params.set("fuzzymatching", "false");
  for (const tag of ["00081030", "00201206", "00201208", "00080061"]) params.append("includefield", tag);
  const sign = sortDown ? "-" : "";
  const keys = sortKey === "StudyDate" ? ["StudyDate", "StudyTime"] : [sortKey];
  params.set("orderby", keys.map((k) => sign + k).join(","));
  params.set("limit", String(PAGE + 1));
  params.set("offset", String(offset));
  return params;
}

function render() {
  const ordered = shown;
  for (const header of document.querySelectorAll("th[data-key]")) {
    const on = header.dataset.key === sortKey;
    header.setAttribute("aria-sort", on ? (sortDown ? "descending" : "ascending") : "none");
  }
  rows.replaceChildren();
  for (const study of ordered) {
    const row = document.createElement("tr");
    const uid = value(study, TAGS.StudyInstanceUID);
    row.dataset.study = uid;
    const patient = document.createElement("td");
    const open = document.createElement("a");
    open.href = `/ui/study?study=${encodeURIComponent(uid)}`;
    open.className = "study-link";
    text(open, value(study, TAGS.PatientName) || "(no name)");
    patient.append(open);
    row.append(patient);
    const cells = [
      value(study, TAGS.PatientID),
      value(study, TAGS.StudyDate),
      values(study, TAGS.ModalitiesInStudy).join(", "),
      value(study, TAGS.StudyDescription),
      value(study, TAGS.NumberOfStudyRelatedSeries),
      value(study, TAGS.NumberOfStudyRelatedInstances),
    ];
    for (const content of cells) row.append(text(document.createElement("td"), content));
    rows.append(row);
  }
}

async function search() {
  message.textContent = "";
  const response = await call(`/dicomweb/studies?${query()}`, {
    headers: { Accept: "application/dicom+json" },
  });
  if (!response.ok) {
    message.textContent = await problem(response);
    return;
  }
  const found = response.status === 204 ? [] : await response.json();
  const more = found.length > PAGE;
  shown = found.slice(0, PAGE);
  render();
  document.getElementById("previous").disabled = offset === 0;
  document.getElementById("next").disabled = !more;
  document.getElementById("page").textContent =
    shown.length ? `studies ${offset + 1}-${offset + shown.length}` : "no study matches";
}

document.getElementById("search").addEventListener("submit", (event) => {
  event.preventDefault();
  offset = 0;
  search();
});
document.getElementById("previous").addEventListener("click", () => {
  offset = Math.max(0, offset - PAGE);
  search();
});
document.getElementById("next").addEventListener("click", () => {
  offset += PAGE;
  search();
});
for (const header of document.querySelectorAll("th[data-key]")) {
  header.addEventListener("click", () => {
    sortDown = sortKey === header.dataset.key ? !sortDown : header.dataset.key === "StudyDate";
    sortKey = header.dataset.key;
    offset = 0;
    search();
  });
}
signOutOn(document.getElementById("logout"));

const me = await call("/auth/me");
if (me.ok) {
  const who = await me.json();
  document.getElementById("who").textContent = `${who.user} (${who.role})`;
  const may = new Set(who.permissions || []);
  document.getElementById("upload-link").hidden = !may.has("upload");
  document.getElementById("admin-link").hidden = !may.has("admin");
  search();
}
