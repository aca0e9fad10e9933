/* Draws the 24-hour charts from the JSON the page carries (no request of its own). */
(function () {
  "use strict";
  var source = document.getElementById("chart-data");
  if (!source || typeof uPlot === "undefined") { return; }
  var data = JSON.parse(source.textContent);
  var colors = ["#0969da", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a3069", "#57606a"];

  function draw(id, values) {
    var target = document.getElementById(id);
    if (!target || data.jobs.length === 0) { return; }
    var series = [{}];
    data.jobs.forEach(function (name, i) {
      series.push({ label: name, stroke: colors[i % colors.length], width: 2, spanGaps: true });
    });
    var options = {
      width: Math.max(target.clientWidth, 320),
      height: 220,
      series: series,
      scales: { x: { time: true } },
      axes: [{}, { size: 60 }],
      legend: { live: true }
    };
    new uPlot(options, [data.times].concat(values), target);
  }

  draw("chart-pending", data.pending);
  draw("chart-done", data.done);
})();
