// The amqp-queue operator console: plain JavaScript over the operator API, no build step.
// Data from the API is only ever written with textContent, never parsed as HTML: a payload such
// as <img src=x onerror=...> is shown as the text it is.
"use strict";

const TOKEN_KEY = "amqp-queue.token";
const DEVICES_KEY = "amqp-queue.devices";
const POLL_MS = 2000;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  rights: [],
  view: "inbox",
  // null until the first poll tells whether the server lists confirmations fleet-wide
  // (GET /confirmations); false means the inbox polls the watched devices one by one.
  fleetWide: null,
  devices: JSON.parse(sessionStorage.getItem(DEVICES_KEY) || "[]"),
  device: "",
  timer: null,
};

const $ = (selector) => document.querySelector(selector);

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.detail) || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit",
    cache: "no-store",
  });
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

const may = (right) => state.rights.includes(right);
const encodeDevice = (device) => encodeURIComponent(device);

// -- rendering helpers: text only ----------------------------------------------------------

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function payloadText(command) {
  if (command.encoding === "base64") {
    const bytes = Math.floor((command.payload.length * 3) / 4) -
      (command.payload.endsWith("==") ? 2 : command.payload.endsWith("=") ? 1 : 0);
    return `base64, ${bytes} bytes: ${command.payload}`;
  }
  return command.payload;
}

function duration(ms) {
  const seconds = Math.max(0, Math.round(ms / 1000));
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
  const hours = Math.floor(seconds / 3600);
  return hours < 48 ? `${hours} h ${Math.floor((seconds % 3600) / 60)} min` : `${Math.floor(hours / 24)} d`;
}

// Age and time left are recomputed every second from the times the API gave.
function timeCells(row, command) {
  const age = cell(row, "", "age");
  age.dataset.since = command.created_at;
  const left = cell(row, "", "time-left");
  left.dataset.until = command.expires_at;
  tick(row);
}

function tick(root) {
  const now = Date.now();
  for (const td of root.querySelectorAll("[data-since]")) {
    td.textContent = duration(now - Date.parse(td.dataset.since));
  }
  for (const td of root.querySelectorAll("[data-until]")) {
    const left = Date.parse(td.dataset.until) - now;
    td.textContent = left > 0 ? duration(left) : "expired";
    td.classList.toggle("soon", left < 60000);
  }
}

function actionButton(label, className, command, action, question) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  button.className = className;
  button.addEventListener("click", async () => {
    if (!window.confirm(question)) return;
    button.disabled = true;
    try {
      await api("POST", `/commands/${encodeURIComponent(command.id)}/${action}`);
      // What was approved or cancelled leaves the list at once, not at the next poll.
      button.closest("tr").remove();
      showStatus(`${action === "confirm" ? "approved" : "cancelled"} ${command.id}`);
      refresh();
    } catch (error) {
      button.disabled = false;
      showStatus(`${action} failed: ${error.message}`, true);
    }
  });
  return button;
}

function actions(row, command) {
  const td = cell(row, "", "actions");
  if (command.requires_confirmation && !command.confirmed && may("confirm")) {
    td.appendChild(actionButton("Approve", "approve", command, "confirm",
      `Approve command ${command.id} for device ${command.device_id}?`));
  }
  if (may("operate")) {
    td.appendChild(actionButton("Cancel", "cancel", command, "cancel",
      `Cancel command ${command.id} for device ${command.device_id}?`));
  }
}

function fill(tbody, commands, columns) {
  // Rows are rebuilt only when the list changed: a poll must not swap a button under a click.
  const key = JSON.stringify(commands);
  if (tbody.dataset.key === key) return;
  tbody.dataset.key = key;
  const rows = commands.map((command) => {
    const row = document.createElement("tr");
    row.dataset.id = command.id;
    columns(row, command);
    return row;
  });
  tbody.replaceChildren(...rows);
}

