// The console's rendering helpers: rows, cells and buttons built from API data, written as
// text only (textContent), never parsed as HTML. Loaded before app.js, whose state, api and
// may they call when a view is drawn.
"use strict";

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function payloadText(command) {
  const shown = Math.floor((command.payload.length * 3) / 4) -
    (command.payload.endsWith("==") ? 2 : command.payload.endsWith("=") ? 1 : 0);
  // The inbox lists a preview: its payload_bytes says how long the whole payload is.
  const bytes = command.payload_bytes === undefined ? shown : command.payload_bytes;
  const cut = command.encoding === "base64" ? bytes > shown
    : bytes > new TextEncoder().encode(command.payload).length;
  const more = cut ? "…" : "";
  if (command.encoding === "base64") return `base64, ${bytes} bytes: ${command.payload}${more}`;
  return command.payload + more;
}

// A command's id as a link to its timeline (the command view).
function commandLink(row, command) {
  const td = cell(row, "", "id");
  const link = document.createElement("a");
  link.href = "#";
  link.className = "command-link";
  link.textContent = command.id;
  link.addEventListener("click", (event) => {
    event.preventDefault();
    state.command = command.id;
    showView("command");
  });
  td.appendChild(link);
}

const when = (time) => (time ? new Date(time).toLocaleString() : "");

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
      // A refusal (a four-eyes self-approval, a role's limit) stays on screen until the next
      // action: the next poll must not wipe it before the operator has read it.
      showStatus(`${action} failed: ${error.message}`, true, true);
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

function showStatus(text, isError = false, sticky = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", isError);
  status.dataset.sticky = sticky ? "yes" : "";
}
