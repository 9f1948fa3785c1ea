// index.html's script (batchgen/report/index.py inlines it): the job table's filters and sorting, the compare
// view, and the grid viewer drawn from the JSON in #viewer-data. Plain DOM, no library, nothing fetched, so the
// page works opened from disk. HTML is built as strings through attr() and esc() (one innerHTML per grid: 10,000
// cells in one layout pass).
(function () {
  "use strict";

  // ---------------------------------------------------------------- job table
  // A row shows when every chosen filter equals its data-* value and the search text (any case) occurs in it.
  var form = document.querySelector("form.filters");
  var rows = document.querySelectorAll("table.jobs tbody tr");
  var shown = document.getElementById("shown");
  function apply() {
    var chosen = [];
    form.querySelectorAll("select[data-filter]").forEach(function (s) {
      if (s.value !== "") chosen.push([s.getAttribute("data-filter"), s.value]);
    });
    var needle = form.querySelector("input[name=search]").value.toLowerCase();
    var bounds = [];
    form.querySelectorAll("input[data-bound]").forEach(function (input) {
      if (input.value !== "") bounds.push([input.getAttribute("data-column"), input.getAttribute("data-bound"),
                                           parseFloat(input.value)]);
    });
    var count = 0;
    rows.forEach(function (tr) {
      var ok = chosen.every(function (c) { return tr.getAttribute("data-" + c[0]) === c[1]; });
      ok = ok && bounds.every(function (b) {
        var raw = tr.getAttribute("data-" + b[0]);
        if (raw === null || raw === "") return false;  // unmeasured rows do not pass a bound
        return b[1] === "min" ? parseFloat(raw) >= b[2] : parseFloat(raw) <= b[2];
      });
      if (ok && needle) ok = tr.textContent.toLowerCase().indexOf(needle) !== -1;
      tr.hidden = !ok;
      if (ok) count += 1;
    });
    shown.textContent = String(count);
  }
  form.addEventListener("change", apply);
  form.addEventListener("input", apply);
  form.addEventListener("submit", function (e) { e.preventDefault(); });
  apply();

  // Sort by a column on a click of its header; a second click reverses. Numbers sort as numbers, blanks last.
  var body = document.querySelector("table.jobs tbody");
  document.querySelectorAll("table.jobs th").forEach(function (th, index) {
    th.addEventListener("click", function () {
      var descending = th.getAttribute("aria-sort") === "ascending";
      document.querySelectorAll("table.jobs th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", descending ? "descending" : "ascending");
      var numeric = th.hasAttribute("data-numeric");
      var list = Array.prototype.slice.call(body.rows);
      list.sort(function (a, b) {
        var x = a.cells[index].textContent, y = b.cells[index].textContent;
        if (x === "" || y === "") return (x === "") - (y === "");
        var order = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
        return descending ? -order : order;
      });
      list.forEach(function (tr) { body.appendChild(tr); });
    });
  });

  // ---------------------------------------------------------------- compare view
  // A thumbnail (table) or a cell (grid) opens the image beside its reference, with a wipe slider between the two;
  // the arrow keys step through the jobs shown where it was opened, in their current order; Escape closes. The
  // table row of a job holds what the view shows of it.
  var rowsById = {};
  Array.prototype.forEach.call(body.rows, function (tr) { rowsById[tr.getAttribute("title")] = tr; });
  var box = document.getElementById("compare");
  var current = null;
  var stepping = tableRows;
  var compareChanged = function () {};  // the viewer keeps the open job in the URL's fragment
  function tableRows() {
    return Array.prototype.filter.call(body.rows, function (tr) {
      return !tr.hidden && tr.hasAttribute("data-image");
    });
  }
  function show(tr, list) {
    current = tr;
    stepping = list || tableRows;
    var image = tr.getAttribute("data-image"), reference = tr.getAttribute("data-reference-image");
    box.querySelector("img.job").src = image;
    box.querySelector("img.over").src = image;
    var refs = box.querySelectorAll("img.reference");
    refs.forEach(function (img) { img.src = reference || image; });
    box.querySelector(".caption").textContent = tr.getAttribute("data-label") + " | " +
      tr.getAttribute("data-prompt") + " | effect " + (tr.getAttribute("data-effect") || "-") + ", ssim " +
      (tr.getAttribute("data-ssim") || "-") + (reference ? "" : " | no reference image");
    wipe();
    box.hidden = false;
    compareChanged(tr.getAttribute("title"));
  }
  function close() {
    box.hidden = true;
    current = null;
    compareChanged("");
  }
  function wipe() {
    var value = box.querySelector("input[type=range]").value;
    box.querySelector("img.over").style.clipPath = "inset(0 " + (100 - value) + "% 0 0)";
  }
  function step(delta) {
    var visible = stepping();
    var at = visible.indexOf(current);
    if (visible.length) show(visible[(at + delta + visible.length) % visible.length], stepping);
  }
  body.addEventListener("click", function (e) {
    var link = e.target.closest("a.open");
    if (!link) return;
    e.preventDefault();
    show(link.closest("tr"), tableRows);
  });
  box.querySelector("input[type=range]").addEventListener("input", wipe);
  box.querySelector("button.close").addEventListener("click", close);
  document.addEventListener("keydown", function (e) {
    if (box.hidden) return;
    if (e.key === "ArrowRight" || e.key === "ArrowDown") { e.preventDefault(); step(1); }
    else if (e.key === "ArrowLeft" || e.key === "ArrowUp") { e.preventDefault(); step(-1); }
    else if (e.key === "Escape") close();
  });

  // ---------------------------------------------------------------- grid viewer
  // The view lives in the URL's fragment: #x=seed&y=stack&z=model&size=256&model=tiny_sd1&prompt=a%20cat,a%20dog
  // (x, y, z: axes; size: cell width in px; AXIS=v1,v2: the values shown of that axis, all when absent; open: the
  // job in the compare view; live=off: no reloading; scroll: where to scroll to after a reload). Controls write the
  // fragment, and every fragment change (hashchange) redraws, so a view can be bookmarked and reloads as it was.
  const dataNode = document.getElementById("viewer-data");
  if (!dataNode) return;
  const data = JSON.parse(dataNode.textContent);
  const grid = document.getElementById("grid");
  const jobs = data.id.length;
  const byName = new Map(data.axes.map((axis) => [axis.name, axis]));
  const varying = data.axes.filter((axis) => axis.values.length > 1);
  // The fragment keys the view uses itself; an axis with such a name is filtered as filter:NAME.
  const RESERVED = new Set(["x", "y", "z", "size", "open", "scroll", "live"]);
  const STATUS = {o: "ok", f: "failed", s: "skipped", p: "pending"};
  const THUMB = 32;
  const DEFAULT_SIZE = Math.min(128, data.full);
  const LABEL_DROPPING = (name) => name === "epoch" || name.startsWith("weight:") || name.startsWith("blocks:");

  function esc(value) {
    return String(value).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }
  function attr(name, value) { return " " + name + "=\"" + esc(value) + "\""; }
  function encode(value) { return encodeURIComponent(value).replace(/%3A/gi, ":"); }
  function decode(value) {
    try { return decodeURIComponent(value); } catch (e) { return value; }
  }
  function valueOf(column, job) { return column.rows ? column.rows[job] : 0; }
  function filterKey(name) { return RESERVED.has(name) ? "filter:" + name : name; }

  function parse(hash) {
    const state = {x: "", y: "", z: "", size: 0, open: "", scroll: -1, live: "", filters: new Map()};
    for (const pair of hash.replace(/^#/, "").split("&")) {
      if (!pair) continue;
      const at = pair.indexOf("=");
      const key = decode(at < 0 ? pair : pair.slice(0, at));
      const raw = at < 0 ? "" : pair.slice(at + 1);
      if (key === "x" || key === "y" || key === "z" || key === "open" || key === "live") {
        state[key] = decode(raw);
      } else if (key === "size" || key === "scroll") {
        const number = parseInt(raw, 10);
        if (number >= 0) state[key] = number;
      } else {
        const name = key.startsWith("filter:") && RESERVED.has(key.slice(7)) ? key.slice(7) : key;
        const axis = byName.get(name);
        if (!axis || RESERVED.has(key)) continue;
        const wanted = new Set(raw === "" ? [] : raw.split(",").map(decode));
        const chosen = new Set();
        axis.values.forEach((value, index) => { if (wanted.has(value)) chosen.add(index); });
        if (chosen.size < axis.values.length) state.filters.set(name, chosen);
      }
    }
    return settle(state);
  }

  // x and y are two different axes of the run, z a third or none: the recorded grid's where the fragment names
  // none, else the first axes that vary.
  function settle(state) {
    const taken = () => [state.x, state.y, state.z];
    const usable = (name, others) => byName.has(name) && !others.includes(name);
    if (!usable(state.z, [state.x, state.y])) state.z = "";
    for (const key of ["x", "y"]) {
      const others = taken().filter((_, i) => i !== "xyz".indexOf(key));
      if (usable(state[key], others)) continue;
      const fallback = [data.view[key], ...varying.map((a) => a.name), ...data.axes.map((a) => a.name)];
      state[key] = fallback.find((name) => usable(name, others)) || "";
    }
    if (state.size) state.size = Math.max(THUMB, Math.min(state.size, data.full));
    return state;
  }

  function serialize(state) {
    const parts = [["x", encode(state.x)], ["y", encode(state.y)]];
    if (state.z) parts.push(["z", encode(state.z)]);
    if (state.size) parts.push(["size", String(state.size)]);
    for (const axis of data.axes) {
      const chosen = state.filters.get(axis.name);
      if (!chosen) continue;
      const values = Array.from(chosen).sort((a, b) => a - b).map((i) => encode(axis.values[i]));
      parts.push([encode(filterKey(axis.name)), values.join(",")]);
    }
    if (state.live) parts.push(["live", encode(state.live)]);
    if (state.open) parts.push(["open", encode(state.open)]);
    if (state.scroll >= 0) parts.push(["scroll", String(state.scroll)]);
    return parts.map((p) => p[0] + "=" + p[1]).join("&");
  }

  function copy(state) { return Object.assign({}, state, {filters: new Map(state.filters)}); }
  // Controls push a new fragment (one history entry each; hashchange redraws); the compare view, the size slider
  // and the live switch replace it, as they change no grid.
  function push(next) { location.hash = serialize(next); }
  function replace(next) {
    state = next;
    history.replaceState(null, "", "#" + serialize(state));
  }

  // The stack's labels leave out what a weight, blocks or epoch axis beside it shows (viewer.py's variants).
  function columnOf(name, onGrid) {
    if (name !== "stack") return byName.get(name);
    const others = onGrid.filter((a) => a !== "stack" && LABEL_DROPPING(a) && byName.get(a).values.length > 1);
    const variants = data.stack.variants;
    const key = others.sort().join("|");
    return data.stack.labels[key in variants ? variants[key] : variants[""]];
  }

  let state = parse(location.hash);
  let drawn = "";  // the grid's part of the fragment when it was last drawn
  const stats = {ms: 0, jobs: 0, images: 0, cells: 0};

  function gridKey(s) {
    const t = copy(s);
    t.size = 0; t.open = ""; t.scroll = -1; t.live = "";
    return serialize(t);
  }

  function imageOf(job) {
    const code = data.image[job];
    return code === 1 ? "images/" + data.id[job] + ".png" : code;
  }

  function jobHtml(job) {
    const id = data.id[job];
    const image = imageOf(job);
    const status = STATUS[data.status[job]] || "unknown";
    if (!image) {
      const word = status === "ok" ? "missing" : status;
      return "<span" + attr("class", "job " + word) + attr("data-job-id", id) +
        ">" + word + "</span>";
    }
    const width = byName.get("width"), height = byName.get("height");
    const w = width ? parseInt(width.values[valueOf(width, job)], 10) : NaN;
    const h = height ? parseInt(height.values[valueOf(height, job)], 10) : NaN;
    // width and height give a not yet loaded image its box, so lazy loading sees where it is.
    const size = w > 0 && h > 0 ? attr("width", w) + attr("height", h) : "";
    return "<img" + attr("data-job-id", id) + attr("src", image) + " loading=\"lazy\"" + size +
      " alt=\"\">";
  }

  function render() {
    const started = performance.now();
    const onGrid = [state.x, state.y, state.z].filter(Boolean);
    const cx = columnOf(state.x, onGrid), cy = columnOf(state.y, onGrid);
    const cz = state.z ? columnOf(state.z, onGrid) : {values: [""]};
    const nx = cx.values.length, ny = cy.values.length, nz = cz.values.length;
    const filters = Array.from(state.filters, (entry) => [byName.get(entry[0]), entry[1]]);
    // As on the PNG grids: the references added for measuring are a column of their own on a stack axis, and
    // left out of any other view (they would double every cell).
    const stack = byName.get("stack");
    const reference = onGrid.includes("stack") ? -1 : stack.values.indexOf("(reference)");
    const cells = new Map();
    const usedX = new Uint8Array(nz * nx), usedY = new Uint8Array(nz * ny), usedZ = new Uint8Array(nz);
    let kept = 0;
    for (let job = 0; job < jobs; job++) {
      if (reference >= 0 && valueOf(stack, job) === reference) continue;
      let ok = true;
      for (const [axis, chosen] of filters) {
        if (!chosen.has(valueOf(axis, job))) { ok = false; break; }
      }
      if (!ok) continue;
      const xi = valueOf(cx, job), yi = valueOf(cy, job), zi = valueOf(cz, job);
      const key = (zi * ny + yi) * nx + xi;
      const list = cells.get(key);
      if (list) list.push(job); else cells.set(key, [job]);
      usedX[zi * nx + xi] = 1; usedY[zi * ny + yi] = 1; usedZ[zi] = 1;
      kept += 1;
    }
    // Rows of flex boxes, not a table: a row off screen is neither laid out nor painted (content-visibility), so
    // a draw costs what the first screens hold. A column is as wide as its fullest cell in the layer, so columns
    // line up without a table's layout pass over every cell.
    const parts = [];
    const corner = esc(title(state.y) + " \u2193 / " + title(state.x) + " \u2192");
    for (let zi = 0; zi < nz; zi++) {
      if (!usedZ[zi]) continue;
      parts.push("<section class=\"layer\">");
      if (state.z) parts.push("<h3>" + esc(title(state.z) + ": " + (cz.values[zi] || "(empty)")) + "</h3>");
      const xs = [], widths = new Map();
      for (let xi = 0; xi < nx; xi++) {
        if (!usedX[zi * nx + xi]) continue;
        xs.push(xi);
        let most = 1;
        for (let yi = 0; yi < ny; yi++) {
          const list = cells.get((zi * ny + yi) * nx + xi);
          if (list && list.length > most) most = list.length;
        }
        widths.set(xi, " style=\"--n:" + most + "\"");
      }
      parts.push("<div class=\"vrow head\"><div class=\"ylabel\">" + corner + "</div>");
      for (const xi of xs) {
        parts.push("<div class=\"vcell\"" + widths.get(xi) + ">" + esc(cx.values[xi] || "(empty)") + "</div>");
      }
      parts.push("</div>");
      for (let yi = 0; yi < ny; yi++) {
        if (!usedY[zi * ny + yi]) continue;
        parts.push("<div class=\"vrow\"><div class=\"ylabel\">" + esc(cy.values[yi] || "(empty)") + "</div>");
        for (const xi of xs) {
          const list = cells.get((zi * ny + yi) * nx + xi);
          parts.push("<div class=\"vcell\"" + widths.get(xi) + ">");
          if (list) {
            for (const job of list) parts.push(jobHtml(job));
          }
          parts.push("</div>");
        }
        parts.push("</div>");
      }
      parts.push("</section>");
    }
    const built = performance.now();
    grid.innerHTML = kept ? parts.join("") : "<p>No job matches these filters.</p>";
    const parsed = performance.now();
    drawn = gridKey(state);
    void grid.offsetHeight;  // lay out now, so the time below covers what the user waits for
    stats.ms = performance.now() - started;
    stats.parts = [built - started, parsed - built, performance.now() - parsed];
    stats.jobs = kept;
    stats.images = grid.querySelectorAll("img[data-job-id]").length;
    stats.cells = cells.size;
    document.getElementById("viewer-shown").textContent =
      kept + " of " + jobs + " jobs, " + cells.size + " cells";
  }

  function title(name) { return byName.get(name).title; }

  // ---------------------------------------------------------------- controls
  const controls = document.querySelector("form.view");
  controls.addEventListener("submit", (e) => e.preventDefault());
  const selects = {};
  for (const key of ["x", "y", "z"]) {
    const select = controls.querySelector("select[name=" + key + "]");
    const options = (key === "z" ? ["<option value=\"\">none</option>"] : []).concat(data.axes.map((axis) =>
      "<option" + attr("value", axis.name) + ">" + esc(axis.title + " (" + axis.values.length + ")") + "</option>"));
    select.innerHTML = options.join("");
    select.addEventListener("change", () => {
      const next = copy(state);
      const old = next[key];
      for (const other of ["x", "y", "z"]) {
        if (other !== key && next[other] === select.value) next[other] = old;  // the two swap places
      }
      next[key] = select.value;
      push(settle(next));
    });
    selects[key] = select;
  }
  const slider = controls.querySelector("input[name=size]");
  const sizeText = document.getElementById("cell-size");
  slider.min = String(Math.min(THUMB, data.full));
  slider.max = String(data.full);
  // A row's height before it is first drawn (content-visibility): a cell's at the first image's aspect.
  const aspect = (() => {
    const width = byName.get("width"), height = byName.get("height");
    const w = width ? parseInt(width.values[valueOf(width, 0)], 10) : NaN;
    const h = height ? parseInt(height.values[valueOf(height, 0)], 10) : NaN;
    return w > 0 && h > 0 ? h / w : 1;
  })();
  function setSize(px) {
    grid.style.setProperty("--cell", px + "px");
    grid.style.setProperty("--row", Math.round(px * aspect + 8) + "px");
    sizeText.textContent = px >= data.full ? px + " px (full size)" : px + " px";
  }
  slider.addEventListener("input", () => setSize(parseInt(slider.value, 10)));
  slider.addEventListener("change", () => {
    const next = copy(state);
    const px = parseInt(slider.value, 10);
    next.size = px === DEFAULT_SIZE ? 0 : px;
    replace(next);
  });

  const filterBox = document.getElementById("viewer-filters");
  // viewer.py marks the axes not worth a filter (a LoRA's blocks where it has none: its weight axis says more).
  filterBox.innerHTML = varying.filter((axis) => axis.filter !== false).map((axis) => {
    const counts = new Array(axis.values.length).fill(0);
    for (let job = 0; job < jobs; job++) counts[valueOf(axis, job)] += 1;
    const boxes = axis.values.map((value, i) => "<label><input type=\"checkbox\"" + attr("value", String(i)) +
      ">" + esc((value || "(empty)") + " (" + counts[i] + ")") + "</label>").join("");
    return "<fieldset" + attr("data-axis", axis.name) + "><legend>" + esc(axis.title) + "</legend>" +
      "<button type=\"button\" data-all=\"1\">all</button><button type=\"button\" data-all=\"0\">none</button>" +
      boxes + "</fieldset>";
  }).join("");
  function chooseValues(fieldset, wanted) {
    const next = copy(state);
    const name = fieldset.getAttribute("data-axis");
    const chosen = new Set();
    fieldset.querySelectorAll("input[type=checkbox]").forEach((input) => {
      if (wanted ? wanted(input) : input.checked) chosen.add(parseInt(input.value, 10));
    });
    if (chosen.size === byName.get(name).values.length) next.filters.delete(name); else next.filters.set(name, chosen);
    push(next);
  }
  filterBox.addEventListener("change", (e) => {
    const fieldset = e.target.closest("fieldset");
    if (fieldset) chooseValues(fieldset, null);
  });
  filterBox.addEventListener("click", (e) => {
    const button = e.target.closest("button[data-all]");
    if (button) chooseValues(button.closest("fieldset"), () => button.getAttribute("data-all") === "1");
  });

  function sync() {
    for (const key of ["x", "y", "z"]) selects[key].value = state[key];
    const px = state.size || DEFAULT_SIZE;
    slider.value = String(px);
    setSize(px);
    filterBox.querySelectorAll("fieldset").forEach((fieldset) => {
      const name = fieldset.getAttribute("data-axis");
      const chosen = state.filters.get(name);
      const at = ["x", "y", "z"].find((key) => state[key] === name);
      fieldset.querySelector("legend").textContent = byName.get(name).title + (at ? " (on " + at + ")" : "");
      fieldset.querySelectorAll("input[type=checkbox]").forEach((input) => {
        input.checked = !chosen || chosen.has(parseInt(input.value, 10));
      });
    });
  }

  // The compare view, opened from a grid cell, steps through the grid's images in their order.
  function gridRows() {
    return Array.from(grid.querySelectorAll("img[data-job-id]"), (img) => rowsById[img.getAttribute("data-job-id")])
      .filter((tr) => tr && tr.hasAttribute("data-image"));
  }
  // A cell's tooltip, made when the pointer first reaches it (10,000 of them up front would slow each draw): the
  // job, its status, and its values on the axes off the grid, which tell apart the jobs sharing a cell.
  const jobIndex = new Map(data.id.map((id, job) => [id, job]));
  grid.addEventListener("mouseover", (e) => {
    const cell = e.target.closest("[data-job-id]");
    if (!cell || cell.hasAttribute("title")) return;
    const job = jobIndex.get(cell.getAttribute("data-job-id"));
    const onGrid = [state.x, state.y, state.z];
    const others = varying.filter((axis) => !onGrid.includes(axis.name));
    cell.title = [data.id[job] + " (" + (STATUS[data.status[job]] || "unknown") + ")"].concat(
      others.map((axis) => axis.title + ": " + axis.values[valueOf(axis, job)])).join("\n");
  });
  grid.addEventListener("click", (e) => {
    const cell = e.target.closest("img[data-job-id]");
    const tr = cell && rowsById[cell.getAttribute("data-job-id")];
    if (tr && tr.hasAttribute("data-image")) show(tr, gridRows);
  });
  compareChanged = (id) => {
    if (state.open === id) return;
    const next = copy(state);
    next.open = id;
    replace(next);
  };
  function syncCompare() {
    const tr = state.open && rowsById[state.open];
    if (!tr || !tr.hasAttribute("data-image")) {
      if (!box.hidden) { box.hidden = true; current = null; }
      return;
    }
    if (current === tr && !box.hidden) return;
    const inGrid = grid.querySelector("img[data-job-id=\"" + state.open + "\"]");
    show(tr, inGrid ? gridRows : tableRows);
  }

  function update() {
    state = parse(location.hash);
    if (gridKey(state) !== drawn) render();
    sync();
    syncCompare();
  }
  window.addEventListener("hashchange", update);

  // ---------------------------------------------------------------- live
  // While the run renders, the page reloads itself (a page opened from disk cannot fetch its data) and comes back
  // as it was: the fragment keeps the view and the open job, and the scroll position goes into it just before.
  const live = data.live;
  if ("scrollRestoration" in history) history.scrollRestoration = "manual";
  const reloadBox = document.getElementById("live-reload");
  let timer = 0;
  function schedule() {
    clearTimeout(timer);
    if (live.finished || state.live === "off") return;
    timer = setTimeout(() => {
      const next = copy(state);
      next.scroll = Math.round(window.scrollY);
      replace(next);
      location.reload();
    }, live.refresh * 1000);
  }
  if (reloadBox) {
    reloadBox.addEventListener("change", () => {
      const next = copy(state);
      next.live = reloadBox.checked ? "" : "off";
      replace(next);
      schedule();
    });
  }

  render();
  sync();
  syncCompare();
  if (reloadBox) reloadBox.checked = state.live !== "off";
  if (state.scroll >= 0) {
    window.scrollTo(0, state.scroll);
    const next = copy(state);
    next.scroll = -1;
    replace(next);
  }
  schedule();
  // For the browser test: the last draw's time (ms, layout included) and counts, and the view as a fragment.
  window.batchgenViewer = {stats: () => Object.assign({}, stats), fragment: () => serialize(state)};
})();
