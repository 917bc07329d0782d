// Attention explorer in the manner of bertviz's "head view": plain JavaScript and SVG, no
// libraries. One item = {source_tokens, target_tokens, translation, attention: {encoder,
// decoder, cross}}, each attention kind indexed [layer][head][query][key].
"use strict";

const KINDS = {
  encoder: "encoder self-attention",
  decoder: "decoder self-attention",
  cross: "cross-attention (target → source)",
};
const HEAD_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
  "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
  "#7b4173", "#3182bd"];

// The token columns of one kind: queries on the left, keys on the right.
function columns(item, kind) {
  const src = item.source_tokens, tgt = item.target_tokens;
  if (kind === "encoder") return [src, src];
  const inputs = ["<s>"].concat(tgt.slice(0, -1)); // what the decoder reads at each step
  return kind === "decoder" ? [tgt, inputs] : [tgt, src];
}

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  select.appendChild(o);
}

function svgNode(name, attributes) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
  return node;
}

// Draw the explorer for `item` into `root` (any element); returns its state.
function renderExplorer(root, item) {
  root.innerHTML = "";
  root.classList.add("explorer");
  const bar = document.createElement("div");
  bar.className = "explorer-controls";
  const kind = document.createElement("select");
  kind.className = "kind";
  for (const [value, label] of Object.entries(KINDS)) option(kind, value, label);
  const layer = document.createElement("select");
  layer.className = "layer";
  const head = document.createElement("select");
  head.className = "head";
  const layers = item.attention.encoder.length, heads = item.attention.encoder[0].length;
  for (let l = 0; l < layers; l++) option(layer, l, "layer " + (l + 1));
  option(head, "all", "all heads");
  for (let h = 0; h < heads; h++) option(head, h, "head " + (h + 1));
  layer.value = layers - 1;
  head.value = "0";
  for (const [label, select] of [["attention", kind], ["", layer], ["", head]]) {
    if (label) bar.appendChild(document.createTextNode(label + " "));
    bar.appendChild(select);
  }
  root.appendChild(bar);
  const figure = document.createElement("div");
  figure.className = "explorer-figure";
  root.appendChild(figure);
  const draw = () => drawHeadView(figure, item, kind.value, Number(layer.value),
    head.value === "all" ? null : Number(head.value));
  for (const select of [kind, layer, head]) select.addEventListener("change", draw);
  draw();
  return {kind, layer, head, redraw: draw};
}

// Two token columns and one line per (query, key) pair and head, its opacity the weight.
function drawHeadView(figure, item, kind, layer, head) {
  const [left, right] = columns(item, kind);
  const weights = item.attention[kind][layer]; // [head][query][key]
  const heads = head === null ? [...weights.keys()] : [head];
  const rowHeight = 22, width = 460, x1 = 150, x2 = 310;
  const height = rowHeight * Math.max(left.length, right.length) + 10;
  const svg = svgNode("svg", {width, height, class: "head-view", "data-kind": kind});
  const lines = svgNode("g", {class: "lines"});
  svg.appendChild(lines);
  const y = (i) => 14 + i * rowHeight;
  for (const h of heads) {
    const colour = head === null ? HEAD_COLOURS[h % HEAD_COLOURS.length] : "#1f5fbf";
    weights[h].forEach((row, i) => row.forEach((w, j) => {
      lines.appendChild(svgNode("line", {
        x1, y1: y(i) - 4, x2, y2: y(j) - 4, stroke: colour,
        "stroke-width": 2, "stroke-opacity": Math.min(1, w),
        class: "attn", "data-query": i, "data-key": j, "data-head": h,
      }));
    }));
  }
  const label = (text, i, side) => {
    const t = svgNode("text", {
      x: side === "left" ? x1 - 8 : x2 + 8, y: y(i), "text-anchor": side === "left" ? "end" : "start",
      class: "token " + side, "data-index": i,
    });
    t.textContent = text;
    const attr = side === "left" ? "data-query" : "data-key";
    t.addEventListener("mouseenter", () => {
      svg.classList.add("focused");
      for (const line of lines.children) line.classList.toggle("lit", line.getAttribute(attr) === String(i));
      t.classList.add("lit");
    });
    t.addEventListener("mouseleave", () => {
      svg.classList.remove("focused");
      for (const line of lines.children) line.classList.remove("lit");
      t.classList.remove("lit");
    });
    svg.appendChild(t);
  };
  left.forEach((text, i) => label(text, i, "left"));
  right.forEach((text, j) => label(text, j, "right"));
  figure.innerHTML = "";
  figure.appendChild(svg);
}

if (typeof module !== "undefined") module.exports = {renderExplorer, columns};
