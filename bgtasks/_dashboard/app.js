// The bgtasks dashboard: plain JavaScript, no build step, no third-party code.
// Every string that comes from a task is put in the page with textContent,
// never as HTML. The view lives in the query string: ?status=…&name=…&cursor=…
// for the list, ?task=<id> for one task, so a reload or a shared link keeps it.
"use strict";

(function () {
  const body = document.body;
  const LIVE = body.dataset.live;            // "sse" (ASGI) or "poll" (WSGI)
  const READ_ONLY = body.dataset.readOnly === "yes";
  const SHARED = body.dataset.shared === "yes";
  const STATUSES = ["pending", "running", "succeeded", "failed", "cancelled"];
  const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
  const POLL_MS = 2000;
  const api = (path) => "api/" + path;
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------ helpers
  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function when(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toLocaleString();
  }

  function duration(rec) {
    if (!rec.started_at) return "";
    const end = rec.finished_at ? new Date(rec.finished_at) : new Date();
    const s = Math.max(0, (end - new Date(rec.started_at)) / 1000);
    return s < 60 ? s.toFixed(1) + " s" : Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  }

  function progressText(p) {
    if (!p) return "";
    let text = p.total ? p.done + " / " + p.total : String(p.done);
    if (p.message) text += " " + p.message;
    return text;
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  async function getJSON(path) {
    const response = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
    if (response.status === 404) return null;
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
      throw new Error(detail);
    }
    return response.json();
  }

  // ------------------------------------------------------------ state in the URL
  function params() { return new URLSearchParams(location.search); }

  function go(search, replace) {
    const url = location.pathname + (search.toString() ? "?" + search.toString() : "");
    if (replace) history.replaceState(null, "", url); else history.pushState(null, "", url);
    render();
  }

  // ------------------------------------------------------------ live updates
  // One live source at a time: an EventSource (sse) or a poll loop that waits
  // for each answer before scheduling the next, and rests while the tab is hidden.
  let stopLive = () => {};

  function follow(ssePath, refresh) {
    stopLive();
    let stopped = false;
    if (LIVE === "sse" && ssePath) {
      const source = new EventSource(ssePath);
      // One refresh at a time here too: events that come during one are folded
      // into a single refresh after it (the last event is the one that counts).
      let running = false;
      let next = null;
      const onEvent = async (event) => {
        if (stopped) return;
        if (running) { next = event; return; }
        running = true;
        try {
          await refresh(event);
          while (next !== null && !stopped) {
            const pending = next;
            next = null;
            await refresh(pending);
          }
        } finally {
          running = false;
        }
      };
      source.addEventListener("record", onEvent);
      source.addEventListener("change", onEvent);
      stopLive = () => { stopped = true; source.close(); };
      return (done) => { if (done) source.close(); };
    }
    let timer = null;
    let busy = false;
    const tick = async () => {
      timer = null;
      if (stopped) return;
      if (document.hidden) return;   // resumed by visibilitychange
      busy = true;
      try { await refresh(null); } finally { busy = false; }
      if (!stopped) timer = setTimeout(tick, POLL_MS);
    };
    const onVisible = () => {
      if (!document.hidden && !stopped && !busy && timer === null) tick();
    };
    document.addEventListener("visibilitychange", onVisible);
    timer = setTimeout(tick, POLL_MS);
    stopLive = () => {
      stopped = true;
      if (timer !== null) clearTimeout(timer);
      document.removeEventListener("visibilitychange", onVisible);
    };
    return (done) => { if (done) stopLive(); };
  }

  // ------------------------------------------------------------ overview
  function renderCounts(stats) {
    const box = $("overview");
    box.replaceChildren();
    const selected = new Set(params().getAll("status"));
    for (const status of STATUSES) {
      const link = el("a", null, "count" + (selected.has(status) ? " active" : ""));
      link.href = "?status=" + status;
      link.dataset.status = status;
      const strong = el("strong", stats.by_status[status] || 0);
      strong.id = "count-" + status;
      link.append(strong, el("span", status, "status " + status));
      box.append(link);
    }
    const note = $("scope-note");
    if (!SHARED) {
      note.textContent = "This page shows the tasks of one worker process (pid " + stats.pid +
        "). With several workers, each has its own: use a shared store " +
        "(Runtime(store=\"sqlite:///tasks.db\")) to see every worker's tasks here.";
      note.hidden = false;
    }
  }

  async function refreshCounts() {
    const stats = await getJSON(api("stats"));
    if (stats) renderCounts(stats);
  }

  // ------------------------------------------------------------ list
  function renderFilters() {
    const p = params();
    const box = $("status-filters");
    if (!box.querySelector("input")) {
      for (const status of STATUSES) {
        const label = el("label");
        const input = el("input");
        input.type = "checkbox";
        input.name = "status";
        input.value = status;
        input.id = "filter-" + status;
        label.append(input, " " + status);
        box.append(label);
      }
    }
    const selected = new Set(p.getAll("status"));
    for (const input of box.querySelectorAll("input")) input.checked = selected.has(input.value);
    $("name-filter").value = p.get("name") || "";
  }

  function row(rec) {
    const tr = el("tr");
    tr.dataset.id = rec.id;
    const idCell = el("td", null, "id");
    const link = el("a", rec.id);
    link.href = "?task=" + encodeURIComponent(rec.id);
    idCell.append(link);
    const progressCell = el("td");
    if (rec.progress) {
      if (rec.progress.total) {
        const bar = el("progress");
        bar.max = rec.progress.total;
        bar.value = rec.progress.done;
        progressCell.append(bar, " ");
      }
      progressCell.append(el("span", progressText(rec.progress)));
    }
    tr.append(idCell, el("td", rec.name, "name"), el("td", rec.status, "status " + rec.status),
      progressCell, el("td", when(rec.created_at)), el("td", duration(rec)));
    return tr;
  }

  async function refreshList() {
    const p = params();
    const query = new URLSearchParams();
    for (const status of p.getAll("status")) query.append("status", status);
    if (p.get("name")) query.append("name", p.get("name"));
    if (p.get("cursor")) query.append("cursor", p.get("cursor"));
    const [page] = await Promise.all([getJSON(api("tasks?" + query)), refreshCounts()]);
    if (!page) return;
    const tbody = $("tasks").querySelector("tbody");
    tbody.replaceChildren(...page.items.map(row));
    $("empty").hidden = page.items.length > 0;
    const next = $("next-page");
    next.hidden = !page.next_cursor;
    next.dataset.cursor = page.next_cursor || "";
    $("first-page").hidden = !p.get("cursor");
  }

  async function showList() {
    $("detail-view").hidden = true;
    $("list-view").hidden = false;
    renderFilters();
    await guarded(refreshList);
    follow(api("events"), () => guarded(refreshList));
  }

  // ------------------------------------------------------------ detail
  function field(dl, name, value) {
    if (value === null || value === undefined || value === "") return;
    dl.append(el("dt", name), el("dd", value));
  }

  function renderRecord(rec) {
    $("detail-name").textContent = rec.name;
    const dl = $("detail-fields");
    dl.replaceChildren();
    field(dl, "Id", rec.id);
    const statusDd = el("dd", rec.status, "status " + rec.status);
    statusDd.id = "detail-status";
    dl.append(el("dt", "Status"), statusDd);
    field(dl, "Attempts", rec.attempts);
    field(dl, "Created", when(rec.created_at));
    field(dl, "Started", when(rec.started_at));
    field(dl, "Finished", when(rec.finished_at));
    field(dl, "Duration", duration(rec));
    if (rec.started_at && rec.created_at) {
      const wait = (new Date(rec.started_at) - new Date(rec.created_at)) / 1000;
      field(dl, "Queued for", Math.max(0, wait).toFixed(2) + " s");
    }
    field(dl, "Wakes at", when(rec.wake_at));
    const p = rec.progress;
    $("detail-progress").hidden = !p;
    if (p) {
      const bar = $("progress-bar");
      if (p.total) { bar.max = p.total; bar.value = p.done; } else { bar.removeAttribute("value"); }
      $("progress-text").textContent = progressText(p);
    }
    const steps = rec.steps || [];
    $("steps-section").hidden = steps.length === 0;
    $("steps").querySelector("tbody").replaceChildren(...steps.map((s) => {
      const tr = el("tr");
      tr.append(el("td", s.name), el("td", s.status, "status " + s.status), el("td", s.attempts),
        el("td", s.error ? s.error.type + ": " + s.error.message : ""));
      return tr;
    }));
    $("error-section").hidden = !rec.error;
    $("detail-error").textContent = rec.error ? rec.error.type + ": " + rec.error.message : "";
    const hasResult = rec.result !== undefined && rec.result !== null;
    $("result-section").hidden = !hasResult;
    $("detail-result").textContent = hasResult ? JSON.stringify(rec.result, null, 2) : "";
    $("cancel").hidden = READ_ONLY || FINISHED.has(rec.status);
    $("cancel").dataset.id = rec.id;
  }

  async function showDetail(id) {
    $("list-view").hidden = true;
    $("detail-view").hidden = false;
    const path = api("tasks/" + encodeURIComponent(id));
    const load = async () => {
      const rec = await getJSON(path);
      if (!rec) { showError("No task " + id + " (unknown, expired or not yours to see)."); return null; }
      renderRecord(rec);
      return rec;
    };
    const rec = await guarded(load);
    await guarded(refreshCounts);
    if (!rec || FINISHED.has(rec.status)) { stopLive(); return; }
    const settle = follow(path + "/events", async (event) => {
      let current;
      if (event) { current = JSON.parse(event.data); renderRecord(current); } else { current = await guarded(load); }
      if (current && FINISHED.has(current.status)) { settle(true); guarded(refreshCounts); }
    });
  }

  async function cancelTask() {
    const button = $("cancel");
    const id = button.dataset.id;
    button.disabled = true;
    try {
      const response = await fetch(api("tasks/" + encodeURIComponent(id) + "/cancel"), {
        method: "POST",
        headers: { "X-Bgtasks-Action": "cancel", Accept: "application/json" },
        cache: "no-store",
      });
      const answer = await response.json();
      if (response.ok || response.status === 409) {
        if (answer.id) renderRecord(answer);
        showError(response.ok ? "" : answer.detail);
      } else {
        showError(answer.detail || response.statusText);
      }
    } catch (e) {
      showError(String(e.message || e));
    } finally {
      button.disabled = false;
    }
  }

  async function guarded(fn) {
    try {
      const value = await fn();
      return value;
    } catch (e) {
      showError("Could not load: " + (e.message || e));
      return null;
    }
  }

  // ------------------------------------------------------------ wiring
  function render() {
    showError("");
    const id = params().get("task");
    if (id) showDetail(id); else showList();
  }

  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const search = new URLSearchParams();
    for (const input of $("status-filters").querySelectorAll("input:checked")) {
      search.append("status", input.value);
    }
    const name = $("name-filter").value.trim();
    if (name) search.append("name", name);
    go(search);
  });
  $("clear-filters").addEventListener("click", () => go(new URLSearchParams()));
  $("next-page").addEventListener("click", () => {
    const search = params();
    search.set("cursor", $("next-page").dataset.cursor);
    go(search);
  });
  $("first-page").addEventListener("click", () => {
    const search = params();
    search.delete("cursor");
    go(search);
  });
  $("open-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("open-id").value.trim();
    if (id) go(new URLSearchParams({ task: id }));
  });
  $("cancel").addEventListener("click", cancelTask);
  // In-page links (?task=…, ?status=…) change the view without a reload.
  document.addEventListener("click", (event) => {
    const link = event.target.closest("a");
    if (!link || link.origin !== location.origin || link.pathname !== location.pathname) return;
    if (event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
    event.preventDefault();
    go(new URLSearchParams(link.search));
  });
  window.addEventListener("popstate", render);
  render();
})();
