// The portal's only script (the pages work without it): job states follow the relay live, over one
// Server-Sent Events stream per page; the QR sheet's print button; a new token's field selects itself.
"use strict";

const FINAL = new Set(["completed", "failed", "canceled", "expired"]);

function followJobs() {
  const rows = new Map();
  for (const row of document.querySelectorAll("tr[data-job-id]")) {
    if (!FINAL.has(row.dataset.state)) rows.set(row.dataset.jobId, row);
  }
  if (rows.size === 0 || !window.EventSource) return;
  const query = [...rows.keys()].map((id) => "job=" + encodeURIComponent(id)).join("&");
  const source = new EventSource("/portal/events?" + query);
  const live = document.getElementById("live");
  source.addEventListener("open", () => (document.documentElement.dataset.live = "on"));
  source.addEventListener("state", (event) => {
    const change = JSON.parse(event.data);
    const row = rows.get(change.id);
    if (!row || row.dataset.state === change.state) return;
    row.dataset.state = change.state;
    const cell = row.querySelector("[data-role=state]");
    cell.textContent = change.state;
    cell.className = "state state-" + change.state;
    for (const form of row.querySelectorAll("form[data-when]")) {
      const applies = form.dataset.when === "held" ? change.state === "held" : !FINAL.has(change.state);
      form.hidden = !applies;
    }
    if (live) live.textContent = (row.dataset.title || "A job") + " is " + change.state + ".";
  });
  // The relay ends the stream when every job is final: no reconnecting then.
  source.addEventListener("done", () => source.close());
  source.addEventListener("reconnect", () => {
    source.close();
    followJobs();
  });
  // Refused for good (the session ended, the user was disabled): the page reloads, to the sign-in.
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) location.reload();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  followJobs();
  for (const button of document.querySelectorAll("[data-print]")) {
    button.addEventListener("click", () => window.print());
  }
  for (const field of document.querySelectorAll("input[data-select]")) {
    field.addEventListener("focus", () => field.select());
  }
});
