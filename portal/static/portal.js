// Progressive enhancement only: every page works without this file.
"use strict";

// Confirmation before destructive actions: forms that carry data-confirm.
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form.getAttribute && form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

// Live progress on a job's page, from the job's event stream; the page reloads once the job
// has ended, to show its outputs.
document.addEventListener("DOMContentLoaded", function () {
  var live = document.getElementById("live");
  if (!live || !window.EventSource) {
    return;
  }
  var status = document.getElementById("job-status");
  var stage = document.getElementById("job-stage");
  var bar = document.getElementById("job-progress");
  var source = new EventSource(live.getAttribute("data-events"));
  function show(data) {
    if (data.status && status) {
      status.textContent = data.status;
      status.className = "status-" + data.status;
    }
    if (data.stage !== undefined && stage) {
      stage.textContent = data.stage || "";
    }
    if (typeof data.progress === "number" && bar) {
      bar.value = data.progress;
    }
  }
  source.addEventListener("status", function (e) { show(JSON.parse(e.data)); });
  source.addEventListener("progress", function (e) { show(JSON.parse(e.data)); });
  source.addEventListener("job", function (e) {
    show(JSON.parse(e.data));
    source.close();
    window.location.reload();
  });
  source.onerror = function () { source.close(); };
});
