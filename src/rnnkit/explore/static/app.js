// rnnkit explore: the page. Charts are plotly.js (shipped by the plotly Python package, served
// or inlined by the explorer: no network). Only a window of WINDOW steps is drawn at a time, so
// a 20,000-symbol input costs no more to show than a short one; statistics over the whole input
// (sorting, saturation) are one pass over a Float32Array.
"use strict";

const R = window.RNNKIT;
const WINDOW = 400; // steps drawn at once (text and heat map)
const MAX_UNITS_SHOWN = 512; // heat-map rows; wider layers show the first after sorting
const MAX_TREE_WORDS = 150; // leaves written under a drawn parse tree (hover shows every node)

const state = {analysis: null, cache: new Map(), trace: 0, quantity: "h", unit: 0, start: 0,
               selected: 0, renders: 0};

const $ = (id) => document.getElementById(id);

// the steps of the chosen trace: the input's symbols, or a decoder's output symbols
function symbolsOf() { return state.analysis.traces[state.trace].symbols; }

// a number as text; a NaN/inf the server sent as null reads "NaN", never breaks the page
function fmt(value, digits) { return value === null || value === undefined ? "NaN" : value.toFixed(digits); }

function message(text) { $("message").textContent = text || ""; }
function status(text) { $("status").textContent = text || ""; }

// --- values --------------------------------------------------------------------------------
function decodeBase64(text) {
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  return new Float32Array(bytes.buffer);
}

async function values(trace, quantity) {
  const key = `${trace}/${quantity}`;
  if (!state.cache.has(key)) {
    let array;
    if (R.embedded) {
      array = decodeBase64(R.embedded.values[key]);
    } else {
      const response = await fetch(`api/values/${state.analysis.id}/${trace}/${quantity}`);
      if (!response.ok) throw new Error((await response.json()).error);
      array = new Float32Array(await response.arrayBuffer());
    }
    state.cache.set(key, array);
  }
  return state.cache.get(key);
}

// --- input ---------------------------------------------------------------------------------
async function post(input) {
  const response = await fetch("api/analyse", {method: "POST",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify({input})});
  let body;
  try { body = await response.json(); } catch (e) { body = {error: `the server answered ${response.status}`}; }
  if (!response.ok || body.error) throw new Error(body.error || `the server answered ${response.status}`);
  return body;
}

function show(analysis) {
  state.analysis = analysis;
  state.cache = new Map();
  state.start = 0;
  state.selected = 0;
  const traces = $("trace");
  traces.innerHTML = "";
  analysis.traces.forEach((t) => traces.add(new Option(`${t.name} (${t.kind}, ${t.hidden} units)`, t.index)));
  state.trace = Math.min(state.trace, analysis.traces.length - 1);
  traces.value = state.trace;
  fillQuantities();
  $("text").classList.toggle("words", analysis.task !== "charlm");
  if (!$("input").value && R.input !== "wav") $("input").value = analysis.text;
  return render();
}

function fillQuantities() {
  const trace = state.analysis.traces[state.trace];
  const select = $("quantity");
  select.innerHTML = "";
  trace.quantities.forEach((q) => select.add(new Option(q.label, q.name)));
  if (!trace.quantities.some((q) => q.name === state.quantity)) state.quantity = "h";
  select.value = state.quantity;
  $("unit").max = trace.hidden - 1;
  state.unit = Math.min(state.unit, trace.hidden - 1);
  $("unit").value = state.unit;
}

// --- colours -------------------------------------------------------------------------------
// f1, f2: a Tree-LSTM's per-child forget gates; a: the kept fraction of minGRU / minLSTM
const GATE_LIKE = new Set(["i", "f", "o", "z", "r", "f1", "f2", "a"]);

function colour(value, scale, gate) {
  if (!Number.isFinite(value)) return "rgb(255, 230, 0)"; // NaN/inf shown, not hidden
  if (gate) return `rgba(30, 90, 220, ${Math.min(1, Math.max(0, value)).toFixed(3)})`;
  const a = Math.min(1, Math.abs(value) / scale).toFixed(3);
  return value >= 0 ? `rgba(30, 90, 220, ${a})` : `rgba(220, 40, 40, ${a})`;
}

function unitScale(array, hidden, unit) {
  let top = 0;
  for (let t = unit; t < array.length; t += hidden) {
    const v = Math.abs(array[t]);
    if (Number.isFinite(v) && v > top) top = v;
  }
  return top > 1 ? top : 1; // h, g, n live in [-1, 1]; c can grow past it
}

