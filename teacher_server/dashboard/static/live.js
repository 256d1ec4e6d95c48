// logitfuse dashboard: live jobs table and cancel confirmation. The page works without this script;
// with it, the tables under [data-refresh] are re-fetched from the server every 2 s (server-rendered
// HTML fragments, so there is one renderer) while the tab is visible.
(function () {
  "use strict";
  function confirmCancels(root) {
    root.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (ev) {
        if (!window.confirm(form.getAttribute("data-confirm"))) { ev.preventDefault(); }
      });
    });
  }
  function keepFocus(box, html) {
    var active = document.activeElement;
    var key = active && box.contains(active) && active.closest("form") ? active.closest("form").action : null;
    box.innerHTML = html;
    confirmCancels(box);
    if (key) {
      var again = box.querySelector('form[action="' + new URL(key).pathname + '"] button');
      if (again) { again.focus(); }
    }
  }
  function poll(box) {
    var url = box.getAttribute("data-refresh");
    function tick() {
      if (document.hidden) { return; }
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) { if (html !== null) { keepFocus(box, html); } })
        .catch(function () { /* the server is restarting: try again on the next tick */ });
    }
    window.setInterval(tick, 2000);
  }
  confirmCancels(document);
  document.querySelectorAll("[data-refresh]").forEach(poll);
})();
