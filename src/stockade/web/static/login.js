import { call, problem, CSRF_KEY } from "./api.js";

const message = document.getElementById("message");
const login = document.getElementById("login");
const change = document.getElementById("change");
let current = "";

login.addEventListener("submit", async (event) => {
  event.preventDefault();
  message.textContent = "";
  const username = document.getElementById("username").value;
  current = document.getElementById("password").value;
  const response = await call("/auth/login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ username, password: current }),
  });
  if (!response.ok) {
    message.textContent = await problem(response);
    return;
  }
  const body = await response.json();
  sessionStorage.setItem(CSRF_KEY, body.csrf_token);
  if (body.must_change) {
    login.hidden = true;
    change.hidden = false;
    message.textContent = "This password must be changed first.";
    return;
  }
  window.location.assign(next());
});

// Where to go once signed in: the page that sent the browser here (?next=), when it is a
// page of this origin's web application or OHIF; else the study list. Never elsewhere.
function next() {
  const wanted = new URLSearchParams(window.location.search).get("next") || "";
  if (!/^\/(ui|ohif)\//.test(wanted) || /[\\\s]/.test(wanted)) return "/ui/";
  const url = new URL(wanted, window.location.origin);
  if (url.origin !== window.location.origin || url.pathname === "/ui/login") return "/ui/";
  return url.pathname + url.search + url.hash;
}

change.addEventListener("submit", async (event) => {
  event.preventDefault();
  const first = document.getElementById("new-password").value;
  if (first !== document.getElementById("new-password-2").value) {
    message.textContent = "The two passwords differ.";
    return;
  }
  const response = await call("/auth/password", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ current, new: first }),
  });
  if (!response.ok) {
    message.textContent = await problem(response);
    return;
  }
  change.hidden = true;
  login.hidden = false;
  document.getElementById("password").value = "";
  message.textContent = "Password changed: sign in with the new one.";
});