// --- patterns and sorting ------------------------------------------------------------------
function pattern(kind, symbols) {
  const out = new Float64Array(symbols.length);
  if (kind === "position") {
    let column = 0;
    const words = state.analysis.task !== "charlm";
    symbols.forEach((s, t) => { out[t] = words ? t : column; column = s === "\n" ? 0 : column + 1; });
  } else if (kind === "quotes") {
    let open = null;
    symbols.forEach((s, t) => {
      const quote = s === '"' || s === "'";
      if (quote && open === null) open = s; else if (quote && s === open) open = null;
      out[t] = open !== null || quote ? 1 : 0;
    });
  } else {
    const source = $("regex").value;
    let regex;
    try { regex = new RegExp(source, "gu"); } catch (e) { throw new Error(`bad regex: ${e.message}`); }
    if (!source) throw new Error("type a regex for the pattern");
    const joiner = state.analysis.task === "charlm" ? "" : " ";
    const owner = []; // character offset -> step
    symbols.forEach((s, t) => { for (let k = 0; k < s.length + (t ? joiner.length : 0); k++) owner.push(t); });
    const text = symbols.join(joiner);
    for (const match of text.matchAll(regex)) {
      for (let k = match.index; k < match.index + Math.max(1, match[0].length); k++) {
        if (k < owner.length) out[owner[k]] = 1;
      }
      if (match[0].length === 0) regex.lastIndex++;
    }
  }
  return out;
}

function unitOrder(array, steps, hidden) {
  const kind = $("sort").value;
  const order = [...Array(hidden).keys()];
  if (kind === "index") { $("sort-info").textContent = ""; return order; }
  const mean = new Float64Array(hidden), score = new Float64Array(hidden);
  for (let t = 0; t < steps; t++) for (let u = 0; u < hidden; u++) mean[u] += array[t * hidden + u] / steps;
  if (kind === "variance") {
    for (let t = 0; t < steps; t++) for (let u = 0; u < hidden; u++) {
      const d = array[t * hidden + u] - mean[u]; score[u] += d * d / steps;
    }
  } else {
    const p = pattern($("pattern").value, symbolsOf());
    let pm = 0; p.forEach((v) => { pm += v / steps; });
    const cov = new Float64Array(hidden), vu = new Float64Array(hidden);
    let vp = 0;
    for (let t = 0; t < steps; t++) {
      const dp = p[t] - pm; vp += dp * dp;
      for (let u = 0; u < hidden; u++) {
        const d = array[t * hidden + u] - mean[u]; cov[u] += d * dp; vu[u] += d * d;
      }
    }
    for (let u = 0; u < hidden; u++) score[u] = vp > 0 && vu[u] > 0 ? cov[u] / Math.sqrt(vp * vu[u]) : 0;
  }
  order.sort((a, b) => Math.abs(score[b]) - Math.abs(score[a]));
  const best = order[0];
  $("sort-info").textContent = `top unit ${best}: ${kind === "variance" ? "variance" : "correlation"} ${score[best].toFixed(3)}`;
  return order;
}

// --- drawing -------------------------------------------------------------------------------
function drawText(array, trace) {
  const symbols = symbolsOf();
  const hidden = trace.hidden, unit = state.unit;
  const gate = GATE_LIKE.has(state.quantity);
  const scale = unitScale(array, hidden, unit);
  const end = Math.min(symbols.length, state.start + WINDOW);
  const preds = state.analysis.predictions;
  const box = $("text");
  const fragment = document.createDocumentFragment();
  for (let t = state.start; t < end; t++) {
    const span = document.createElement("span");
    const value = array[t * hidden + unit];
    span.className = "sym" + (t === state.selected ? " selected" : "");
    span.dataset.t = t;
    span.dataset.value = String(value);
    span.style.backgroundColor = colour(value, scale, gate);
    span.title = `step ${t} ${JSON.stringify(symbols[t])}: ${state.quantity}[${unit}] = ${value.toFixed(4)}`;
    span.textContent = symbols[t] === "\n" ? "↵\n" : symbols[t];
    if (preds.kind === "tags" && trace.module === "rnn") {
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = preds.decoded[t];
      span.appendChild(tag);
    }
    fragment.appendChild(span);
  }
  box.replaceChildren(fragment);
  $("window-info").textContent = `steps ${state.start}–${end - 1} of ${symbols.length}`;
}

