"""The aggregator's web dashboard: one self-contained page and the JSON it polls.

``GET /`` is a single HTML page (inline CSS and JS, no CDN: fleets often run offline) that
fetches ``GET /api/state`` once a second and redraws a fleet table, the round counter and
progress, and two small SVG charts: accuracy per round, and bytes per device per round, up (the
mean update received) next to down (what each device downloaded for the round's announcements:
a delta under delta broadcasts, else the whole model). ``fleet_state`` is a
pure function of what the aggregator already knows (its last published RoundStatus, the last
presence of each device, the store's rounds and receipts), so the page shows exactly what the
broker's retained status says, plus history. Served by ``HttpServer`` like the metrics; off
unless ``dashboard_port`` is set.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aggregator.observability.httpserver import HttpServer, Route
from fedge_contract import Presence, RoundStatus


def _number(value: Any) -> float | None:
    """JSON has no NaN/inf: a metric that is not a finite number is null."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def fleet_state(
    fleet: str,
    status: RoundStatus | None,
    devices: Mapping[str, Presence],
    rounds: Iterable[Mapping[str, Any]],
    bytes_up: Mapping[int, int],
    now: float,
    received: Mapping[int, int] | None = None,
) -> dict[str, Any]:
    """The dashboard's view: the open round, every device, and one row per closed round (``bytes_up``: the
    update bytes received per round, ``received``: how many updates, for the mean per device)."""
    received = received or {}
    history = [
        {
            "round": row["round"],
            "accuracy": _number(row["metrics"].get("accuracy")),
            "loss": _number(row["metrics"].get("loss")),
            "fed_accuracy": _number(row["metrics"].get("fed_accuracy")),  # the devices' own held-out data (federated evaluation)
            "invited": _number(row["metrics"].get("invited")),  # the round's cohort (None: everyone was invited)
            "accepted": row["accepted"],
            "bytes_up": bytes_up.get(row["round"], 0),
            "bytes_up_per_device": bytes_up.get(row["round"], 0) // received[row["round"]] if received.get(row["round"]) else None,
            "bytes_down": row.get("bytes_down", 0),  # per device: the round's announcements
        }
        for row in rounds
        if row.get("closed") is not None
    ]
    return {
        "fleet": fleet,
        "now": now,
        "round": status.round if status else None,
        "rounds_total": status.rounds_total if status else None,
        "model_version": status.model_version if status else None,
        "state": status.state.value if status else "starting",
        "accepted": status.accepted if status else 0,
        "target": status.target if status else None,
        "deadline": status.deadline if status else None,
        "bytes_down": status.bytes_down if status else None,  # per device, the open round's announcement
        "federated": {k[4:]: _number(v) for k, v in (status.last_metrics if status else {}).items() if k.startswith("fed_")},
        "devices": [
            {"client_id": client, "state": p.state, "eligible": p.eligible, "why_not": p.why_not, "dropped": p.dropped,
             "device": dict(p.device)}
            for client, p in sorted(devices.items())
        ],
        "rounds": history,
    }


class DashboardServer(HttpServer):
    """``/`` (the page) and ``/api/state`` (``await state()`` as JSON) on ``host:port`` while the block runs."""

    def __init__(self, state: Callable[[], Awaitable[dict[str, Any]]], host: str = "127.0.0.1", port: int = 0) -> None:
        async def api() -> bytes:
            return json.dumps(await state(), separators=(",", ":"), allow_nan=False, default=str).encode()

        async def page_bytes() -> bytes:
            return PAGE

        page = Route("text/html; charset=utf-8", page_bytes)
        super().__init__({"/": page, "/index.html": page, "/api/state": Route("application/json", api)}, host, port, name="dashboard")


PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedge dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:baseline}
header h1{font-size:18px;margin:0}
#conn{margin-left:auto;font-size:12px}
main{padding:16px 20px;display:grid;grid-template-columns:1fr 1fr;gap:16px}
section{background:#fff;border-radius:6px;padding:12px 16px;box-shadow:0 1px 2px #0002}
section.wide{grid-column:1/3}
h2{font-size:13px;text-transform:uppercase;letter-spacing:.05em;color:#667;margin:0 0 8px}
.big{font-size:32px;font-weight:600}
.bar{height:14px;background:#e4e7ec;border-radius:7px;overflow:hidden;margin:8px 0}
#progress{height:100%;width:0;background:#3b82f6;transition:width .3s}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eee;font-size:13px}
tr.offline td{color:#99a}
.yes{color:#15803d}.no{color:#b91c1c}
svg{width:100%;height:180px;display:block}
svg text{font-size:10px;fill:#667}
</style></head><body>
<header><h1>fedge</h1><span>fleet <b id="fleet">?</b></span><span id="conn">connecting</span></header>
<main>
<section><h2>Round</h2>
<div><span class="big" id="round">-</span><span id="total"></span> &nbsp; model v<span id="version">-</span> &nbsp; <span id="state">-</span></div>
<div class="bar"><div id="progress"></div></div>
<div>updates <span id="accepted">0</span>/<span id="target">-</span> &nbsp; deadline <span id="deadline">-</span>
&nbsp; model download <span id="down">-</span> per device</div>
<div>last round invited <span id="invited">everyone</span> &nbsp; federated accuracy <span id="fed">-</span></div>
</section>
<section><h2>Fleet</h2><div><span class="big" id="online">0</span> online of <span id="count">0</span> devices,
<span id="eligible">0</span> eligible</div></section>
<section><h2>Accuracy per round <span style="color:#3b82f6">server</span> <span style="color:#f59e0b">federated</span></h2>
<svg id="accuracy-chart" viewBox="0 0 400 180" preserveAspectRatio="none"></svg></section>
<section><h2>Bytes per device per round: <span style="color:#10b981">up</span> (mean update)
<span style="color:#3b82f6">down</span> (announcement)</h2>
<svg id="bytes-chart" viewBox="0 0 400 180" preserveAspectRatio="none"></svg></section>
<section class="wide"><h2>Devices</h2><table><thead><tr>
<th>device</th><th>state</th><th>eligible</th><th>why not</th><th>dropped</th><th>readings</th></tr></thead>
<tbody id="devices"></tbody></table></section>
</main>
<script>
"use strict";
const $ = id => document.getElementById(id);
const NS = "http://www.w3.org/2000/svg";
function svgEl(name, attrs, text) {
  const e = document.createElementNS(NS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function human(n) {
  const units = ["B", "KiB", "MiB", "GiB"]; let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}
// A chart of (round, value) points: a line (accuracy) or bars (bytes); ``second``, another series: a second
// line, or a second bar beside each round's. Values are numbers only.
function chart(svg, points, kind, format, fixedMax, second) {
  svg.replaceChildren();
  const W = 400, H = 180, L = 48, B = 20, T = 8, R = 8;
  const pts = points.concat(second || []).filter(p => typeof p[1] === "number");
  const max = fixedMax || Math.max(1, ...pts.map(p => p[1]));
  const n = Math.max(1, points.length);
  const x = i => L + (W - L - R) * (kind === "bar" ? i / n : (n === 1 ? 0.5 : i / (n - 1)));
  const y = v => H - B - (H - B - T) * v / max;
  for (const f of [0, 0.5, 1]) {
    svg.appendChild(svgEl("line", {x1: L, x2: W - R, y1: y(max * f), y2: y(max * f), stroke: "#e4e7ec"}));
    svg.appendChild(svgEl("text", {x: L - 4, y: y(max * f) + 3, "text-anchor": "end"}, format(max * f)));
  }
  if (!pts.length) { svg.appendChild(svgEl("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no rounds yet")); return; }
  if (kind === "bar") {
    const w = Math.max(1, (W - L - R) / n - 2) / (second ? 2 : 1);
    const bars = (series, shift, colour) => series.forEach((p, i) => { if (typeof p[1] === "number")
      svg.appendChild(svgEl("rect", {x: x(i) + 1 + shift, y: y(p[1]), width: w, height: H - B - y(p[1]), fill: colour})); });
    bars(points, 0, "#10b981");
    if (second) bars(second, w, "#3b82f6");
  } else {
    const line = (pts, colour) => {
      const d = pts.map((p, i) => typeof p[1] === "number" ? [x(i), y(p[1])] : null).filter(Boolean);
      svg.appendChild(svgEl("polyline", {points: d.map(q => q.join(",")).join(" "), fill: "none", stroke: colour, "stroke-width": 2}));
      d.forEach(q => svg.appendChild(svgEl("circle", {cx: q[0], cy: q[1], r: 2.5, fill: colour})));
    };
    line(points, "#3b82f6");
    if (second) line(second, "#f59e0b");
  }
  svg.appendChild(svgEl("text", {x: L, y: H - 5}, "round " + points[0][0]));
  svg.appendChild(svgEl("text", {x: W - R, y: H - 5, "text-anchor": "end"}, "round " + points[points.length - 1][0]));
}
function cell(row, text, cls) { const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; }
function render(s) {
  $("fleet").textContent = s.fleet;
  $("round").textContent = s.round === null ? "-" : String(s.round);
  $("total").textContent = s.rounds_total ? " / " + s.rounds_total : "";
  $("version").textContent = s.model_version === null ? "-" : String(s.model_version);
  $("state").textContent = s.state;
  $("accepted").textContent = String(s.accepted);
  $("target").textContent = s.target === null ? "-" : String(s.target);
  const share = s.state === "finished" ? 1 : (s.target ? Math.min(1, s.accepted / s.target) : 0);
  $("progress").style.width = (100 * share).toFixed(1) + "%";
  $("deadline").textContent = s.deadline === null || s.state !== "open" ? "-" : Math.max(0, s.deadline - s.now).toFixed(0) + " s";
  const online = s.devices.filter(d => d.state === "online");
  $("online").textContent = String(online.length);
  $("count").textContent = String(s.devices.length);
  $("eligible").textContent = String(online.filter(d => d.eligible).length);
  const body = $("devices");
  body.replaceChildren();
  for (const d of s.devices) {
    const row = body.insertRow();
    row.className = d.state;
    row.dataset.client = d.client_id;
    cell(row, d.client_id);
    cell(row, d.state);
    cell(row, d.eligible === null ? "?" : (d.eligible ? "yes" : "no"), d.eligible === null ? "" : (d.eligible ? "yes" : "no"));
    cell(row, d.why_not);
    cell(row, String(d.dropped));
    cell(row, Object.keys(d.device).sort()
      .map(k => k + "=" + (typeof d.device[k] === "number" ? +d.device[k].toPrecision(3) : d.device[k])).join(" "));
  }
  chart($("accuracy-chart"), s.rounds.map(r => [r.round, r.accuracy]), "line", v => v.toFixed(2), 1,
        s.rounds.map(r => [r.round, r.fed_accuracy]));
  const last = s.rounds.length ? s.rounds[s.rounds.length - 1] : null;
  $("invited").textContent = last && last.invited !== null ? String(last.invited) : "everyone";
  const fed = s.federated || {};
  $("fed").textContent = typeof fed.accuracy === "number"
    ? fed.accuracy.toFixed(3) + " (v" + fed.version + ", " + fed.devices + " devices)" : "-";
  $("down").textContent = typeof s.bytes_down === "number" ? human(s.bytes_down) : "-";
  chart($("bytes-chart"), s.rounds.map(r => [r.round, r.bytes_up_per_device]), "bar", human, 0,
        s.rounds.map(r => [r.round, r.bytes_down]));
}
async function poll() {
  try {
    const response = await fetch("/api/state", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    $("conn").textContent = "live " + new Date().toLocaleTimeString();
  } catch (e) {
    $("conn").textContent = "disconnected (" + e.message + "), retrying";
  }
  setTimeout(poll, 1000);
}
poll();
</script></body></html>
"""
