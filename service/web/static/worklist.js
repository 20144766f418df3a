// Worklist: waiting times tick every second; the list is fetched again when the server's
// stamp changes (polling; the stamp carries no patient data); acknowledge / mark read.
// Plain JS, no dependencies. Part of cspine-triage (Apache-2.0).
(function () {
  "use strict";
  var table = document.getElementById("worklist");
  if (!table) { return; }
  var csrf = document.querySelector('meta[name="csrf-token"]').content;
  var pollMs = parseInt(table.dataset.pollMs, 10) || 3000;
  var stamp = null;
  var liveText = document.getElementById("live-text");
  var liveDot = document.getElementById("live-dot");

  function fmt(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    var h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    if (h) { return h + " h " + (m < 10 ? "0" : "") + m + " min " + (s < 10 ? "0" : "") + s + " s"; }
    if (m) { return m + " min " + (s < 10 ? "0" : "") + s + " s"; }
    return s + " s";
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll("td.waiting[data-since]").forEach(function (cell) {
      var since = Date.parse(cell.dataset.since);
      if (!isNaN(since)) { cell.textContent = fmt((now - since) / 1000); }
    });
  }
  function toLogin() { window.location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search); }
  function refreshRows() {
    return fetch(table.dataset.rowsUrl, {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (r) {
        if (r.status === 401) { toLogin(); throw new Error("logged out"); }
        if (!r.ok) { throw new Error("rows " + r.status); }
        return r.text();
      })
      .then(function (html) { document.getElementById("rows").innerHTML = html; tick(); });
  }
  function poll() {
    fetch(table.dataset.stampUrl, {credentials: "same-origin"})
      .then(function (r) {
        if (r.status === 401) { toLogin(); throw new Error("logged out"); }
        if (!r.ok) { throw new Error("stamp " + r.status); }
        return r.json();
      })
      .then(function (body) {
        liveDot.className = "dot ok";
        liveText.textContent = "live: checked " + new Date().toLocaleTimeString();
        if (stamp !== null && body.stamp !== stamp) { stamp = body.stamp; return refreshRows(); }
        stamp = body.stamp;
      })
      .catch(function () { liveDot.className = "dot down"; liveText.textContent = "not updating: server unreachable"; })
      .then(function () { window.setTimeout(poll, pollMs); });
  }
  table.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-action]");
    if (!button) { return; }
    var url = "/api/studies/" + encodeURIComponent(button.dataset.uid) + "/" + button.dataset.action +
      (button.dataset.undo ? "?undo=true" : "");
    button.disabled = true;
    fetch(url, {method: "POST", credentials: "same-origin", headers: {"X-CSRF-Token": csrf}})
      .then(function (r) { if (r.status === 401) { toLogin(); } return refreshRows(); })
      .catch(function () { button.disabled = false; });
  });
  tick();
  window.setInterval(tick, 1000);
  poll();
})();