function drawHeatmap(array, trace) {
  const steps = trace.steps, hidden = trace.hidden;
  const order = unitOrder(array, steps, hidden).slice(0, MAX_UNITS_SHOWN);
  const end = Math.min(steps, state.start + WINDOW);
  const x = [...Array(end - state.start).keys()].map((k) => k + state.start);
  const z = order.map((u) => x.map((t) => array[t * hidden + u]));
  const gate = GATE_LIKE.has(state.quantity);
  Plotly.react("heatmap", [{type: "heatmap", z, x, y: order.map((u) => `unit ${u}`),
    colorscale: gate ? "Blues" : "RdBu", reversescale: !gate, zmid: gate ? undefined : 0,
    hovertemplate: "step %{x}, %{y}: %{z:.4f}<extra></extra>"}],
    {margin: {l: 70, r: 10, t: 10, b: 40}, xaxis: {title: {text: "step"}},
     yaxis: {autorange: "reversed", type: "category"}}, {responsive: true});
  const series = x.map((t) => array[t * hidden + state.unit]);
  Plotly.react("series", [{x, y: series, mode: "lines", name: `${state.quantity}[${state.unit}]`}],
    {margin: {l: 50, r: 10, t: 10, b: 40}, xaxis: {title: {text: "step"}},
     yaxis: {title: {text: `${state.quantity}[${state.unit}]`}}}, {responsive: true});
}

async function drawSaturation(trace) {
  const traces = [];
  for (const gate of trace.gates) {
    const array = await values(state.trace, gate);
    const steps = trace.steps, hidden = trace.hidden;
    const low = new Float64Array(hidden), high = new Float64Array(hidden);
    // over the steps where the gate exists: a Tree-LSTM node without a second child has no f2
    // (recorded as NaN at every unit); a NaN the model computed still counts as neither
    let counted = 0;
    for (let t = 0; t < steps; t++) {
      let absent = true;
      for (let u = 0; u < hidden && absent; u++) absent = Number.isNaN(array[t * hidden + u]);
      if (absent && trace.kind === "treelstm") continue;
      counted += 1;
      for (let u = 0; u < hidden; u++) {
        const v = array[t * hidden + u];
        if (v < 0.1) low[u] += 1; else if (v > 0.9) high[u] += 1;
      }
    }
    for (let u = 0; u < hidden; u++) { low[u] /= counted || 1; high[u] /= counted || 1; }
    traces.push({x: Array.from(low), y: Array.from(high), mode: "markers", name: `${gate} gate`,
      text: [...Array(hidden).keys()].map((u) => `unit ${u}`), type: "scatter",
      hovertemplate: "%{text}: <0.1 %{x:.2f}, >0.9 %{y:.2f}<extra></extra>"});
  }
  // (a note beside the chart, never inside it: emptying plotly's div would break its redraws)
  $("saturation-note").textContent = traces.length ? "" : "this cell has no gates (Elman RNN)";
  if (!traces.length) { Plotly.purge("saturation"); return; }
  Plotly.react("saturation", traces, {margin: {l: 50, r: 10, t: 10, b: 80},
    xaxis: {title: {text: "fraction of steps with the gate < 0.1"}, range: [-0.02, 1.02]},
    yaxis: {title: {text: "fraction of steps > 0.9"}, range: [-0.02, 1.02]},
    legend: {orientation: "h", y: -0.32}}, {responsive: true});
}

