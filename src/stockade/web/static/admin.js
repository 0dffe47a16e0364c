// The administration page: users, DICOM peers, quarantine, the audit log, the security
// posture and statistics, over /api/admin. Everything that comes from the server (user
// names, peers, audit records, quarantined objects' identities) goes into the page as text.

import { call, problem, text, signOutOn } from "./api.js";

const API = "/api/admin";
const AUDIT_PAGE = 50;
const message = document.getElementById("message");
const loaders = {};
let me = null;
let auditOffset = 0;

function say(content, failed = false) {
  message.textContent = content;
  message.classList.toggle("failed", failed);
}

function cell(row, content) {
  const td = document.createElement("td");
  td.textContent = content === null || content === undefined ? "" : String(content);
  row.append(td);
  return td;
}

function button(label, className, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

async function api(path, options = {}) {
  const init = { ...options, headers: { Accept: "application/json", ...(options.headers || {}) } };
  if (options.json !== undefined) {
    init.body = JSON.stringify(options.json);
    init.headers["Content-Type"] = "application/json";
    delete init.json;
  }
  const response = await call(API + path, init);
  if (!response.ok) throw new Error(await problem(response));
  return response.status === 204 ? null : response.json();
}

// Run an action and report what happened; failures are shown, never thrown further.
async function act(what, done) {
  try {
    const result = await what();
    if (done) say(typeof done === "function" ? done(result) : done);
    return result;
  } catch (error) {
    say(error.message, true);
    return undefined;
  }
}

// An in-page confirmation (a modal dialog, not window.confirm).
function confirmAction(question) {
  const dialog = document.getElementById("confirm");
  text(document.getElementById("confirm-text"), question);
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "cancel";
    dialog.showModal();
  });
}

function bytes(n) {
  if (n === null || n === undefined) return "unknown";
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${n} bytes` : `${value.toFixed(1)} ${units[unit]}`;
}

// Each list remembers its newest request; an answer to an older one is not shown.
const asked = {};
function ticket(key) {
  asked[key] = (asked[key] || 0) + 1;
  const mine = asked[key];
  return () => mine === asked[key];
}

// -- tabs ------------------------------------------------------------------------------------

function show(tab) {
  for (const b of document.querySelectorAll("#tabs [role=tab]")) {
    b.setAttribute("aria-selected", String(b.dataset.tab === tab));
  }
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== tab;
  say("");
  if (window.location.hash !== `#${tab}`) history.replaceState(null, "", `#${tab}`);
  loaders[tab]();
}

for (const b of document.querySelectorAll("#tabs [role=tab]")) {
  b.addEventListener("click", () => show(b.dataset.tab));
}

// -- users -----------------------------------------------------------------------------------

loaders.users = async () => {
  const current = ticket("users");
  const data = await act(() => api("/users"));
  if (!data || !current()) return;
  const roles = document.getElementById("user-role");
  if (!roles.options.length) {
    for (const role of data.roles) {
      const option = text(document.createElement("option"), role);
      option.value = role;
      roles.append(option);
    }
  }
  const body = document.querySelector("#user-table tbody");
  body.replaceChildren();
  for (const user of data.users) {
    const row = document.createElement("tr");
    row.dataset.user = user.name;
    cell(row, user.name);
    const roleCell = cell(row, "");
    const role = document.createElement("select");
    role.className = "role";
    role.setAttribute("aria-label", `Role of ${user.name}`);
    for (const name of data.roles) {
      const option = text(document.createElement("option"), name);
      option.value = name;
      option.selected = name === user.role;
      role.append(option);
    }
    role.addEventListener("change", async () => {
      const wanted = role.value;
      if (!(await confirmAction(`Make ${user.name} ${wanted} (was ${user.role})?`))) {
        role.value = user.role;
        return;
      }
      await act(
        () => api(`/users/${encodeURIComponent(user.name)}/role`, { method: "POST", json: { role: wanted } }),
        `${user.name} is now ${wanted}`,
      );
      loaders.users();
    });
    roleCell.append(role);
    const state = user.disabled ? "disabled" : user.locked_until ? `locked until ${user.locked_until}` : "active";
    cell(row, state + (user.scoped ? ", limited to some studies" : ""));
    cell(row, user.must_change ? "must be changed" : "set");
    cell(row, user.created_at);
    const actions = cell(row, "");
    const toggle = user.disabled ? "enable" : "disable";
    actions.append(
      button(user.disabled ? "Enable" : "Disable", toggle, async () => {
        if (!user.disabled && !(await confirmAction(`Disable ${user.name}? Their sessions and tokens stop working.`))) return;
        await act(() => api(`/users/${encodeURIComponent(user.name)}/${toggle}`, { method: "POST" }), `${user.name}: ${toggle}d`);
        loaders.users();
      }),
      button("Set password", "password", () => {
        const form = document.getElementById("password-form");
        form.dataset.user = user.name;
        text(document.getElementById("password-user"), user.name);
        form.hidden = false;
        document.getElementById("password-new").focus();
      }),
    );
    body.append(row);
  }
};

