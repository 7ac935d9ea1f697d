// The worklist's only script: draw the ROI box on a slice, and show times locally.
// The box is sent in displayed pixels with the displayed size; the server turns it into
// the ROI in image pixels (worklist/roi.py), so zooming the page changes nothing.
"use strict";

function setupDrawing() {
  const figures = Array.from(document.querySelectorAll(".slice.drawable"));
  const boxField = document.getElementById("roi_box");
  const viewField = document.getElementById("roi_view");
  if (!figures.length || !boxField) return;
  let start = null;
  let image = null;

  function point(event, img) {
    const rect = img.getBoundingClientRect();
    const x = Math.min(Math.max(event.clientX - rect.left, 0), rect.width);
    const y = Math.min(Math.max(event.clientY - rect.top, 0), rect.height);
    return { x: x, y: y, width: rect.width, height: rect.height };
  }

  function show(a, b) {
    // The same box, in fractions of the image, on every phase.
    for (const figure of figures) {
      const img = figure.querySelector("img");
      const box = figure.querySelector(".box");
      const w = img.clientWidth / a.width, h = img.clientHeight / a.height;
      box.style.left = Math.min(a.x, b.x) * w + "px";
      box.style.top = Math.min(a.y, b.y) * h + "px";
      box.style.width = Math.abs(b.x - a.x) * w + "px";
      box.style.height = Math.abs(b.y - a.y) * h + "px";
      box.hidden = false;
    }
  }

  for (const figure of figures) {
    const img = figure.querySelector("img");
    img.addEventListener("mousedown", function (event) {
      event.preventDefault();
      image = img;
      start = point(event, img);
    });
  }
  document.addEventListener("mousemove", function (event) {
    if (start) show(start, point(event, image));
  });
  document.addEventListener("mouseup", function (event) {
    if (!start) return;
    const end = point(event, image);
    show(start, end);
    boxField.value = [start.x, start.y, end.x, end.y].join(",");
    viewField.value = [start.width, start.height].join(",");
    start = null;
  });
}

function showTimes() {
  for (const cell of document.querySelectorAll(".when[data-epoch]")) {
    const when = new Date(parseFloat(cell.dataset.epoch) * 1000);
    cell.textContent = when.toLocaleString();
  }
}

setupDrawing();
showTimes();