function drawPredictions() {
  const p = state.analysis.predictions, symbols = symbolsOf();
  const t = Math.min(state.selected, symbols.length - 1);
  $("step").textContent = `${t} (${JSON.stringify(symbols[t])})`;
  let bars = null, text = "", range = [0, 1], axis = "probability";
  if (p.kind === "next_symbol") {
    const names = p.top_ids[t].map((i) => JSON.stringify(p.vocabulary[i]));
    bars = {x: p.top_probs[t], y: names, type: "bar", orientation: "h"};
    const actual = p.actual_next[t];
    text = t === symbols.length - 1 ? "last symbol: nothing follows" :
      `next symbol ${JSON.stringify(symbols[t + 1])} had probability ${fmt(actual, 4)}`;
  } else if (p.kind === "tags") {
    const row = p.probabilities[t];
    const top = [...row.keys()].sort((a, b) => (row[b] ?? -1) - (row[a] ?? -1)).slice(0, 5);
    bars = {x: top.map((k) => row[k]), y: top.map((k) => p.tags[k]), type: "bar", orientation: "h"};
    text = `decoded tag ${p.decoded[t]}; bars: ${p.how}`;
    if (p.intents) {
      const best = p.intent_probabilities.indexOf(Math.max(...p.intent_probabilities));
      text += `; intent ${p.intents[best]} (${fmt(p.intent_probabilities[best], 3)})`;
    }
  } else if (p.kind === "classes") {
    const k = nearestPrefix(p.steps, t);
    const row = p.probabilities[k];
    bars = {x: row, y: p.labels, type: "bar", orientation: "h"};
    const best = row.indexOf(Math.max(...row));
    text = `had the input ended at step ${p.steps[k]}: ${p.labels[best]} (${fmt(row[best], 3)})`;
    const final = p.final.indexOf(Math.max(...p.final));
    text += `; whole input: ${p.labels[final]} (${fmt(p.final[final], 3)})`;
    if (p.reference !== undefined) text += `; true label ${p.reference}`;
  } else if (p.kind === "pitches") {
    bars = {x: p.top_probs[t], y: p.top_ids[t].map((i) => p.vocabulary[i]), type: "bar", orientation: "h"};
    text = t === symbols.length - 1 ? "last frame: nothing follows" :
      `the next frame cost ${fmt(p.nll[t], 3)} nats; bars: the likeliest pitches of the next frame`;
  } else if (p.kind === "attention") {
    const decoder = state.analysis.traces[state.trace].module === "decoder";
    if (decoder) {
      bars = {x: p.top_probs[t], y: p.top_ids[t].map((i) => JSON.stringify(p.vocabulary[i])), type: "bar", orientation: "h"};
      text = `output step ${t} wrote ${JSON.stringify(p.output[t])}; translation: ${p.translation}`;
    } else if (p.attention) {
      bars = {x: p.attention.map((row) => row[t]), y: p.output.map((o, k) => `${k}: ${JSON.stringify(o)}`), type: "bar", orientation: "h"};
      text = `attention each output step paid to source symbol ${t}; translation: ${p.translation}`;
    } else {
      text = `translation: ${p.translation} (this model has no attention)`;
    }
  } else if (p.kind === "adding") {
    const k = nearestPrefix(p.steps, t);
    const shown = [p.prefix[k], p.seen[k], p.prediction, p.target];
    bars = {x: shown, type: "bar", orientation: "h",
      y: [`ended at ${p.steps[k]}`, "marked so far", "final answer", "target"]};
    const finite = shown.filter(Number.isFinite);
    range = [Math.min(0, ...finite) - 0.05, Math.max(2, ...finite)];
    axis = "value";
    text = `step ${t} ${p.marks.includes(t) ? "is marked" : "is not marked"}; ∂ŷ/∂value = ` +
      `${fmt(p.saliency_value[t], 5)}, ∂ŷ/∂marker = ${fmt(p.saliency_marker[t], 5)}; marks at ` +
      `steps ${p.marks.join(" and ")}; final answer ${fmt(p.prediction, 4)}, target ${fmt(p.target, 4)}`;
  } else if (p.kind === "copy") {
    const row = p.probabilities[t];
    bars = {x: row, y: p.vocabulary.map((v) => JSON.stringify(v)), type: "bar", orientation: "h"};
    const best = row.indexOf(Math.max(...row));
    text = `step ${t} reads ${JSON.stringify(symbols[t])}; target ${JSON.stringify(p.targets[t])}; ` +
      `likeliest output ${JSON.stringify(p.vocabulary[best])} (${fmt(row[best], 3)}); recall ` +
      `phase (steps ${p.recall_start}–${symbols.length - 1}) copied ${p.copied}, ${p.correct} of ` +
      `${symbols.length - p.recall_start} right`;
  } else if (p.kind === "tree") {
    const row = p.probabilities[t], node = p.nodes[t];
    bars = {x: row, y: p.labels, type: "bar", orientation: "h"};
    const best = row.indexOf(Math.max(...row));
    text = `node ${t} ${JSON.stringify(node.phrase)}: ${p.labels[best]} (${fmt(row[best], 3)})` +
      (node.reference ? `; SST label ${node.reference}` : "") + `; bars: ${p.how}`;
  } else if (p.kind === "ctc") {
    const row = p.posteriors[t];
    bars = {x: row, y: p.labels, type: "bar", orientation: "h"};
    text = `decoded: ${p.decoded || "(nothing)"}; labels emitted at steps ${p.frames.join(", ")}`;
  }
  $("prediction-text").textContent = text;
  drawTimeline();
  if (bars) {
    Plotly.react("predictions", [bars], {margin: {l: 120, r: 10, t: 10, b: 40},
      xaxis: {title: {text: axis}, range},
      // category: labels such as "2" or "7" are names, not positions on a number line
      yaxis: {autorange: "reversed", type: "category"}},
      {responsive: true});
  }
}