document.getElementById("user-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = document.getElementById("user-name").value.trim();
  const made = await act(
    () =>
      api("/users", {
        method: "POST",
        json: {
          name,
          role: document.getElementById("user-role").value,
          password: document.getElementById("user-password").value,
          must_change: document.getElementById("user-must-change").checked,
        },
      }),
    `added user ${name}`,
  );
  if (made) {
    event.target.reset();
    loaders.users();
  }
});

document.getElementById("password-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const name = form.dataset.user;
  const done = await act(
    () =>
      api(`/users/${encodeURIComponent(name)}/password`, {
        method: "POST",
        json: {
          password: document.getElementById("password-new").value,
          must_change: document.getElementById("password-must-change").checked,
        },
      }),
    `password of ${name} set; their sessions ended`,
  );
  if (done) {
    form.reset();
    form.hidden = true;
    loaders.users();
  }
});
document.getElementById("password-cancel").addEventListener("click", () => {
  const form = document.getElementById("password-form");
  form.reset();
  form.hidden = true;
});

// -- DICOM peers -----------------------------------------------------------------------------

const nodeForm = document.getElementById("node-form");

function editNode(node) {
  nodeForm.dataset.editing = node ? node.name : "";
  text(document.getElementById("node-form-title"), node ? `Edit ${node.name}` : "Add a peer");
  text(document.getElementById("node-save"), node ? "Save changes" : "Add peer");
  document.getElementById("node-cancel").hidden = !node;
  if (!node) {
    nodeForm.reset();
    return;
  }
  document.getElementById("node-name").value = node.name;
  document.getElementById("node-ae").value = node.ae_title;
  document.getElementById("node-host").value = node.host;
  document.getElementById("node-port").value = String(node.port);
  for (const box of document.querySelectorAll("#node-allow input")) box.checked = node.allow.includes(box.value);
  document.getElementById("node-tls").checked = node.tls;
  document.getElementById("node-cert").value = node.cert_sha256 || "";
  document.getElementById("node-name").focus();
}

loaders.nodes = async () => {
  const current = ticket("nodes");
  const data = await act(() => api("/nodes"));
  if (!data || !current()) return;
  const body = document.querySelector("#node-table tbody");
  body.replaceChildren();
  for (const node of data.nodes) {
    const row = document.createElement("tr");
    row.dataset.node = node.name;
    cell(row, node.name);
    cell(row, node.ae_title);
    cell(row, node.host);
    cell(row, node.port);
    cell(row, node.allow.join(", "));
    cell(row, node.tls ? (node.cert_sha256 ? "yes, pinned certificate" : "yes") : "no");
    const actions = cell(row, "");
    const result = cell(row, "");
    result.className = "echo-result";
    actions.append(
      button("Test", "test", async () => {
        text(result, "testing…");
        result.classList.remove("ok", "failed");
        const echo = await act(() => api(`/nodes/${encodeURIComponent(node.name)}/echo`, { method: "POST" }));
        if (!echo) {
          text(result, "");
          return;
        }
        text(result, echo.ok ? `C-ECHO success in ${echo.milliseconds} ms` : `failed: ${echo.detail}`);
        result.classList.add(echo.ok ? "ok" : "failed");
      }),
      button("Edit", "edit", () => editNode(node)),
      button("Remove", "remove danger", async () => {
        if (!(await confirmAction(`Remove the peer ${node.name} (${node.ae_title} at ${node.host}:${node.port})?`))) return;
        await act(() => api(`/nodes/${encodeURIComponent(node.name)}`, { method: "DELETE" }), `removed ${node.name}`);
        loaders.nodes();
      }),
    );
    body.append(row);
  }
};

nodeForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const editing = nodeForm.dataset.editing;
  const fields = {
    name: document.getElementById("node-name").value.trim(),
    ae_title: document.getElementById("node-ae").value.trim(),
    host: document.getElementById("node-host").value.trim(),
    port: Number(document.getElementById("node-port").value),
    allow: [...document.querySelectorAll("#node-allow input:checked")].map((box) => box.value),
    tls: document.getElementById("node-tls").checked,
    cert_sha256: document.getElementById("node-cert").value.trim() || null,
  };
  const saved = await act(
    () =>
      editing
        ? api(`/nodes/${encodeURIComponent(editing)}`, { method: "PUT", json: fields })
        : api("/nodes", { method: "POST", json: fields }),
    (node) => `${editing ? "saved" : "added"} peer ${node.name}`,
  );
  if (saved) {
    editNode(null);
    loaders.nodes();
  }
});
document.getElementById("node-cancel").addEventListener("click", () => editNode(null));

// -- quarantine ------------------------------------------------------------------------------

async function showEntry(id) {
  const entry = await act(() => api(`/quarantine/${encodeURIComponent(id)}`));
  if (!entry) return;
  const detail = document.getElementById("quarantine-detail");
  text(document.getElementById("quarantine-id"), entry.id);
  const fields = document.getElementById("quarantine-fields");
  fields.replaceChildren();
  const shown = [
    ["Received", entry.received_at],
    ["Times received", entry.times],
    ["Via", entry.via],
    ["Calling AE title", entry.ae_title],
    ["Address", entry.address],
    ["User", entry.user],
    ["Patient ID", entry.patient_id],
    ["Study Instance UID", entry.study_uid],
    ["SOP Instance UID", entry.sop_instance_uid],
    ["SOP Class UID", entry.sop_class_uid],
    ["Transfer syntax", entry.transfer_syntax],
    ["Size", bytes(entry.size)],
    ["SHA-256", entry.sha256],
  ];
  for (const [label, content] of shown) {
    fields.append(text(document.createElement("dt"), label), text(document.createElement("dd"), content ?? "—"));
  }
  const list = document.getElementById("quarantine-findings");
  list.replaceChildren();
  for (const finding of entry.findings) {
    list.append(text(document.createElement("li"), `${finding.kind} in ${finding.where}: ${finding.detail} (${finding.action})`));
  }
  detail.hidden = false;
}

loaders.quarantine = async () => {
  const current = ticket("quarantine");
  const data = await act(() => api("/quarantine"));
  if (!data || !current()) return;
  const body = document.querySelector("#quarantine-table tbody");
  body.replaceChildren();
  document.getElementById("quarantine-empty").hidden = data.entries.length > 0;
  document.getElementById("quarantine-detail").hidden = true;
  for (const entry of data.entries) {
    const row = document.createElement("tr");
    row.dataset.id = entry.id;
    cell(row, entry.received_at);
    cell(row, [entry.via, entry.ae_title, entry.user, entry.address].filter(Boolean).join(" "));
    cell(row, entry.patient_id);
    cell(row, entry.sop_instance_uid);
    cell(row, entry.findings.join(", "));
    cell(row, bytes(entry.size));
    cell(row, "").append(
      button("Show", "show", () => showEntry(entry.id)),
      button("Release", "release", async () => {
        if (!(await confirmAction(`Release ${entry.id} into the archive? Its findings will only be alerted.`))) return;
        await act(
          () => api(`/quarantine/${entry.id}/release`, { method: "POST" }),
          (done) => `released ${entry.id}: ${done.outcome} ${done.sop_instance_uid}`,
        );
        loaders.quarantine();
      }),
      button("Delete", "delete danger", async () => {
        if (!(await confirmAction(`Delete ${entry.id} for good? This cannot be undone.`))) return;
        await act(() => api(`/quarantine/${entry.id}`, { method: "DELETE" }), `deleted ${entry.id}`);
        loaders.quarantine();
      }),
    );
    body.append(row);
  }
};

