// The rollout page's live figures: asks the console for the page's live part every few
// seconds and swaps it in. The page works without it (its Refresh link does the same), so
// any failure (logged out, offline, a 403 or 404) simply stops the polling.
(function () {
  "use strict";
  var box = document.getElementById("live");
  if (!box || !window.fetch) {
    return;
  }
  var url = box.getAttribute("data-live-url");
  var every = parseInt(box.getAttribute("data-every-ms"), 10) || 5000;

  function finished() {
    // A completed or cancelled rollout changes no more.
    return box.querySelector("[data-final]") !== null;
  }

  function poll() {
    fetch(url, {credentials: "same-origin", redirect: "manual", cache: "no-store"})
      .then(function (answer) {
        // A redirect is the login page (the session ended): never swap that in.
        if (answer.type === "opaqueredirect" || !answer.ok) {
          throw new Error("stopped: " + answer.status);
        }
        return answer.text();
      })
      .then(function (html) {
        box.innerHTML = html;
        if (!finished()) {
          window.setTimeout(poll, every);
        }
      })
      .catch(function () {});
  }

  if (!finished()) {
    window.setTimeout(poll, every);
  }
})();
