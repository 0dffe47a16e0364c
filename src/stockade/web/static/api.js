// Requests to Stockade with the session cookie and its CSRF secret (kept in sessionStorage).
// DICOM values are only ever put into the page as text, never as HTML.

export const CSRF_KEY = "stockade.csrf";

export async function call(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const method = (options.method || "GET").toUpperCase();
  if (!["GET", "HEAD", "OPTIONS"].includes(method)) {
    const csrf = sessionStorage.getItem(CSRF_KEY);
    if (csrf) headers.set("X-CSRF-Token", csrf);
  }
  const response = await fetch(path, { ...options, headers, credentials: "same-origin" });
  if (response.status === 401 && !path.startsWith("/auth/login")) {
    const here = window.location.pathname + window.location.search;
    window.location.assign(`/ui/login?next=${encodeURIComponent(here)}`);
    throw new Error("not signed in");
  }
  return response;
}

export async function problem(response) {
  try {
    const body = await response.json();
    return body.detail || response.statusText;
  } catch {
    return response.statusText;
  }
}

// The first value of a DICOM JSON attribute (PS3.18 F.2), as text.
export function value(item, tag) {
  const element = item[tag];
  if (!element || !element.Value || element.Value.length === 0) return "";
  const first = element.Value[0];
  if (first && typeof first === "object") {
    // A person name (PS3.18 F.2.2): its component groups as DICOM writes them, joined by "=".
    const groups = [first.Alphabetic || "", first.Ideographic || "", first.Phonetic || ""];
    while (groups.length > 1 && groups[groups.length - 1] === "") groups.pop();
    return groups.join("=");
  }
  return String(first);
}

export function values(item, tag) {
  const element = item[tag];
  return element && element.Value ? element.Value.map(String) : [];
}

export function text(node, content) {
  node.textContent = content;
  return node;
}

// The "Sign out" button of a page: ends the session and goes to the login.
export function signOutOn(button) {
  if (!button) return;
  button.addEventListener("click", async () => {
    await call("/auth/logout", { method: "POST" });
    sessionStorage.removeItem(CSRF_KEY);
    window.location.assign("/ui/login");
  });
}