// -- audit -----------------------------------------------------------------------------------

function nextDay(iso) {
  const day = new Date(`${iso}T00:00:00Z`);
  day.setUTCDate(day.getUTCDate() + 1);
  return day.toISOString().slice(0, 10);
}

function auditQuery() {
  const params = new URLSearchParams();
  const fields = { type: "audit-type", user: "audit-user", outcome: "audit-outcome", study: "audit-study", patient: "audit-patient" };
  for (const [key, id] of Object.entries(fields)) {
    const entered = document.getElementById(id).value.trim();
    if (entered) params.set(key, entered);
  }
  const from = document.getElementById("audit-from").value;
  const to = document.getElementById("audit-to").value;
  if (from) params.set("since", from);
  if (to) params.set("until", nextDay(to)); // "To" includes that whole day
  params.set("limit", String(AUDIT_PAGE));
  params.set("offset", String(auditOffset));
  return params;
}

const SHOWN = new Set(["seq", "time", "type", "outcome", "actor", "prev_hash", "hash"]);

function concerning(record) {
  const parts = [];
  const patients = record.patient_ids || (record.patient_id ? [record.patient_id] : []);
  const studies = record.study_uids || (record.study_uid ? [record.study_uid] : []);
  if (patients.length) parts.push(`patient ${patients.join(", ")}`);
  if (studies.length) parts.push(`study ${studies.join(", ")}`);
  for (const key of ["name", "target", "quarantine_id"]) if (record[key]) parts.push(`${key.replace("_", " ")} ${record[key]}`);
  return parts.join("; ");
}

function details(record) {
  const rest = Object.entries(record).filter(
    ([key, v]) => !SHOWN.has(key) && !["patient_id", "patient_ids", "study_uid", "study_uids", "name", "target", "quarantine_id"].includes(key) && v !== null && v !== "",
  );
  return rest.map(([key, v]) => `${key}=${typeof v === "object" ? JSON.stringify(v) : v}`).join("  ");
}

async function searchAudit() {
  const current = ticket("audit");
  const data = await act(() => api(`/audit?${auditQuery()}`));
  if (!data || !current()) return; // a newer search is under way
  const body = document.querySelector("#audit-table tbody");
  body.replaceChildren();
  for (const record of data.records) {
    const row = document.createElement("tr");
    row.dataset.type = record.type;
    row.className = record.outcome === "failure" ? "failed" : "";
    const actor = record.actor || {};
    cell(row, record.seq);
    cell(row, String(record.time || "").replace("T", " "));
    cell(row, record.type);
    cell(row, record.outcome);
    cell(row, `${actor.user || actor.ae_title || "—"}${actor.address ? ` @ ${actor.address}` : ""} (${actor.via || "?"})`);
    cell(row, concerning(record));
    cell(row, details(record));
    body.append(row);
  }
  document.getElementById("audit-previous").disabled = auditOffset === 0;
  document.getElementById("audit-next").disabled = !data.more;
  const range = data.records.length ? `records ${auditOffset + 1}-${auditOffset + data.records.length}, newest first` : "no record matches";
  text(document.getElementById("audit-page"), range + (data.truncated ? " (only the first 5000 read: narrow the filters)" : ""));
}

loaders.audit = async () => {
  const select = document.getElementById("audit-type");
  if (select.options.length === 1) {
    const data = await act(() => api("/audit/types"));
    for (const type of data ? data.types : []) {
      const option = text(document.createElement("option"), type);
      option.value = type;
      select.append(option);
    }
  }
  searchAudit();
};