function showStatus(text, isError = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

// -- the inbox ------------------------------------------------------------------------------

// Where the inbox's commands come from: GET /confirmations when the server has it, otherwise
// each watched device's GET /devices/{id}/confirmations.
async function waitingCommands() {
  if (state.fleetWide !== false) {
    try {
      const page = await api("GET", "/confirmations");
      state.fleetWide = true;
      return page.commands;
    } catch (error) {
      if (error.status !== 404) throw error;
      state.fleetWide = false;
    }
  }
  const lists = await Promise.all(state.devices.map((device) =>
    api("GET", `/devices/${encodeDevice(device)}/confirmations`)));
  return lists.flatMap((list) => list.commands)
    .sort((a, b) => Date.parse(a.created_at) - Date.parse(b.created_at));
}

async function refreshInbox() {
  const commands = await waitingCommands();
  $("#picker").hidden = state.fleetWide !== false;
  renderPicker();
  fill($("#inbox tbody"), commands, (row, command) => {
    cell(row, command.device_id, "device");
    cell(row, command.command_type || "", "type");
    cell(row, payloadText(command), "payload");
    timeCells(row, command);
    actions(row, command);
  });
  $("#inbox-empty").hidden = commands.length > 0;
}

function renderPicker() {
  const chips = state.devices.map((device) => {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip";
    chip.title = "Stop watching";
    chip.textContent = `${device} ×`;
    chip.addEventListener("click", () => {
      state.devices = state.devices.filter((d) => d !== device);
      sessionStorage.setItem(DEVICES_KEY, JSON.stringify(state.devices));
      refresh();
    });
    return chip;
  });
  $("#picker-devices").replaceChildren(...chips);
}

// -- the device view --------------------------------------------------------------------------

async function refreshDevice() {
  if (!state.device) return;
  const list = await api("GET", `/devices/${encodeDevice(state.device)}/commands`);
  fill($("#device-commands tbody"), list.commands, (row, command) => {
    cell(row, command.id, "id");
    cell(row, command.command_type || "", "type");
    cell(row, payloadText(command), "payload");
    cell(row, command.requires_confirmation && !command.confirmed ? "awaiting confirmation"
      : "pending", "state");
    timeCells(row, command);
    actions(row, command);
  });
}

// -- polling, views, sign-in -------------------------------------------------------------------

async function refresh() {
  try {
    if (state.view === "inbox") await refreshInbox();
    if (state.view === "device") await refreshDevice();
    if (!$("#status").classList.contains("error")) return;
    showStatus("");
  } catch (error) {
    if (error.status === 401) return signOut("the token was refused");
    showStatus(error.message, true);
  }
}

function showView(view) {
  state.view = view;
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = section.id !== `view-${view}`;
  }
  for (const button of document.querySelectorAll("nav [data-view]")) {
    button.classList.toggle("active", button.dataset.view === view);
  }
  refresh();
}

async function signIn(token) {
  state.token = token;
  try {
    const me = await api("GET", "/whoami");
    state.rights = me.rights;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("#who").textContent = `${me.name} (${me.role})`;
  } catch (error) {
    signOut(error.status === 401 ? "that token is not valid" : error.message);
    return;
  }
  $("#login").hidden = true;
  $("#console").hidden = false;
  $("#who").hidden = false;
  $("#sign-out").hidden = false;
  document.body.classList.toggle("read-only", !may("operate"));
  for (const element of document.querySelectorAll(".needs-operate")) {
    element.hidden = !may("operate");
  }
  showView("inbox");
  clearInterval(state.timer);
  state.timer = setInterval(refresh, POLL_MS);
}

function signOut(reason) {
  clearInterval(state.timer);
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  state.rights = [];
  $("#console").hidden = true;
  $("#who").hidden = true;
  $("#sign-out").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = reason || "";
}

async function enqueue(event) {
  event.preventDefault();
  const body = {
    payload: $("#enqueue-payload").value,
    encoding: $("#enqueue-encoding").value,
    ttl: Number($("#enqueue-ttl").value),
    mode: $("#enqueue-mode").value,
  };
  const type = $("#enqueue-type").value.trim();
  if (type) body.command_type = type;
  const device = $("#enqueue-device").value.trim();
  const result = $("#enqueue-result");
  try {
    const created = await api("POST", `/devices/${encodeDevice(device)}/commands`, body);
    result.textContent = `enqueued ${created.id} (${created.status})`;
    result.classList.remove("error");
  } catch (error) {
    result.textContent = `refused: ${error.message}`;
    result.classList.add("error");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("#token").value.trim());
    $("#token").value = "";
  });
  $("#sign-out").addEventListener("click", () => signOut(""));
  for (const button of document.querySelectorAll("nav [data-view]")) {
    button.addEventListener("click", () => showView(button.dataset.view));
  }
  $("#picker").addEventListener("submit", (event) => {
    event.preventDefault();
    const device = $("#picker-device").value.trim();
    if (device && !state.devices.includes(device)) state.devices.push(device);
    sessionStorage.setItem(DEVICES_KEY, JSON.stringify(state.devices));
    $("#picker-device").value = "";
    refresh();
  });
  $("#device-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.device = $("#device-id").value.trim();
    refresh();
  });
  $("#enqueue-form").addEventListener("submit", enqueue);
  setInterval(() => tick(document), 1000);
  if (state.token) signIn(state.token);
});