function nearestPrefix(steps, t) {
  let best = 0;
  steps.forEach((s, k) => { if (Math.abs(s - t) < Math.abs(steps[best] - t)) best = k; });
  return best;
}

// the task's predictions along time, for the steps on screen: class probabilities of every
// prefix (classifiers), CTC posteriors (speech), p(actual next symbol) (language models)
function drawTimeline() {
  const p = state.analysis.predictions, box = $("timeline");
  const end = Math.min(symbolsOf().length, state.start + WINDOW);
  const inWindow = (t) => t >= state.start && t < end;
  let traces = null, layout = {};
  if (p.kind === "classes") {
    const keep = p.steps.map((s, k) => k).filter((k) => inWindow(p.steps[k]));
    traces = p.labels.map((label, c) => ({x: keep.map((k) => p.steps[k]),
      y: keep.map((k) => p.probabilities[k][c]), mode: "lines+markers", name: label}));
    layout = {yaxis: {title: {text: "class probability"}, range: [0, 1]}};
  } else if (p.kind === "ctc" || p.kind === "copy") {
    const x = [...Array(end - state.start).keys()].map((k) => k + state.start);
    const [labels, rows] = p.kind === "ctc" ? [p.labels, p.posteriors] : [p.vocabulary, p.probabilities];
    traces = [{type: "heatmap", x, y: labels, z: labels.map((_, c) => x.map((t) => rows[t][c])),
      colorscale: "Greys", reversescale: true, zmin: 0, zmax: 1}];
    layout = {yaxis: {title: {text: p.kind === "ctc" ? "CTC posterior" : "output distribution"},
      type: "category"}};
  } else if (p.kind === "adding") {
    traces = [{x: p.steps, y: p.prefix, mode: "lines", name: "answer had it ended here"},
      {x: p.steps, y: p.seen, mode: "lines", name: "marked values read so far", line: {dash: "dot"}}];
    layout = {yaxis: {title: {text: "value"}}, xaxis: {title: {text: "step"}, range: [state.start, end - 1]},
      legend: {orientation: "h", y: -0.3}};
  } else if (p.kind === "attention" && p.attention) {
    traces = [{type: "heatmap", z: p.attention, x: p.source.map((s, k) => `${k}: ${s}`),
      y: p.output.map((o, k) => `${k}: ${o}`), colorscale: "Viridis", zmin: 0, zmax: 1}];
    layout = {yaxis: {autorange: "reversed", title: {text: "output"}}, xaxis: {title: {text: "source"}}};
  } else if (p.kind === "pitches") {
    const x = [...Array(end - state.start).keys()].map((k) => k + state.start);
    traces = [{x, y: x.map((t) => p.nll[t]), mode: "lines", name: "NLL of the next frame"}];
    layout = {yaxis: {title: {text: "NLL (nats)"}}};
  } else if (p.kind === "next_symbol") {
    const x = [...Array(end - state.start).keys()].map((k) => k + state.start);
    traces = [{x, y: x.map((t) => p.actual_next[t]), mode: "lines", name: "p(next symbol)"}];
    layout = {yaxis: {title: {text: "p(actual next)"}, range: [0, 1]}};
  }
  box.hidden = !traces;
  if (!traces) return;
  Plotly.react("timeline", traces, {margin: {l: 90, r: 10, t: 10, b: 40},
    xaxis: {title: {text: "step"}}, ...layout}, {responsive: true});
}

// the charts of one task beside the common ones: what its model is for, drawn as a person wants
// to see it (adding: what the answer depends on; copy memory: the recall phase and its memory)
function drawTaskCharts(array, trace) {
  const p = state.analysis.predictions, section = $("task-section");
  const charts = {adding: addingCharts, copy: copyCharts, tree: treeCharts}[p.kind];
  section.hidden = !charts;
  $("tree-controls").hidden = p.kind !== "tree";
  if (!charts) return;
  const [title, note, a, b, c] = charts(p, array, trace);
  $("task-title").textContent = title;
  $("task-note").textContent = note;
  $("task-b").hidden = !b;
  const base = {margin: {l: 110, r: 10, t: 30, b: 50}};
  $("task-a").style.height = a.layout.height ? `${a.layout.height}px` : ""; // the tree is taller
  Plotly.react("task-a", a.data, {...base, ...a.layout}, {responsive: true});
  watchTreeClicks();
  if (b) Plotly.react("task-b", b.data, {...base, ...b.layout}, {responsive: true});
  else Plotly.purge("task-b");
  $("task-c").hidden = !c;
  if (c) Plotly.react("task-c", c.data, {...base, ...c.layout}, {responsive: true});
  else Plotly.purge("task-c");
}

