// Vedette console: the first page of detections follows new ones (polling the JSON API).
// Rows are built with textContent only: nothing from an agent is ever parsed as HTML.

const POLL_MS = 2000;
// Longest target text in a listing, as the server cuts it.
const TARGET_CHARS = 240;

function targetText(d) {
  if (d.remote) return `pid ${d.pid} ${d.path ?? ""} -> ${d.remote}`;
  if (d.cmdline !== undefined) return `pid ${d.pid} ${d.path ?? ""} (${d.cmdline})`;
  return d.path ?? "";
}

function cell(row, text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function link(td, href, text, className) {
  td.textContent = "";
  const a = document.createElement("a");
  a.href = href;
  a.textContent = text;
  if (className) a.className = className;
  td.appendChild(a);
}

function detectionRow(d) {
  const tr = document.createElement("tr");
  tr.dataset.seq = String(d.seq);
  tr.className = "new";
  const when = cell(tr, "");
  const t = document.createElement("time");
  t.textContent = d.received_at;
  when.appendChild(t);
  link(cell(tr, ""), `/agents/${encodeURIComponent(d.agent_id)}`, d.hostname);
  cell(tr, d.kind);
  link(cell(tr, ""), `/detections/${d.seq}`, d.rule, "rule");
  const target = targetText(d);
  cell(tr, target.length > TARGET_CHARS ? `${target.slice(0, TARGET_CHARS)}…` : target, "target");
  cell(tr, String(d.score), "num");
  cell(tr, d.action);
  return tr;
}

function follow(table) {
  const body = table.tBodies[0];
  const status = document.createElement("p");
  status.id = "live-status";
  status.className = "hint";
  table.before(status);
  const newest = () =>
    Math.max(0, ...Array.from(body.rows, (r) => Number(r.dataset.seq) || 0));
  async function poll() {
    if (document.hidden) return;
    try {
      const resp = await fetch(table.dataset.live, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (!resp.ok) {
        status.textContent = `Live updates paused: ${resp.status} ${resp.statusText}`;
        return;
      }
      const page = await resp.json();
      const since = newest();
      const fresh = page.detections.filter((d) => d.seq > since);
      // The API lists newest first: insert oldest first so the newest ends on top.
      for (const d of fresh.reverse()) body.insertBefore(detectionRow(d), body.firstChild);
      if (fresh.length > 0) document.getElementById("none")?.remove();
      status.textContent = `Live · updated ${new Date().toISOString().slice(11, 19)} UTC`;
    } catch (e) {
      status.textContent = `Live updates paused: ${e}`;
    }
  }
  setInterval(poll, POLL_MS);
  poll();
}

const live = document.querySelector("table#detections[data-live]");
if (live) follow(live);
