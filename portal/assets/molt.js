/* molt's portal pages: a few lines of vanilla JavaScript, none needed to read
 * a page. Times shown relative get the absolute time in the viewer's zone on
 * hover; a deployment's live log resumes after the last line it shows and
 * never shows a line twice. Loaded after htmx and before its SSE extension. */
(function () {
  "use strict";

  function ago(ms) {
    var s = Math.round((Date.now() - ms) / 1000);
    var future = s < 0;
    s = Math.abs(s);
    var text;
    if (s < 45) text = s + " s";
    else if (s < 45 * 60) text = Math.round(s / 60) + " min";
    else if (s < 36 * 3600) text = Math.round(s / 3600) + " h";
    else text = Math.round(s / 86400) + " d";
    return future ? "in " + text : text + " ago";
  }

  function times(root) {
    var all = (root || document).querySelectorAll("time[data-ms]");
    for (var i = 0; i < all.length; i++) {
      var t = all[i];
      var ms = Number(t.getAttribute("data-ms"));
      if (!ms) continue;
      var d = new Date(ms);
      t.title = d.toLocaleString(undefined, { timeZoneName: "short" });
      if (t.hasAttribute("data-relative")) t.textContent = ago(ms);
    }
  }

  // The highest event number the page's log shows.
  function lastSeen() {
    var lines = document.querySelectorAll("[data-seq]");
    var last = 0;
    for (var i = 0; i < lines.length; i++) {
      var n = Number(lines[i].getAttribute("data-seq"));
      if (n > last) last = n;
    }
    return last;
  }

  if (window.htmx) {
    // A new stream (htmx's own reconnect after a closed one) starts after
    // the last line shown; the browser's reconnects send Last-Event-ID.
    htmx.createEventSource = function (url) {
      var last = lastSeen();
      if (last > 0) url = url.replace(/([?&]after=)\d+/, "$1" + last);
      return new EventSource(url, { withCredentials: true });
    };
    document.addEventListener("htmx:sseBeforeMessage", function (e) {
      var id = e.detail && e.detail.lastEventId;
      if (id && document.getElementById("ev-" + id)) e.preventDefault();
    });
    document.addEventListener("htmx:sseMessage", function (e) {
      times(document);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    times(document);
    window.setInterval(function () { times(document); }, 30000);
  });
})();
