"use strict";
const ROWS = JSON.parse(document.getElementById("rows").textContent);
const PAGE = 500;  // rows added to the table at a time: the DOM stays small however many features there are
const body = document.querySelector("#features tbody");
const heads = Array.from(document.querySelectorAll("#features th"));
const filterBox = document.getElementById("filter"), minFreq = document.getElementById("minfreq"),
      minMcs = document.getElementById("minmcs"), minCtx = document.getElementById("minctx"), count = document.getElementById("count"),
      more = document.getElementById("more");
let sortKey = "freq", sortDir = -1, view = ROWS, shown = 0;

function esc(s) {
  return String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
}
function fmt(x, digits) { return x === null ? "–" : Number(x).toPrecision(digits); }
for (const r of ROWS) {
  r.text = (r.id + " " + r.lens.join(" ") + " " + r.snip.pre + r.snip.hit + r.snip.post).toLowerCase();
  r.snipText = r.snip.pre + r.snip.hit + r.snip.post;
}
function rowHtml(r) {
  return '<tr><td class="num"><a href="features/' + r.id + '.html">' + r.id + "</a></td>" +
    '<td class="num">' + fmt(r.freq, 3) + '</td><td class="num">' + fmt(r.max, 4) + "</td>" +
    '<td class="num">' + fmt(r.mcs, 3) + '</td><td class="num">' + fmt(r.ctx, 2) + "</td><td>" +
    r.lens.map(t => '<span class="chip">' + esc(t) + "</span>").join("") + "</td>" +
    '<td class="snip" title="' + esc(r.snipText) + '">' + esc(r.snip.pre) + "<mark>" + esc(r.snip.hit) +
    "</mark>" + esc(r.snip.post) + "</td></tr>";
}
function compare(a, b) {
  let x = a[sortKey], y = b[sortKey];
  if (sortKey === "lens") { x = a.lens.join(" "); y = b.lens.join(" "); }
  if (sortKey === "snip") { x = a.snipText; y = b.snipText; }
  if (x === null || y === null) return (x === null) - (y === null);  // missing values last either way
  return (x < y ? -1 : x > y ? 1 : a.id - b.id) * sortDir;
}
function showMore() {
  const next = view.slice(shown, shown + PAGE);
  body.insertAdjacentHTML("beforeend", next.map(rowHtml).join(""));
  shown += next.length;
  count.textContent = "showing " + shown + " of " + view.length + " matching (" + ROWS.length + " features)";
  more.hidden = shown >= view.length;
}
function update() {
  const q = filterBox.value.trim().toLowerCase();
  const f = parseFloat(minFreq.value), m = parseFloat(minMcs.value), c = parseFloat(minCtx.value);
  view = ROWS.filter(r => (!q || r.text.includes(q)) && (isNaN(f) || r.freq >= f) &&
                          (isNaN(m) || (r.mcs !== null && r.mcs >= m)) &&
                          (isNaN(c) || (r.ctx !== null && r.ctx >= c)));
  view.sort(compare);
  for (const h of heads) h.setAttribute("aria-sort", h.dataset.key === sortKey ? (sortDir > 0 ? "ascending" : "descending") : "none");
  body.innerHTML = "";
  shown = 0;
  showMore();
}
for (const h of heads) {
  h.addEventListener("click", () => {
    if (sortKey === h.dataset.key) sortDir = -sortDir;
    else { sortKey = h.dataset.key; sortDir = h.dataset.type === "num" ? -1 : 1; }
    update();
  });
}
for (const el of [filterBox, minFreq, minMcs, minCtx]) el.addEventListener("input", update);
more.addEventListener("click", showMore);
update();
