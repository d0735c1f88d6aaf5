// Batches: progressive enhancement only. Without this file the upload form posts as a plain
// multipart form and the batch page refreshes itself; with it, photos can be dropped, each photo
// gets its own mask and interior frame inputs, and progress is followed live.
"use strict";

(function () {
  var EXTRAS = [
    { role: "mask", field: "masks", label: "Mask for " },
    { role: "interior", field: "interiors", label: "Interior frame for " }
  ];
  // Browsers open few connections per server; event streams beyond this many wait their turn.
  var MAX_STREAMS = 4;

  function stem(name) {
    var dot = name.lastIndexOf(".");
    return dot > 0 ? name.slice(0, dot) : name;
  }

  function extension(name) {
    var dot = name.lastIndexOf(".");
    return dot > 0 ? name.slice(dot) : "";
  }

  // --- the upload form ---------------------------------------------------------------------

  function setupForm(form) {
    var photos = document.getElementById("b-photos");
    var operation = document.getElementById("b-operation");
    var zone = document.getElementById("dropzone");
    var chosen = document.getElementById("chosen");
    var hint = zone.querySelector(".drop-hint");
    if (!photos || !operation || !window.DataTransfer) {
      return;
    }
    hint.hidden = false;
    zone.classList.add("enhanced");

    function accepted() {
      var option = operation.options[operation.selectedIndex];
      return (option.getAttribute("data-inputs") || "").split(" ");
    }

    function showParams() {
      var name = operation.value;
      var sets = form.querySelectorAll("fieldset.params");
      for (var i = 0; i < sets.length; i++) {
        sets[i].hidden = sets[i].getAttribute("data-operation") !== name;
      }
      var inputs = accepted();
      var slots = chosen.querySelectorAll("[data-role]");
      for (var j = 0; j < slots.length; j++) {
        slots[j].hidden = inputs.indexOf(slots[j].getAttribute("data-role")) < 0;
      }
    }

    function listPhotos() {
      chosen.textContent = "";
      var inputs = accepted();
      for (var i = 0; i < photos.files.length; i++) {
        var file = photos.files[i];
        var li = document.createElement("li");
        var name = document.createElement("span");
        name.className = "mono";
        name.textContent = file.name + " (" + Math.ceil(file.size / 1024) + " KB)";
        li.appendChild(name);
        if (!/\.zip$/i.test(file.name)) {
          EXTRAS.forEach(function (extra) {
            var slot = document.createElement("div");
            slot.className = "slot";
            slot.setAttribute("data-role", extra.role);
            slot.hidden = inputs.indexOf(extra.role) < 0;
            var id = "slot-" + extra.role + "-" + i;
            var label = document.createElement("label");
            label.setAttribute("for", id);
            label.textContent = extra.label + file.name;
            var input = document.createElement("input");
            input.type = "file";
            input.id = id;
            input.accept = "image/png,image/jpeg,image/webp";
            input.setAttribute("data-photo", file.name);
            input.setAttribute("data-field", extra.field);
            slot.appendChild(label);
            slot.appendChild(input);
            li.appendChild(slot);
          });
        }
        chosen.appendChild(li);
      }
    }

    function addFiles(files) {
      var all = new DataTransfer();
      var seen = {};
      var i;
      for (i = 0; i < photos.files.length; i++) {
        all.items.add(photos.files[i]);
        seen[photos.files[i].name] = true;
      }
      for (i = 0; i < files.length; i++) {
        if (!seen[files[i].name]) {
          all.items.add(files[i]);
        }
      }
      photos.files = all.files;
      listPhotos();
    }

    zone.addEventListener("dragover", function (event) {
      event.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", function () { zone.classList.remove("over"); });
    zone.addEventListener("drop", function (event) {
      event.preventDefault();
      zone.classList.remove("over");
      if (event.dataTransfer && event.dataTransfer.files.length) {
        addFiles(event.dataTransfer.files);
      }
    });
    photos.addEventListener("change", listPhotos);
    operation.addEventListener("change", showParams);

    // A mask or interior frame chosen beside a photo is sent as the form's own inputs send
    // them: named after the photo, so the server pairs them.
    form.addEventListener("submit", function () {
      var bulk = {};
      EXTRAS.forEach(function (extra) {
        var input = document.getElementById("b-" + extra.field);
        var list = new DataTransfer();
        for (var i = 0; i < input.files.length; i++) {
          list.items.add(input.files[i]);
        }
        bulk[extra.field] = { input: input, list: list, used: false };
      });
      var slots = chosen.querySelectorAll("input[type=file][data-photo]");
      for (var i = 0; i < slots.length; i++) {
        var slot = slots[i];
        if (!slot.files.length || slot.parentNode.hidden) {
          continue;
        }
        var file = slot.files[0];
        var target = bulk[slot.getAttribute("data-field")];
        target.list.items.add(
          new File([file], stem(slot.getAttribute("data-photo")) + extension(file.name), {
            type: file.type
          })
        );
        target.used = true;
      }
      Object.keys(bulk).forEach(function (field) {
        if (bulk[field].used) {
          bulk[field].input.files = bulk[field].list.files;
        }
      });
    });

    showParams();
    listPhotos();
  }

  // --- live progress on a batch's page -----------------------------------------------------

  function setupBatch(batch) {
    if (batch.getAttribute("data-ended") === "true" || !window.EventSource || !window.fetch) {
      return;
    }
    // The page refreshes itself for browsers without scripts; this one follows events instead.
    var summaryUrl = batch.getAttribute("data-summary");
    var waiting = Array.prototype.slice.call(document.querySelectorAll("li.item[data-events]"));
    var open = 0;
    var reloading = false;

    function show(item, data) {
      var status = item.querySelector(".item-status");
      var bar = item.querySelector(".item-progress");
      var stage = item.querySelector(".item-stage");
      if (data.status) {
        status.textContent = data.status;
        status.className = "item-status status-" + data.status;
        item.setAttribute("data-status", data.status);
      }
      if (typeof data.progress === "number") {
        bar.value = data.progress;
      }
      if (data.stage !== undefined) {
        stage.textContent = data.stage || "";
      }
    }

    function showSummary(summary) {
      var status = document.getElementById("batch-status");
      status.textContent = summary.status;
      status.className = "status-" + summary.status;
      document.getElementById("batch-progress").value = summary.progress;
      document.getElementById("batch-percent").textContent =
        Math.round(summary.progress * 100) + "%";
      document.getElementById("batch-eta").textContent =
        summary.eta ? Math.round(summary.eta.seconds) + " s" : "–";
      var counts = document.getElementById("batch-counts");
      counts.textContent = "";
      Object.keys(summary.counts).forEach(function (name) {
        if (name === "items" || !summary.counts[name]) {
          return;
        }
        var span = document.createElement("span");
        span.className = "count status-" + name;
        span.setAttribute("data-count", name);
        span.textContent = name + " " + summary.counts[name];
        counts.appendChild(span);
        counts.appendChild(document.createTextNode(" "));
      });
      if ((summary.status === "completed" || summary.status === "canceled") && !reloading) {
        // Every item has ended: the page again, now with every result beside its input.
        reloading = true;
        window.location.reload();
      }
    }

    function refresh() {
      return fetch(summaryUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (summary) { if (summary) { showSummary(summary); } })
        .catch(function () { return null; });
    }

    function follow(item) {
      open += 1;
      var source = new EventSource(item.getAttribute("data-events"));
      var done = false;
      function finish() {
        if (done) {
          return;
        }
        done = true;
        source.close();
        open -= 1;
        next();
        refresh();
      }
      source.addEventListener("status", function (e) { show(item, JSON.parse(e.data)); });
      source.addEventListener("progress", function (e) { show(item, JSON.parse(e.data)); });
      source.addEventListener("job", function (e) {
        show(item, JSON.parse(e.data));
        finish();
      });
      source.onerror = finish;
    }

    function next() {
      while (open < MAX_STREAMS && waiting.length) {
        follow(waiting.shift());
      }
    }

    next();
    refresh();
    // Items not yet followed, and a batch whose last item ended unseen, still show up.
    window.setInterval(refresh, 5000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("batch-form");
    if (form) {
      setupForm(form);
    }
    var batch = document.getElementById("batch");
    if (batch) {
      setupBatch(batch);
    }
  });
})();
