// The amqp-queue operator console: plain JavaScript over the operator API, no build step.
// Data from the API is only ever written with textContent, never parsed as HTML: a payload such
// as <img src=x onerror=...> is shown as the text it is.
"use strict";

const TOKEN_KEY = "amqp-queue.token";
const DEVICES_KEY = "amqp-queue.devices";
const POLL_MS = 2000;
// A read that takes longer is given up: refreshes run one at a time, and one that never ended
// would stop the page's polling.
const READ_TIMEOUT_MS = 10000;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  rights: [],
  view: "inbox",
  // null until the first poll tells whether the server lists confirmations fleet-wide
  // (GET /confirmations); false means the inbox polls the watched devices one by one.
  fleetWide: null,
  devices: JSON.parse(sessionStorage.getItem(DEVICES_KEY) || "[]"),
  device: "",
  command: "",
  // How many devices the device list shows: "More devices" asks the next page.
  devicePages: 1,
  timer: null,
  refreshing: false,
  refreshAgain: false,
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
    // Only reads: an approve given up on here may still land on the server.
    signal: method === "GET" ? AbortSignal.timeout(READ_TIMEOUT_MS) : undefined,
  });
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

const may = (right) => state.rights.includes(right);
const encodeDevice = (device) => encodeURIComponent(device);

// -- the inbox ------------------------------------------------------------------------------

// Where the inbox's commands come from: GET /confirmations when the server has it, otherwise
// each watched device's GET /devices/{id}/confirmations.
async function waitingCommands() {
  if (state.fleetWide !== false) {
    try {
      const page = await api("GET", "/confirmations?limit=500");
      state.fleetWide = true;
      // Age and time left are left out: the page counts them from the times itself, and a
      // list that changed at every poll would rebuild its rows (and buttons) every time.
      return page.commands.map(({ age_seconds, time_left_seconds, ...entry }) => ({
        ...entry,
        payload: entry.payload_preview,
        requires_confirmation: true,
        confirmed: false,
      }));
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
    cell(row, command.enqueued_by || "", "enqueued-by");
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

async function refreshDeviceList() {
  const devices = [];
  let next = null;
  for (let page = 0; page < state.devicePages; page += 1) {
    const query = next === null ? "" : `&after=${encodeURIComponent(next)}`;
    const answer = await api("GET", `/devices?limit=100${query}`);
    devices.push(...answer.devices);
    next = answer.next;
    if (next === null) break;
  }
  $("#devices-more").hidden = next === null;
  fill($("#devices tbody"), devices, (row, device) => {
    const td = cell(row, "", "device");
    const link = document.createElement("a");
    link.href = "#";
    link.textContent = device.device_id;
    link.addEventListener("click", (event) => {
      event.preventDefault();
      $("#device-id").value = device.device_id;
      state.device = device.device_id;
      refresh();
    });
    td.appendChild(link);
    cell(row, String(device.counts.pending), "pending");
    cell(row, String(device.counts.awaiting_confirmation), "awaiting");
  });
}

async function refreshDevice() {
  await refreshDeviceList();
  if (!state.device) return;
  const path = `/devices/${encodeDevice(state.device)}`;
  const [list, history] = await Promise.all([
    api("GET", `${path}/commands`), api("GET", `${path}/history?limit=100`)]);
  fill($("#device-history tbody"), history.commands, (row, command) => {
    commandLink(row, command);
    cell(row, command.command_type || "", "type");
    cell(row, command.status.replace("_", " "), "status");
    cell(row, when(command.created_at), "created");
    cell(row, when(command.ended_at), "ended");
    cell(row, command.enqueued_by || "", "enqueued-by");
  });
  fill($("#device-commands tbody"), list.commands, (row, command) => {
    commandLink(row, command);
    cell(row, command.command_type || "", "type");
    cell(row, payloadText(command), "payload");
    cell(row, command.requires_confirmation && !command.confirmed ? "awaiting confirmation"
      : "pending", "state");
    timeCells(row, command);
    actions(row, command);
  });
}

// -- the command view: its record as a timeline -------------------------------------------------

function timeline(record) {
  const by = (name) => (name ? ` by ${name}` : "");
  const steps = [[record.created_at, `enqueued${by(record.enqueued_by)}`]];
  if (record.confirmed_at) steps.push([record.confirmed_at, `confirmed${by(record.confirmed_by)}`]);
  if (record.published_at) steps.push([record.published_at, "published to the broker"]);
  if (record.delivered_at) steps.push([record.delivered_at, "delivered"]);
  if (record.end_reason) {
    const who = record.end_reason === "cancelled" ? by(record.cancelled_by) : "";
    steps.push([record.ended_at, `${record.end_reason}${who}`]);
  }
  if (record.outcome_at) steps.push([record.outcome_at, `outcome: ${record.status}`]);
  return steps.sort((a, b) => Date.parse(a[0]) - Date.parse(b[0]));
}

async function refreshCommand() {
  if (!state.command) return;
  const record = await api("GET", `/commands/${encodeURIComponent(state.command)}`);
  $("#command-id").textContent = record.id;
  const facts = [
    ["device", record.device_id], ["type", record.command_type || "(plain)"],
    ["status", record.status], ["payload", payloadText(record)],
    ["expires", when(record.expires_at)],
  ];
  const key = JSON.stringify(record);
  if ($("#command-facts").dataset.key === key) return;
  $("#command-facts").dataset.key = key;
  $("#command-facts").replaceChildren(...facts.flatMap(([name, value]) => {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dd.className = name;
    return [dt, dd];
  }));
  $("#command-timeline").replaceChildren(...timeline(record).map(([time, what]) => {
    const li = document.createElement("li");
    li.textContent = `${when(time)}: ${what}`;
    return li;
  }));
}

// -- polling, views, sign-in -------------------------------------------------------------------

// One refresh at a time, and one asked for meanwhile runs once after it: two overlapping, the
// older answer (asked before an approve or cancel) could land last and bring the command back
// until the next poll.
async function refresh() {
  if (state.refreshing) {
    state.refreshAgain = true;
    return;
  }
  state.refreshing = true;
  try {
    do {
      state.refreshAgain = false;
      await refreshOnce();
    } while (state.refreshAgain);
  } finally {
    state.refreshing = false;
  }
}

async function refreshOnce() {
  try {
    if (state.view === "inbox") await refreshInbox();
    if (state.view === "device") await refreshDevice();
    if (state.view === "command") await refreshCommand();
    const status = $("#status");
    if (!status.classList.contains("error") || status.dataset.sticky) return;
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
  $("nav [data-view=command]").hidden = !state.command;
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
  $("#devices-more").addEventListener("click", () => {
    state.devicePages += 1;
    refresh();
  });
  setInterval(() => tick(document), 1000);
  if (state.token) signIn(state.token);
});