// the parse tree as a person draws it: leaves in reading order along the bottom, each inner
// node above the middle of its children, one level up from its highest child
function treeLayout(nodes) {
  const x = [], y = [];
  let leaf = 0;
  nodes.forEach((node, k) => { // children come before their parent
    if (!node.children.length) { x[k] = leaf++; y[k] = 0; return; }
    x[k] = node.children.reduce((sum, c) => sum + x[c], 0) / node.children.length;
    y[k] = 1 + Math.max(...node.children.map((c) => y[c]));
  });
  return [x, y];
}

function treeCharts(p, array, trace) {
  const nodes = p.nodes, [x, y] = treeLayout(nodes);
  const bySentiment = $("tree-colour").value === "sentiment";
  const last = p.labels.length - 1;
  // the colour of a node: the chosen unit's value, or the predicted sentiment as a score in
  // [0, 1] (binary: P(positive); fine: the expected label / 4)
  const colourOf = (k) => bySentiment ? p.probabilities[k].reduce((s, q, c) => s + q * c, 0) / last
    : array[k * trace.hidden + state.unit];
  const edges = {x: [], y: []};
  nodes.forEach((node, k) => node.children.forEach((c) => {
    edges.x.push(x[k], x[c], null); edges.y.push(y[k], y[c], null);
  }));
  const shown = [], absent = [];
  nodes.forEach((_, k) => (Number.isNaN(colourOf(k)) ? absent : shown).push(k));
  const describe = (k) => {
    const row = p.probabilities[k], best = row.indexOf(Math.max(...row));
    return `${nodes[k].phrase}<br>${bySentiment ? "" : `${state.quantity}[${state.unit}] = ` +
      `${fmt(colourOf(k), 4)}<br>`}predicted ${p.labels[best]} (${fmt(row[best], 3)})` +
      (nodes[k].reference ? `<br>SST label ${nodes[k].reference}` : "");
  };
  const gate = !bySentiment && GATE_LIKE.has(state.quantity);
  const scale = bySentiment ? 1 : unitScale(array, trace.hidden, state.unit);
  const data = [
    {x: edges.x, y: edges.y, mode: "lines", line: {color: "#aaa"}, hoverinfo: "skip", showlegend: false},
    {x: shown.map((k) => x[k]), y: shown.map((k) => y[k]), customdata: shown, mode: "markers",
     name: bySentiment ? "predicted sentiment" : `${state.quantity}[${state.unit}]`,
     text: shown.map(describe), hovertemplate: "%{text}<extra></extra>", showlegend: false,
     marker: {size: 16, color: shown.map(colourOf), line: {color: "#333", width: 1},
              colorscale: gate ? "Blues" : "RdBu", reversescale: true, showscale: true,
              cmin: gate || bySentiment ? 0 : -scale, cmax: gate || bySentiment ? 1 : scale,
              colorbar: {title: {text: bySentiment ? "negative → positive" : state.quantity}}}}];
  if (absent.length) {
    data.push({x: absent.map((k) => x[k]), y: absent.map((k) => y[k]), customdata: absent,
      mode: "markers", name: "no such child (leaf)", text: absent.map(describe),
      hovertemplate: "%{text}<extra></extra>", marker: {size: 12, color: "#ddd", line: {color: "#999", width: 1}}});
  }
  // the words under the leaves, while they fit (a long plain input makes a tree of thousands)
  const leaves = nodes.filter((node) => node.word).length;
  const words = leaves > MAX_TREE_WORDS ? [] : nodes.map((node, k) => [node, k]).filter(([node]) => node.word).map(([node, k]) => ({
    x: x[k], y: 0, yshift: -14, text: node.phrase, showarrow: false, textangle: -40,
    xanchor: "right", yanchor: "top", font: {size: 12}}));
  const chosen = state.selected < nodes.length ? [{x: x[state.selected], y: y[state.selected],
    text: "▼", showarrow: false, yshift: 16}] : [];
  const rootRow = p.probabilities[p.root], best = rootRow.indexOf(Math.max(...rootRow));
  return ["The parse tree",
    `${nodes.length} nodes, computed from the leaves up; the sentence (root): ${p.labels[best]} ` +
    `(${fmt(rootRow[best], 3)})` + (nodes[p.root].reference ? `, SST label ${nodes[p.root].reference}` : "") +
    (p.labelled ? "" : " — plain words are read as a right-branching tree; paste an SST bracketed tree for a real parse") +
    (leaves > MAX_TREE_WORDS ? ` (${leaves} words: too many to write under the tree; hover a node)` : ""),
    {data, layout: {height: 480, margin: {l: 20, r: 10, t: 20, b: 110}, hovermode: "closest",
      annotations: [...words, ...chosen], xaxis: {visible: false},
      yaxis: {visible: false, range: [-0.6, Math.max(...y) + 0.6]}, legend: {orientation: "h"}}},
    null];
}

