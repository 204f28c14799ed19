// trainq's web UI: draws the charts of a run, a sweep and a comparison with uPlot from the JSON
// block the server put in the page, and appends a run's new points from its event stream.
// window.trainqLive says what has arrived (the browser tests and the UI benchmark read it).
(function () {
  "use strict";
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#17becf"];
  window.trainqLive = { points: 0, lastPointAt: 0, lastStep: {}, charts: 0, state: null };

  function data(id) {
    const el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  function chart(root, title, labels, columns, bands) {
    const div = document.createElement("div");
    div.className = "chart";
    div.dataset.metric = title;
    root.appendChild(div);
    const series = [{ label: "step" }].concat(labels.map((l, i) => ({
      label: l, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
    })));
    const opts = {
      title: title, width: 560, height: 280, scales: { x: { time: false } }, series: series,
    };
    if (bands) opts.bands = bands;
    const plot = new uPlot(opts, columns, div);
    window.trainqLive.charts += 1;
    return plot;
  }

  // One x axis for several [step, value] lists: the union of their steps, nulls elsewhere.
  function align(lists) {
    const steps = Array.from(new Set(lists.flatMap(l => l.map(p => p[0])))).sort((a, b) => a - b);
    const index = new Map(steps.map((s, i) => [s, i]));
    const cols = lists.map(l => {
      const c = new Array(steps.length).fill(null);
      for (const p of l) c[index.get(p[0])] = p[1];
      return c;
    });
    return [steps].concat(cols);
  }

  function run(d) {
    const root = document.getElementById("charts");
    const series = d.series;
    const charts = {};
    const draw = name => {
      const pts = series[name];
      const cols = [pts.map(p => p[0]), pts.map(p => p[1])];
      if (charts[name]) charts[name].setData(cols);
      else charts[name] = chart(root, name, [name], cols);
    };
    Object.keys(series).sort().forEach(draw);
    if (!d.live || typeof EventSource === "undefined") return;
    const es = new EventSource(d.events);
    es.addEventListener("points", ev => {
      const touched = new Set();
      for (const p of JSON.parse(ev.data)) {
        const s = series[p.name] || (series[p.name] = []);
        // The page and the stream may both hold a point stored while the page was built.
        if (s.length && s[s.length - 1][0] >= p.step) continue;
        s.push([p.step, p.value]);
        // Keep the chart as light as the server's downsampling: drop every other old point.
        if (s.length > 2 * d.max_points) series[p.name] = s.filter((_, i) => i % 2 === 0 || i === s.length - 1);
        touched.add(p.name);
        window.trainqLive.lastStep[p.name] = p.step;
        window.trainqLive.points += 1;
      }
      touched.forEach(draw);
      if (touched.size) window.trainqLive.lastPointAt = Date.now();
    });
    es.addEventListener("job", ev => {
      const j = JSON.parse(ev.data);
      window.trainqLive.state = j.state;
      const el = document.getElementById("state");
      if (el) { el.textContent = j.state; el.className = "state " + j.state; }
      if (j.terminal) es.close();
    });
    es.addEventListener("end", () => es.close());
  }

  function sweep(d) {
    if (!d.curves.length) return;
    const root = document.getElementById("sweep-charts");
    const lists = [];
    const labels = [];
    d.curves.forEach(c => {
      labels.push(c.arm + " mean");
      lists.push(c.points.map(p => [p[0], p[1]]));
    });
    // The ± 1 sd band of each arm, as two more series filled between.
    const bands = [];
    d.curves.forEach((c, i) => {
      if (!c.points.every(p => p[2] !== null)) return;
      labels.push(c.arm + " +sd", c.arm + " -sd");
      lists.push(c.points.map(p => [p[0], p[1] + p[2]]), c.points.map(p => [p[0], p[1] - p[2]]));
      bands.push({ series: [lists.length - 1, lists.length], fill: COLORS[i % COLORS.length] + "22" });
    });
    chart(root, d.metric, labels, align(lists), bands);
  }

  function compare(d) {
    if (!d.metric || !d.runs.length) return;
    chart(document.getElementById("compare-charts"), d.metric, d.runs.map(r => r.label),
      align(d.runs.map(r => r.points)));
  }

  const r = data("run-data"); if (r) run(r);
  const s = data("sweep-data"); if (s) sweep(s);
  const c = data("compare-data"); if (c) compare(c);
})();