document.getElementById("audit-form").addEventListener("submit", (event) => {
  event.preventDefault();
  auditOffset = 0;
  searchAudit();
});
document.getElementById("audit-previous").addEventListener("click", () => {
  auditOffset = Math.max(0, auditOffset - AUDIT_PAGE);
  searchAudit();
});
document.getElementById("audit-next").addEventListener("click", () => {
  auditOffset += AUDIT_PAGE;
  searchAudit();
});
document.getElementById("audit-verify").addEventListener("click", async () => {
  const chain = document.getElementById("audit-chain");
  text(chain, "verifying…");
  const check = await act(() => api("/audit/verify", { method: "POST" }));
  if (!check) {
    text(chain, "");
    return;
  }
  text(
    chain,
    check.ok
      ? `chain intact: ${check.checked} records verified`
      : `chain BROKEN at record ${check.broken}: ${check.reason} (${check.checked} records before it verified)`,
  );
  chain.className = check.ok ? "ok" : "failed";
});

// -- posture ---------------------------------------------------------------------------------

loaders.posture = async () => {
  const report = await act(() => api("/posture"));
  if (!report) return;
  const summary = document.getElementById("posture-summary");
  text(summary, report.critical ? "Critical findings: Stockade is exposed. Fix them first." : "No critical finding.");
  summary.className = report.critical ? "critical" : "ok";
  const listeners = document.querySelector("#posture-listeners tbody");
  listeners.replaceChildren();
  for (const x of report.listeners) {
    const row = document.createElement("tr");
    cell(row, x.name);
    cell(row, x.host.includes(":") ? `[${x.host}]:${x.port}` : `${x.host}:${x.port}`);
    cell(row, x.encrypted ? "encrypted (TLS)" : "NOT encrypted");
    cell(row, x.loopback ? "loopback only" : "reachable from the network");
    cell(row, x.detail);
    if (!x.encrypted && !x.loopback) row.classList.add("warning");
    listeners.append(row);
  }
  const certificates = document.querySelector("#posture-certificates tbody");
  certificates.replaceChildren();
  for (const c of report.certificates) {
    const row = document.createElement("tr");
    cell(row, `${c.setting}: ${c.path}`);
    cell(row, c.subject);
    cell(row, c.not_after);
    cell(row, c.days_left);
    certificates.append(row);
  }
  const findings = document.getElementById("posture-findings");
  findings.replaceChildren();
  if (!report.findings.length) findings.append(text(document.createElement("li"), "no finding"));
  for (const f of report.findings) {
    const item = text(document.createElement("li"), `${f.severity}: ${f.topic}: ${f.message}${f.setting ? ` (setting ${f.setting})` : ""}`);
    item.className = f.severity;
    findings.append(item);
  }
};

// -- statistics ------------------------------------------------------------------------------

loaders.statistics = async () => {
  const counts = await act(() => api("/statistics"));
  if (!counts) return;
  const list = document.getElementById("statistics-list");
  list.replaceChildren();
  const shown = [
    ["Patients", counts.patients],
    ["Studies", counts.studies],
    ["Series", counts.series],
    ["Instances", counts.instances],
    ["Stored", bytes(counts.stored_bytes)],
    ["Quarantined objects", counts.quarantined],
    ["Free space in the data folder", `${bytes(counts.disk_free_bytes)} of ${bytes(counts.disk_total_bytes)}`],
  ];
  for (const [label, content] of shown) {
    const dd = text(document.createElement("dd"), String(content));
    dd.id = `stat-${label.toLowerCase().replaceAll(" ", "-")}`;
    list.append(text(document.createElement("dt"), label), dd);
  }
};

// -- start -----------------------------------------------------------------------------------

signOutOn(document.getElementById("logout"));

const who = await call("/auth/me");
if (who.ok) {
  me = await who.json();
  text(document.getElementById("who"), `${me.user} (${me.role})`);
  const wanted = window.location.hash.slice(1);
  show(loaders[wanted] ? wanted : "users");
}
