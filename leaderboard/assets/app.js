// ConcealBench leaderboard: sorting, filters and detail views over the server-rendered tables.
// Plain DOM, no framework, no network. Values come from data.js (window.LEADERBOARD); record
// strings are only ever compared or set with textContent, never parsed as HTML.
(function () {
  "use strict";

  var data = window.LEADERBOARD;
  if (!data) {
    return;
  }
  var rows = {};
  var verdictOrder = data.verdict_order;
  var columns = {};  // ranking id → column key → column
  Object.keys(data.columns).forEach(function (id) {
    columns[id] = {};
    data.columns[id].forEach(function (c) { columns[id][c.key] = c; });
  });
  data.rankings.forEach(function (rk) {
    rk.rows.forEach(function (r) { rows[r.id] = r; });
  });

  // --- sorting --------------------------------------------------------------------------------
  // A missing value (column not applicable) sorts last either way; a null is "undefined" and
  // also last, except where the schema says null means "never" (null_sort: high).
  function sortValue(row, key) {
    if (key === "method") { return (row.display + " " + (row.variant || "")).toLowerCase(); }
    if (key === "concept" || key === "class") { return row[key].toLowerCase(); }
    if (key === "seeds") { return row.seeds.length; }
    var col = (columns[row.ranking] || {})[key];
    if (col && col.kind === "verdict") {
      var v0 = row.verdicts[col.probe] || row.verdicts.retain;
      return v0 ? verdictOrder.indexOf(v0.key) : undefined;
    }
    if (!Object.prototype.hasOwnProperty.call(row.values, key)) { return undefined; }
    var v = row.values[key];
    if (v === null) { return col && col.null_sort === "high" ? Infinity : undefined; }
    return v;
  }

  function compare(a, b, key, dir) {
    var ra = rows[a.dataset.row], rb = rows[b.dataset.row];
    var refA = ra.reference ? 0 : 1, refB = rb.reference ? 0 : 1;
    if (refA !== refB) { return refA - refB; }  // reference rows stay on top
    var va = sortValue(ra, key), vb = sortValue(rb, key);
    if (va === undefined || vb === undefined) {
      if (va !== vb) { return va === undefined ? 1 : -1; }
    } else if (va !== vb) {
      return (va < vb ? -1 : 1) * dir;
    }
    return ra.order - rb.order;
  }

  function sortTable(table, key, dir) {
    var body = table.tBodies[0];
    var trs = Array.prototype.slice.call(body.rows);
    trs.sort(function (a, b) { return compare(a, b, key, dir); });
    trs.forEach(function (tr) { body.appendChild(tr); });
    // Every sortable header, in either header row (per-probe columns sit under their metric's group).
    Array.prototype.forEach.call(table.tHead.querySelectorAll("th[aria-sort]"), function (th) {
      th.setAttribute("aria-sort", th.dataset.key === key ? (dir > 0 ? "ascending" : "descending") : "none");
    });
  }

  document.querySelectorAll("table.board th button.sort").forEach(function (button) {
    button.addEventListener("click", function () {
      var th = button.parentElement;
      var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
      sortTable(th.closest("table"), th.dataset.key, dir);
    });
  });

  // --- filters --------------------------------------------------------------------------------
  var selects = document.querySelectorAll("#filters select[data-filter]");
  var shown = document.getElementById("shown");

  function visible(row, f) {
    if (f.concept && row.concept !== f.concept) { return false; }
    if (f["class"] && row["class"] !== f["class"]) { return false; }
    // The reference rows are the yardstick: a method filter keeps them in view.
    if (f.method && row.method !== f.method && !row.reference) { return false; }
    return true;
  }

  function applyFilters() {
    var f = {};
    selects.forEach(function (s) { f[s.dataset.filter] = s.value; });
    var n = 0, total = 0;
    document.querySelectorAll("table.board tbody tr[data-row]").forEach(function (tr) {
      var ok = visible(rows[tr.dataset.row], f);
      tr.hidden = !ok;
      n += ok ? 1 : 0;
      total += 1;
    });
    document.querySelectorAll("table.matrix tbody tr[data-concept]").forEach(function (tr) {
      var okc = !f.concept || tr.dataset.concept === f.concept;
      var okm = !f.method || tr.dataset.method === f.method || tr.classList.contains("ref");
      tr.hidden = !(okc && okm);
    });
    document.querySelectorAll("section.ranking").forEach(function (section) {
      section.hidden = section.querySelector("table.board tbody tr[data-row]:not([hidden])") === null;
    });
    if (shown) { shown.textContent = n + " of " + total + " rows shown"; }
  }

  selects.forEach(function (s) { s.addEventListener("change", applyFilters); });
  var form = document.getElementById("filters");
  if (form) {
    form.addEventListener("reset", function () { window.setTimeout(applyFilters, 0); });
    form.addEventListener("submit", function (e) { e.preventDefault(); });
  }
  applyFilters();

  // --- detail views ---------------------------------------------------------------------------
  function openDetail(id) {
    var dialog = document.getElementById(id);
    if (dialog && !dialog.open) { dialog.showModal(); }
    return dialog;
  }

  document.querySelectorAll("button.detail-open").forEach(function (button) {
    button.addEventListener("click", function () {
      openDetail(button.dataset.detail);
    });
  });
  document.querySelectorAll("dialog.detail").forEach(function (dialog) {
    // A click on the backdrop (outside the dialog's box) closes it.
    dialog.addEventListener("click", function (e) {
      if (e.target === dialog) {
        var r = dialog.getBoundingClientRect();
        if (e.clientX < r.left || e.clientX > r.right || e.clientY < r.top || e.clientY > r.bottom) {
          dialog.close();
        }
      }
    });
  });
  // index.html#detail-<group> opens that row's detail view (a link to share).
  if (/^#detail-[A-Za-z0-9_.-]+$/.test(window.location.hash)) {
    openDetail(window.location.hash.slice(1));
  }
}());