function addingCharts(p) {
  const steps = p.saliency_value.map((_, t) => t);
  const marks = p.marks.map((t) => ({type: "line", x0: t, x1: t, yref: "paper", y0: 0, y1: 1,
    line: {color: "rgba(220, 40, 40, 0.5)", dash: "dot"}}));
  return ["What the final answer depends on",
    `∂ŷ/∂x_t of the final answer ŷ = ${fmt(p.prediction, 4)} (target ${fmt(p.target, 4)}) to ` +
    `each step's value and marker; dotted: the marked steps ${p.marks.join(", ")}. A model that ` +
    "has learnt the task has ∂ŷ/∂value ≈ 1 at the two marks and ≈ 0 elsewhere. Right: how much " +
    "of each marked value the top layer's state h_t still holds at every later step (exact " +
    "forward-mode derivative); to answer, it must carry the first one to the end.",
    {data: [{x: steps, y: p.saliency_value, type: "bar", name: "∂ŷ/∂value_t"},
            {x: steps, y: p.saliency_marker, type: "bar", name: "∂ŷ/∂marker_t"}],
     layout: {barmode: "group", shapes: marks, xaxis: {title: {text: "step"}},
              yaxis: {title: {text: "gradient"}}, title: {text: "saliency of every step"},
              legend: {orientation: "h", y: -0.25}}},
    p.carried && {data: p.carried.map((row, k) => ({x: steps, y: row, mode: "lines",
      name: `marked value at step ${p.marks[k]}`})),
     layout: {shapes: marks, xaxis: {title: {text: "step t"}},
              yaxis: {type: "log", title: {text: "‖∂h_t / ∂value‖"}, exponentformat: "power"},
              title: {text: "how the state carries each marked value"},
              legend: {orientation: "h", y: -0.25}}}];
}

function copyCharts(p) {
  const start = p.recall_start, count = p.memory.length;
  const recall = [...Array(count).keys()].map((k) => `${start + k}: copy ${p.targets[start + k]}`);
  return ["The recall phase",
    `copied ${p.copied} for ${p.targets.slice(start).join("")}: ${p.correct} of ${count} right ` +
    `(mean loss over all steps ${fmt(p.loss, 4)}). Left: the output distribution of each recall ` +
    "step. Right: the memory — how strongly log p(the right digit) at each recall step depends " +
    "on the input at each digit step (gradient norm); copying reads digit k at recall step k. " +
    "Below: how much the state at each step still depends on each digit (the change of h_t " +
    "when that digit is replaced, averaged over the other seven; dotted: the recall starts).",
    {data: [{type: "heatmap", z: p.probabilities.slice(start), x: p.vocabulary, y: recall,
             colorscale: "Greys", reversescale: true, zmin: 0, zmax: 1,
             hovertemplate: "%{y}: p(%{x}) = %{z:.3f}<extra></extra>"}],
     layout: {title: {text: "output distribution"}, xaxis: {type: "category", title: {text: "output"}},
              yaxis: {autorange: "reversed", type: "category"}}},
    {data: [{type: "heatmap", z: p.memory, x: [...Array(count).keys()].map((j) => `${j}: ${p.targets[start + j]}`),
             y: recall, colorscale: "Viridis",
             hovertemplate: "%{y} ← input %{x}: %{z:.3g}<extra></extra>"}],
     layout: {title: {text: "memory: |∂ log p / ∂ input|"}, xaxis: {type: "category", title: {text: "input digit step"}},
              yaxis: {autorange: "reversed", type: "category"}}},
    {data: p.held.map((row, j) => ({x: row.map((_, t) => t), y: row, mode: "lines",
       name: `digit ${j}: ${p.targets[start + j]}`})),
     layout: {title: {text: "what the state still holds of each digit: ‖h_t(digit changed) − h_t‖"},
              xaxis: {title: {text: "step t"}}, legend: {orientation: "h", y: -0.25},
              yaxis: {type: "log", title: {text: "‖Δh_t‖"}, exponentformat: "power"},
              shapes: [{type: "line", x0: start, x1: start, yref: "paper", y0: 0, y1: 1,
                        line: {color: "rgba(220, 40, 40, 0.5)", dash: "dot"}}]}}];
}

