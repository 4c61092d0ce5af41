// fedcare dashboards: poll the page's live fragment and JSON, draw curves with uPlot.
// Every value is inserted as server-escaped HTML (Jinja2 autoescape) or as chart data.
"use strict";

const fedcareCharts = {};
// rounds are whole numbers: the x axis' tick steps (uPlot's default steps include 0.2)
const fedcareRoundSteps = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

function fedcareColour(i, n) {
  return "hsl(" + Math.round((360 * i) / Math.max(n, 1)) + ", 65%, 42%)";
}

// Draw (or update) the chart in element `id`: x = rounds, one line per entry of `lines`
// ({label: [values]}), plus `extra` lines ({label, values, stroke, dash}).
function fedcareDraw(id, rounds, lines, extra) {
  const el = document.getElementById(id);
  if (!el) return;
  const names = Object.keys(lines).sort();
  const series = [{ label: "round" }];
  const data = [rounds];
  names.forEach(function (name, i) {
    series.push({ label: name, stroke: fedcareColour(i, names.length), width: 1.5, spanGaps: true });
    data.push(lines[name]);
  });
  (extra || []).forEach(function (line) {
    series.push({ label: line.label, stroke: line.stroke, width: 2, dash: line.dash, spanGaps: true });
    data.push(line.values);
  });
  el.dataset.series = String(series.length - 1);
  el.dataset.points = String(rounds.length);
  const key = series.map(function (s) { return s.label; }).join("\u0000");
  const old = fedcareCharts[id];
  if (old && old.key === key) {
    old.plot.setData(data);
    return;
  }
  if (old) old.plot.destroy();
  const opts = {
    width: Math.max(320, el.clientWidth || 600), height: 220, series: series,
    scales: { x: { time: false } }, legend: { show: names.length <= 12 },
    axes: [{ label: "round", incrs: fedcareRoundSteps }, {}],
  };
  fedcareCharts[id] = { key: key, plot: new uPlot(opts, data, el) };
}

function fedcareCurves(c) {
  const n = c.rounds.length;
  const eps = [];
  if (c.target_epsilon !== null) {
    eps.push({ label: "target ε", values: c.rounds.map(function () { return c.target_epsilon; }),
               stroke: "#000", dash: [6, 4] });
  }
  fedcareDraw("chart-epsilon", c.rounds, c.epsilon, eps);
  const pooled = c.pooled_auroc.some(function (v) { return v !== null; })
    ? [{ label: "pooled", values: c.pooled_auroc, stroke: "#000", dash: [] }] : [];
  fedcareDraw("chart-auroc", c.rounds, c.auroc, pooled);
  fedcareDraw("chart-loss", c.rounds, c.loss, []);
  document.getElementById("charts").dataset.rounds = String(n);
}

// Replace the element #live with the server's fragment (escaped HTML), keeping open <details>.
async function fedcareRefresh(url) {
  const live = document.getElementById("live");
  const open = Array.from(live.querySelectorAll("details[open] > summary"))
    .map(function (s) { return s.textContent; });
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (!response.ok) return false;
  live.innerHTML = await response.text();
  live.querySelectorAll("details > summary").forEach(function (s) {
    if (open.indexOf(s.textContent) >= 0) s.parentElement.open = true;
  });
  return true;
}

function fedcareCoordinator() {
  const chosen = new URLSearchParams(location.search).get("run");
  const query = chosen ? "?run=" + encodeURIComponent(chosen) : "";
  let first = true;  // the page came with its fragment: draw the curves at once
  async function tick() {
    let delay = 1000;
    try {
      if (!first) await fedcareRefresh("/fragment" + query);
      first = false;
      const root = document.getElementById("live-root");
      if (root && root.dataset.run) {
        const r = await fetch("/api/run/" + encodeURIComponent(root.dataset.run),
                              { credentials: "same-origin", cache: "no-store" });
        if (r.ok) fedcareCurves((await r.json()).curves);
        if (root.dataset.status === "finished") delay = 5000;
      }
    } catch (e) {
      document.body.dataset.error = String(e);
    }
    setTimeout(tick, delay);
  }
  tick();
}

// Show only the rows of table `tableId` whose text contains the search box's words.
function fedcareSearch(inputId, tableId) {
  const input = document.getElementById(inputId);
  const table = document.getElementById(tableId);
  if (!input || !table) return;
  input.addEventListener("input", function () {
    const words = input.value.toLowerCase().split(/\s+/).filter(Boolean);
    let shown = 0;
    table.querySelectorAll("tbody tr").forEach(function (row) {
      const text = row.textContent.toLowerCase();
      const match = words.every(function (w) { return text.indexOf(w) >= 0; });
      row.hidden = !match;
      if (match) shown += 1;
    });
    table.dataset.shown = String(shown);
  });
}
