// distillgate dashboard: draws the route page's charts (uPlot, vendored) and wires the
// threshold control and version buttons to the admin API. The admin session cookie
// authenticates; the x-distillgate-dashboard header is what lets a cookie change state.
(function () {
  "use strict";
  var dataNode = document.getElementById("dashboard-data");
  if (!dataNode) { return; }
  var data = JSON.parse(dataNode.textContent);
  var route = data.route;

  function width(el) { return Math.max(320, el.clientWidth || 800); }
  function dollars(u, v) { return v == null ? "" : "$" + v.toFixed(v >= 100 ? 2 : 4); }
  function pct(u, v) { return v == null ? "" : (v * 100).toFixed(0) + "%"; }

  function costChart() {
    var el = document.getElementById("cost-chart");
    if (!el) { return; }
    var c = data.cost;
    new uPlot({
      width: width(el), height: 260, scales: {x: {range: c.x_range}},
      series: [{}, {label: "actual", stroke: "#2f9e44", width: 2, value: dollars},
               {label: "all-teacher", stroke: "#e8590c", width: 2, dash: [6, 4], value: dollars}],
      axes: [{}, {values: function (u, vals) { return vals.map(function (v) { return dollars(u, v); }); }, size: 80}],
    }, [c.t, c.actual, c.teacher], el);
  }

  function shareChart() {
    var el = document.getElementById("share-chart");
    if (!el) { return; }
    var c = data.cost;
    new uPlot({
      width: width(el), height: 200,
      scales: {x: {range: c.x_range}, y: {range: [0, 1]}},
      series: [{}, {label: "student share", stroke: "#4a6cf7", width: 2, fill: "rgba(74,108,247,.1)", value: pct}],
      axes: [{}, {values: function (u, vals) { return vals.map(function (v) { return pct(u, v); }); }}],
    }, [c.t, c.student_share], el);
  }

  // -- threshold control ---------------------------------------------------------------------
  var slider = document.getElementById("threshold");
  var points = data.calibration.points;
  var calibration = null;

  function nearest(threshold) {
    var best = null;
    points.forEach(function (p) {
      if (best === null || Math.abs(p.threshold - threshold) < Math.abs(best.threshold - threshold)) { best = p; }
    });
    return best;
  }

  function showEstimate() {
    var value = parseFloat(slider.value);
    document.getElementById("threshold-value").textContent = value.toFixed(3);
    var p = nearest(value);
    var text = "";
    if (p && data.calibration.scored_requests) {
      text = "student share " + pct(null, p.student_share) + ", expected agreement " +
        (p.expected_agreement == null ? "unknown (no shadow data)" : pct(null, p.expected_agreement));
    }
    document.getElementById("threshold-estimate").textContent = text;
    if (calibration) { calibration.redraw(false); }
  }

  // A vertical line at the slider's threshold on the calibration chart.
  function markerPlugin() {
    return {hooks: {draw: function (u) {
      var x = Math.round(u.valToPos(parseFloat(slider.value), "x", true));
      var ctx = u.ctx;
      ctx.save();
      ctx.strokeStyle = "#1d2330";
      ctx.setLineDash([4, 4]);
      ctx.beginPath();
      ctx.moveTo(x, u.bbox.top);
      ctx.lineTo(x, u.bbox.top + u.bbox.height);
      ctx.stroke();
      ctx.restore();
    }}};
  }

  function calibrationChart() {
    var el = document.getElementById("calibration-chart");
    if (!el) { return; }
    calibration = new uPlot({
      width: width(el), height: 260, plugins: [markerPlugin()],
      scales: {x: {time: false}, y: {range: [0, 1]}},
      series: [{label: "threshold"},
               {label: "student share", stroke: "#4a6cf7", width: 2, value: pct},
               {label: "expected agreement", stroke: "#2f9e44", width: 2, value: pct},
               {label: "agreement lower bound", stroke: "#2f9e44", width: 1, dash: [4, 4], value: pct}],
      axes: [{label: "OOD threshold"},
             {values: function (u, vals) { return vals.map(function (v) { return pct(u, v); }); }}],
    }, [points.map(function (p) { return p.threshold; }),
        points.map(function (p) { return p.student_share; }),
        points.map(function (p) { return p.expected_agreement; }),
        points.map(function (p) { return p.agreement_lcb === undefined ? null : p.agreement_lcb; })], el);
  }

  function admin(method, path, body) {
    return fetch(path, {
      method: method, credentials: "same-origin",
      headers: {"content-type": "application/json", "x-distillgate-dashboard": "1"},
      body: body === undefined ? undefined : JSON.stringify(body),
    }).then(function (response) {
      return response.json().then(function (payload) {
        if (!response.ok) { throw new Error(payload.error ? payload.error.message : response.statusText); }
        return payload;
      });
    });
  }

  function applyThreshold() {
    var status = document.getElementById("threshold-status");
    var value = parseFloat(slider.value);
    status.textContent = "saving…";
    admin("PATCH", "/admin/routes/" + encodeURIComponent(route), {ood_threshold: value}).then(function (described) {
      document.getElementById("current-threshold").textContent = described.ood_threshold;
      status.textContent = "saved: threshold " + described.ood_threshold;
      status.className = "ok";
    }).catch(function (error) {
      status.textContent = "failed: " + error.message;
      status.className = "error";
    });
  }

  function versionAction(action, version) {
    var status = document.getElementById("version-status");
    status.textContent = action + "…";
    var body = action === "promote" ? {version: version} : {};
    admin("POST", "/admin/routes/" + encodeURIComponent(route) + "/" + action, body).then(function () {
      status.textContent = action + " done";
      window.location.reload();
    }).catch(function (error) {
      status.textContent = action + " failed: " + error.message;
      status.className = "error";
    });
  }

  costChart();
  shareChart();
  calibrationChart();
  slider.addEventListener("input", showEstimate);
  showEstimate();
  document.getElementById("threshold-apply").addEventListener("click", applyThreshold);
  var recommended = document.getElementById("use-recommended");
  if (recommended) {
    recommended.addEventListener("click", function () {
      slider.value = recommended.getAttribute("data-threshold");
      showEstimate();
    });
  }
  document.getElementById("rollback").addEventListener("click", function () {
    if (window.confirm("Roll back the live student of " + route + "?")) { versionAction("rollback"); }
  });
  Array.prototype.forEach.call(document.querySelectorAll("button.promote"), function (button) {
    button.addEventListener("click", function () {
      var version = button.getAttribute("data-version");
      if (window.confirm("Promote " + version + " to live on " + route + "?")) { versionAction("promote", version); }
    });
  });
})();