async function render() {
  if (!state.analysis) return;
  const trace = state.analysis.traces[state.trace];
  status("drawing…");
  try {
    const array = await values(state.trace, state.quantity);
    drawText(array, trace);
    drawHeatmap(array, trace);
    await drawSaturation(trace);
    drawPredictions();
    drawTaskCharts(array, trace);
    message("");
  } catch (error) {
    message(error.message);
  }
  state.renders += 1;
  document.body.dataset.renders = state.renders; // the browser test waits on this
  status(`${symbolsOf().length} steps`);
}

// --- events --------------------------------------------------------------------------------
function setStart(value) {
  const steps = state.analysis ? symbolsOf().length : 0;
  state.start = Math.max(0, Math.min(Math.max(0, steps - 1), Math.floor(value) || 0));
  $("start").value = state.start;
  render();
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

$("input-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (R.embedded) { message("this is a saved page: run `rnnkit explore RUN` to try other inputs"); return; }
  if (R.input === "wav") {
    const file = $("wav").files[0];
    if (!file) { message("choose a WAV file first"); return; }
    status("running the model…");
    try { await show(await post(await readFile(file))); } catch (error) { message(error.message); status(""); }
    return;
  }
  const text = $("input").value;
  if ([...text].length > R.maxSymbols) { message(`the input is longer than ${R.maxSymbols} symbols`); return; }
  status("running the model…");
  try { await show(await post(text)); } catch (error) { message(error.message); status(""); }
});
$("trace").addEventListener("change", () => {
  state.trace = Number($("trace").value);
  fillQuantities();
  setStart(state.start); // another trace may have fewer steps (encoder vs decoder)
});
$("quantity").addEventListener("change", () => { state.quantity = $("quantity").value; render(); });
$("unit").addEventListener("change", () => {
  const hidden = state.analysis.traces[state.trace].hidden;
  const unit = Number($("unit").value);
  if (!Number.isInteger(unit) || unit < 0 || unit >= hidden) { message(`unit must be 0…${hidden - 1}`); return; }
  state.unit = unit; render();
});
$("start").addEventListener("change", () => setStart(Number($("start").value)));
$("prev").addEventListener("click", () => setStart(state.start - WINDOW));
$("next").addEventListener("click", () => setStart(state.start + WINDOW));
for (const id of ["sort", "pattern"]) $(id).addEventListener("change", render);
$("regex").addEventListener("change", render);
function select(t) {
  state.selected = t;
  document.querySelectorAll(".sym.selected").forEach((s) => s.classList.remove("selected"));
  document.querySelector(`.sym[data-t="${t}"]`)?.classList.add("selected");
  drawPredictions();
}
$("text").addEventListener("click", (event) => {
  const span = event.target.closest(".sym");
  if (span) select(Number(span.dataset.t));
});
$("tree-colour").addEventListener("change", render);
// a click on a tree node selects it (plotly gives the point; customdata is the node's step)
function watchTreeClicks() {
  const chart = $("task-a");
  if (chart.on && !chart.dataset.clicks) {
    chart.dataset.clicks = "1";
    chart.on("plotly_click", (event) => {
      const point = event.points[0];
      if (state.analysis.predictions.kind === "tree" && point.customdata !== undefined) {
        select(point.customdata);
        render();
      }
    });
  }
}

async function start() {
  $("run").textContent = `${R.task} · ${R.run}`;
  if (R.input === "wav") { $("input").hidden = true; $("wav").hidden = false; }
  if (R.input === "example") $("input").placeholder = "the number of a test example";
  if (R.embedded) { $("input").value = R.embedded.text; await show(R.embedded); return; }
  status("running the model on a validation example…");
  try {
    const response = await fetch("api/default");
    const body = await response.json();
    if (!response.ok) throw new Error(body.error);
    await show(body);
  } catch (error) { message(error.message); status(""); }
}
start();
