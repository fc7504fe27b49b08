
"use strict";
// The page's data is a JSON block, read as data; every value from the recording reaches the page through
// textContent (never as markup), so a command line is text whatever it holds.
(function () {
  var D = JSON.parse(document.getElementById("etwmon-data").textContent);
  var P = D.procs, N = P.length, ROW = 20, OVERSCAN = 20;
  var PARENT = 0, PID = 1, PPID = 2, IMAGE = 3, CMD = 4, USER = 5, CWD = 6, START = 7, END = 8, EXIT = 9,
      EXECS = 10, THREADS = 11, GUID = 12;
  var span = Math.max(D.span, 1);

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function base(path) {
    if (path === null || path === undefined) return "?";
    var i = Math.max(path.lastIndexOf("/"), path.lastIndexOf("\\"));
    return i >= 0 ? path.slice(i + 1) : path;
  }
  function secs(ms) {
    if (ms === null || ms === undefined) return "";
    return ms < 1000 ? ms.toFixed(1) + " ms" : (ms / 1000).toFixed(ms < 60000 ? 3 : 1) + " s";
  }
  function clock(ms) {
    if (ms === null || ms === undefined) return "before";
    return new Date(D.t0 + ms).toISOString().slice(11, 23);
  }
  function failed(i) { var x = P[i][EXIT]; return x !== null && x !== 0; }

  // --- header, summary ---------------------------------------------------------------------------------------
  document.getElementById("title-file").textContent = D.file;
  var meta = document.getElementById("meta");
  D.meta.forEach(function (kv, k) {
    if (k) meta.appendChild(document.createTextNode(" \u00b7 "));
    meta.appendChild(el("span", "", kv[0] + ": " + kv[1]));
  });
  if (D.note) { var note = document.getElementById("note"); note.textContent = D.note; note.hidden = false; }

  var summary = document.getElementById("summary");
  function table(title, rows, cls) {
    var box = el("div", cls || ""); box.appendChild(el("h2", "", title));
    var t = el("table"); rows.forEach(function (r) {
      var tr = el("tr"); r.forEach(function (v, j) {
        var td = el("td", typeof v === "number" && j ? "num" : "", v); tr.appendChild(td);
      }); t.appendChild(tr);
    });
    box.appendChild(t); summary.appendChild(box); return t;
  }
  table("Summary", D.summary.counts, "counts");
  table("Top images", D.summary.top_images.length ? D.summary.top_images : [["(none)", ""]]);
  var fails = table("Non-zero exits (" + D.summary.failed_total + ")",
    D.summary.failed.map(function (i) { return [P[i][EXIT], P[i][PID], base(P[i][IMAGE]), P[i][CMD]]; }));
  Array.prototype.forEach.call(fails.rows, function (tr, k) {
    tr.style.cursor = "pointer"; tr.addEventListener("click", function () { reveal(D.summary.failed[k]); });
  });
  if (!D.summary.failed.length) fails.appendChild(el("tr")).appendChild(el("td", "", "none"));
  table("Losses (" + D.summary.lost + " records)", D.summary.losses.length ?
    D.summary.losses.map(function (l) { return [clock(l[0]), l[1] + " lost"]; }) : [["none", ""]]);
  document.getElementById("axis-start").textContent = clock(0);
  document.getElementById("axis-end").textContent = "+" + secs(span);

  // --- the tree ----------------------------------------------------------------------------------------------
  var kids = new Array(N), roots = [], depthOf = new Int32Array(N);
  for (var i = 0; i < N; i++) {
    var p = P[i][PARENT];
    if (p >= 0 && p < N && p !== i) { (kids[p] || (kids[p] = [])).push(i); } else { roots.push(i); }
  }
  var open = new Uint8Array(N).fill(1), shown = null; // shown: null = all, else Uint8Array of rows the search keeps
  var failedOnly = false, order = new Int32Array(N), count = 0, selected = -1;

  function flatten() {
    count = 0;
    var stack = [];
    for (var r = roots.length - 1; r >= 0; r--) stack.push(roots[r], 0);
    while (stack.length) {
      var d = stack.pop(), i = stack.pop();
      if (shown && !shown[i]) continue;
      order[count++] = i; depthOf[i] = d;
      var c = kids[i];
      if (c && open[i]) for (var k = c.length - 1; k >= 0; k--) stack.push(c[k], d + 1);
    }
    spacer.style.height = (count * ROW) + "px";
    pool.forEach(function (row) { row.dataset.i = ""; });
    render();
  }

  var viewport = document.getElementById("viewport"), spacer = document.getElementById("spacer"), pool = [];
  function makeRow() {
    var row = el("div", "row");
    var tree = el("div", "c tree"), tog = el("span", "tog"), pid = el("span", "pid"), img = el("span", "img");
    tree.appendChild(tog); tree.appendChild(pid); tree.appendChild(img);
    var tl = el("div", "c tl"), bar = el("div", "bar"); tl.appendChild(bar);
    var cells = [tree, el("div", "c cmd"), el("div", "c user"), el("div", "c start"), el("div", "c life"),
                 el("div", "c exit"), tl];
    cells.forEach(function (c) { row.appendChild(c); });
    row._p = { tree: tree, tog: tog, pid: pid, img: img, cmd: cells[1], user: cells[2], start: cells[3],
               life: cells[4], exit: cells[5], bar: bar };
    tog.addEventListener("click", function (ev) {
      ev.stopPropagation(); var i = +row.dataset.i; open[i] = open[i] ? 0 : 1; flatten();
    });
    row.addEventListener("click", function () { select(+row.dataset.i); });
    spacer.appendChild(row); pool.push(row);
    return row;
  }
  function fill(row, i) {
    var p = P[i], f = row._p, s = p[START] === null ? 0 : p[START], e = p[END] === null ? span : p[END];
    row.dataset.i = i;
    row.className = "row" + (failed(i) ? " fail" : "") + (i === selected ? " selected" : "") +
      (shown && matched && matched[i] ? " match" : "");
    f.tree.style.paddingLeft = (depthOf[i] * 14) + "px";
    f.tog.textContent = kids[i] ? (open[i] ? "\u25be" : "\u25b8") : "";
    f.pid.textContent = p[PID]; f.img.textContent = base(p[IMAGE]);
    f.cmd.textContent = p[CMD]; f.cmd.title = p[CMD];
    f.user.textContent = p[USER] === null ? "" : p[USER];
    f.start.textContent = clock(p[START]);
    f.life.textContent = p[END] === null ? "running" : (p[START] === null ? "?" : secs(p[END] - p[START]));
    f.exit.textContent = p[EXIT] === null ? "" : p[EXIT];
    f.bar.style.left = (100 * s / span) + "%";
    f.bar.style.width = Math.max(0, 100 * (e - s) / span) + "%";
    f.bar.className = "bar" + (p[END] === null ? " open" : "");
  }
  function render() {
    var top = viewport.scrollTop, h = viewport.clientHeight || 600;
    var first = Math.max(0, Math.floor(top / ROW) - OVERSCAN), last = Math.min(count, Math.ceil((top + h) / ROW) + OVERSCAN);
    while (pool.length < last - first) makeRow();
    for (var k = 0; k < pool.length; k++) {
      var row = pool[k], at = first + k;
      if (at < last) {
        var i = order[at];
        row.hidden = false; row.style.top = (at * ROW) + "px";
        if (row.dataset.i !== String(i) || row._stale) { fill(row, i); row._stale = false; }
      } else { row.hidden = true; }
    }
  }
  viewport.addEventListener("scroll", function () { window.requestAnimationFrame(render); });
  window.addEventListener("resize", render);

  function select(i) {
    selected = i; pool.forEach(function (row) { row._stale = true; }); render();
    var p = P[i], box = document.getElementById("details"), dl = el("dl");
    box.textContent = ""; box.hidden = false;
    var parent = p[PARENT] >= 0 ? P[p[PARENT]] : null;
    [["command line", p[CMD]], ["image", p[IMAGE]], ["pid", p[PID]], ["parent", p[PPID] +
      (parent ? " " + base(parent[IMAGE]) : " (not in the recording)")], ["user", p[USER]], ["directory", p[CWD]],
     ["start", p[START] === null ? "before the recording" : clock(p[START])],
     ["end", p[END] === null ? "not seen (running when the recording ended)" : clock(p[END])],
     ["lifetime", p[END] === null || p[START] === null ? "?" : secs(p[END] - p[START])],
     ["exit code", p[EXIT]], ["execs", p[EXECS]], ["threads", p[THREADS]], ["ProcessGuid", p[GUID]]
    ].forEach(function (kv) {
      dl.appendChild(el("dt", "", kv[0])); dl.appendChild(el("dd", "", kv[1] === null ? "unknown" : kv[1]));
    });
    box.appendChild(dl);
  }
  function reveal(i) {
    for (var a = P[i][PARENT], n = 0; a >= 0 && n < N; a = P[a][PARENT], n++) open[a] = 1;
    if (shown && !shown[i]) { search.value = ""; applySearch(); }
    flatten();
    for (var k = 0; k < count; k++) if (order[k] === i) { viewport.scrollTop = Math.max(0, k * ROW - 100); break; }
    select(i);
  }
  document.getElementById("expand").addEventListener("click", function () { open.fill(1); flatten(); });
  document.getElementById("collapse").addEventListener("click", function () { open.fill(0); flatten(); });

  // --- search ------------------------------------------------------------------------------------------------
  var search = document.getElementById("search"), hay = null, matched = null, timer = 0;
  function haystack(i) {
    var p = P[i];
    return (p[PID] + "\n" + p[CMD] + "\n" + (p[IMAGE] || "") + "\n" + (p[USER] || "") + "\n" + (p[CWD] || "") +
            "\n" + (p[GUID] || "")).toLowerCase();
  }
  function applySearch() {
    var q = search.value.trim().toLowerCase(), label = document.getElementById("matches");
    if (!q && !failedOnly) { shown = null; matched = null; label.textContent = ""; flatten(); return; }
    if (q && !hay) { hay = new Array(N); for (var j = 0; j < N; j++) hay[j] = haystack(j); }
    shown = new Uint8Array(N); matched = new Uint8Array(N);
    var hits = 0;
    for (var i = 0; i < N; i++) {
      if ((!q || hay[i].indexOf(q) >= 0) && (!failedOnly || failed(i))) {
        matched[i] = 1; hits++;
        for (var a = i, n = 0; a >= 0 && !shown[a] && n <= N; a = P[a][PARENT], n++) { shown[a] = 1; open[a] = 1; }
      }
    }
    label.textContent = hits + (hits === 1 ? " match" : " matches");
    flatten();
  }
  search.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(applySearch, 150); });
  document.getElementById("failed-only").addEventListener("change", function (ev) {
    failedOnly = ev.target.checked; applySearch();
  });
  flatten();
  document.body.dataset.drawnMs = String(Math.round(performance.now()));  // since navigation began
  document.body.dataset.ready = "1";
})();
