// Cage's page script: live updates only. Every form works without it.
"use strict";
(function () {
  var POLL_MS = 3000;

  function getJSON(url, done) {
    // A page nobody looks at does not keep the router busy.
    if (document.hidden) { return; }
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (r.status === 401) { location.href = "/login"; return null; }
        return r.ok ? r.json() : null;
      })
      .then(function (v) { if (v !== null) { done(v); } })
      .catch(function () { /* the router may be busy; try again at the next tick */ });
  }

  function text(id, value) {
    var el = document.getElementById(id);
    if (el) { el.textContent = String(value); }
  }

  function utc(unix) {
    return new Date(unix * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC";
  }

  function show(id, on) {
    var el = document.getElementById(id);
    if (el) { el.hidden = !on; }
  }

  // Dashboard: the state, its forms and the counts follow the agent, whoever pressed.
  var state = document.getElementById("cage-state");
  var box = document.getElementById("state-box");
  if (state && box) {
    setInterval(function () {
      getJSON("/api/state", function (s) {
        if (s.state !== state.getAttribute("data-state")) {
          state.textContent = box.getAttribute("data-" + s.state) || s.state;
          state.setAttribute("data-state", s.state);
          box.className = "state " + s.state;
        }
        show("isolate-form", !s.isolated);
        show("release-form", s.isolated);
        if (s.since > 0) {
          text("state-detail", (s.isolated ? "Isolated" : "Released") + " since " + utc(s.since) +
            (s.source ? ", by " + s.who + " (" + s.source + ")" : "") +
            (s.reason ? ": " + s.reason : ""));
        }
        text("count-flows", s.flows);
        text("count-blocked", s.blocked);
        text("count-lost", s.lost);
      });
    }, POLL_MS);
  }

  function bytes(n) {
    var units = ["B", "KB", "MB", "GB", "TB"], u = 0;
    while (n >= 1024 && u < units.length - 1) { n /= 1024; u++; }
    return u === 0 ? n + " B" : n.toFixed(1) + " " + units[u];
  }

  function endpoint(ip, port) {
    if (port === undefined || port === null) { return ip; }
    return ip.indexOf(":") >= 0 ? "[" + ip + "]:" + port : ip + ":" + port;
  }

  function cell(row, value, cls) {
    var td = document.createElement("td");
    td.textContent = value;
    if (cls) { td.className = cls; }
    row.appendChild(td);
  }

  // Flows: the table is fetched again with the page's filters.
  var table = document.getElementById("flows-table");
  var body = document.getElementById("flows-body");
  if (table && body) {
    var query = table.getAttribute("data-query") || "";
    setInterval(function () {
      getJSON("/api/flows?" + query, function (flows) {
        var fresh = document.createElement("tbody");
        fresh.id = "flows-body";
        for (var i = flows.length - 1; i >= 0; i--) {
          var f = flows[i], tr = document.createElement("tr");
          tr.className = f.verdict === "blocked" ? "blocked" : "allowed";
          cell(tr, (f.end || "").slice(0, 19).replace("T", " "));
          cell(tr, f.verdict);
          cell(tr, f.proto);
          cell(tr, endpoint(f.host, f.host_port));
          cell(tr, (f.name ? f.name + " " : "") + endpoint(f.peer, f.peer_port));
          cell(tr, (f.rule || "") + (f.hostname ? " " + f.hostname : ""));
          cell(tr, bytes(f.bytes_out), "num");
          cell(tr, bytes(f.bytes_in), "num");
          fresh.appendChild(tr);
        }
        body.parentNode.replaceChild(fresh, body);
        body = fresh;
        text("flows-live", "(" + flows.length + " shown, newest first, live)");
      });
    }, POLL_MS);
  }
})();
