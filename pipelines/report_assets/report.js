// mqengine report: filters (mirrored in the URL hash, applied on load) and click to enlarge.
// Any script error is written into #js-errors so that a headless test can read it back.
(function () {
  "use strict";
  var errors = document.getElementById("js-errors");
  window.addEventListener("error", function (e) {
    errors.textContent += (e.message || String(e)) + "\n";
  });
  var FILTERS = ["category", "status", "origin"];

  function objectMatches(li, want) {
    if (want.category && li.dataset.category !== want.category) return false;
    if (want.origin && li.dataset.origin !== want.origin) return false;
    if (want.status) {
      var s = want.status;
      if (s.indexOf("code:") === 0) {
        if (li.dataset.code !== s.slice(5)) return false;
      } else if (li.dataset.status !== s) {
        return false;
      }
    }
    return true;
  }

  function apply() {
    var want = {};
    FILTERS.forEach(function (name) {
      want[name] = document.getElementById("f-" + name).value;
    });
    var active = FILTERS.some(function (n) { return want[n]; });
    var shown = 0;
    document.querySelectorAll(".card").forEach(function (card) {
      var any = false;
      card.querySelectorAll("li.obj").forEach(function (li) {
        var ok = objectMatches(li, want);
        li.classList.toggle("dim", active && !ok);
        any = any || ok;
      });
      var visible = !active || any;
      card.classList.toggle("hidden", !visible);
      if (visible) shown += 1;
    });
    document.getElementById("shown").textContent = String(shown);
    var params = new URLSearchParams();
    FILTERS.forEach(function (n) { if (want[n]) params.set(n, want[n]); });
    var hash = params.toString();
    if (location.hash.slice(1) !== hash) {
      history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
    }
  }

  function fromHash() {
    var params = new URLSearchParams(location.hash.slice(1));
    FILTERS.forEach(function (name) {
      var select = document.getElementById("f-" + name);
      var value = params.get(name);
      if (value === null) { select.value = ""; return; }
      var known = Array.prototype.some.call(select.options, function (o) { return o.value === value; });
      if (!known) errors.textContent += "unknown " + name + " filter in URL: " + value + "\n";
      else select.value = value;
    });
  }

  var box = document.getElementById("lightbox");
  var big = box.querySelector("img");
  document.querySelectorAll(".card img").forEach(function (img) {
    img.addEventListener("click", function () {
      big.src = img.dataset.large;
      big.alt = img.alt;
      box.classList.add("open");
    });
  });
  box.addEventListener("click", function () { box.classList.remove("open"); });
  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape") box.classList.remove("open");
  });

  FILTERS.forEach(function (name) {
    document.getElementById("f-" + name).addEventListener("change", apply);
  });
  window.addEventListener("hashchange", function () { fromHash(); apply(); });
  fromHash();
  apply();
  window.addEventListener("load", function () {
    var broken = Array.prototype.filter.call(document.querySelectorAll(".card img"), function (i) {
      return !(i.complete && i.naturalWidth > 0);
    });
    document.body.dataset.brokenImages = String(broken.length);
    document.body.dataset.ready = "1";
  });
})();
