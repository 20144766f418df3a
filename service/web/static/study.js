// Study page: acknowledge / mark read buttons (POST with the page's CSRF token, then reload).
// Plain JS, no dependencies. Part of cspine-triage (Apache-2.0).
(function () {
  "use strict";
  var csrf = document.querySelector('meta[name="csrf-token"]').content;
  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-action]");
    if (!button) { return; }
    var url = "/api/studies/" + encodeURIComponent(button.dataset.uid) + "/" + button.dataset.action +
      (button.dataset.undo ? "?undo=true" : "");
    button.disabled = true;
    fetch(url, {method: "POST", credentials: "same-origin", headers: {"X-CSRF-Token": csrf}})
      .then(function () { window.location.reload(); });
  });
})();
