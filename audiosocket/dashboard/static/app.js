// The dashboard's own script: every change is a call to the JSON API carrying the login's
// CSRF token (X-CSRF-Token); a 422's "field" is shown next to that field.
(function () {
  "use strict";

  function csrf() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  function api(method, url, body) {
    var headers = {"X-CSRF-Token": csrf(), "Accept": "application/json"};
    var init = {method: method, credentials: "same-origin", headers: headers};
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(url, init).then(function (response) {
      return response.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
        return {status: response.status, ok: response.ok, data: data};
      });
    });
  }
  window.dashboardApi = api;

  // The API speaks English; the messages an operator meets most often, in Portuguese.
  var MESSAGES = [
    [/^(?:ai_port|return_port) (\d+) is used by another extension/, "A porta $1 já é usada por outro ramal."],
    [/^extension id (\d+) already exists/, "O ramal $1 já existe."],
    [/no condominium (\d+)/, "Não há condomínio $1."],
    [/port (\d+).*(?:in use|busy)/i, "A porta $1 está ocupada neste servidor."]
  ];

  function portuguese(detail) {
    for (var i = 0; i < MESSAGES.length; i++) {
      if (MESSAGES[i][0].test(detail)) return detail.replace(MESSAGES[i][0], MESSAGES[i][1]).replace(/^.*?(A porta|O ramal|Não há)/, "$1");
    }
    return detail;
  }

  function describe(result) {
    var data = result.data || {};
    return portuguese(data.detail || "erro") + " (" + result.status + ")";
  }

  // ---------------------------------------------------------------- forms

  function clearErrors(form) {
    form.querySelectorAll("[data-error-for]").forEach(function (el) { el.textContent = ""; });
    form.querySelectorAll("[aria-invalid]").forEach(function (el) { el.removeAttribute("aria-invalid"); });
    var ok = form.querySelector("[data-ok]");
    if (ok) ok.textContent = "";
  }

  function formBody(form) {
    var body = {};
    form.querySelectorAll("input[name], select[name]").forEach(function (input) {
      var value = input.value.trim();
      if (value === "") return;
      body[input.name] = input.hasAttribute("data-int") && /^-?\d+$/.test(value) ? parseInt(value, 10) : value;
    });
    return body;
  }

  // A refused change: its message next to the field it names (marked invalid, focused), or
  // under the form.
  function showError(form, result, field) {
    var target = field && form.querySelector('[data-error-for="' + field + '"]');
    if (target) {
      target.textContent = portuguese((result.data || {}).detail || "inválido");
      var input = form.querySelector('[name="' + field + '"]');
      if (input) { input.setAttribute("aria-invalid", "true"); input.focus(); }
    } else {
      form.querySelector('[data-error-for="_"]').textContent = describe(result);
    }
  }

  // ---------------------------------------------------------------- pre-authorisations

  function preauthBody(form) {
    var body = {weekdays: []};
    form.querySelectorAll("input[name]").forEach(function (input) {
      if (input.type === "checkbox") {
        if (input.checked) body.weekdays.push(parseInt(input.value, 10));
        return;
      }
      var value = input.value.trim();
      if (value === "") return;
      if (input.hasAttribute("data-when")) {
        // The browser's local time, as the API wants it: with its offset (UTC here).
        var when = new Date(value);
        body[input.name] = isNaN(when.getTime()) ? value : when.toISOString();
      } else {
        body[input.name] = input.hasAttribute("data-int") && /^-?\d+$/.test(value) ? parseInt(value, 10) : value;
      }
    });
    if (body.weekdays.length === 0) delete body.weekdays;
    return body;
  }

  function refreshPreauths() {
    var box = document.getElementById("preauths");
    if (!box) return;
    fetch(box.getAttribute("data-part"), {credentials: "same-origin"}).then(function (r) {
      return r.text();
    }).then(function (html) { box.innerHTML = html; });
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.hasAttribute("data-preauth-form")) return;
    event.preventDefault();
    clearErrors(form);
    api("POST", "/api/preauth", preauthBody(form)).then(function (result) {
      if (result.ok) {
        var ok = form.querySelector("[data-ok]");
        ok.textContent = "";
        ok.append("Código de " + result.data.visitor_name + ": ");
        var code = document.createElement("strong");
        code.textContent = result.data.code;
        code.setAttribute("data-code", "");
        ok.append(code, " — anote e entregue agora: ele não será mostrado de novo.");
        refreshPreauths();
        return;
      }
      showError(form, result, result.data && result.data.field);
    }, function () {
      form.querySelector('[data-error-for="_"]').textContent = "Sem conexão com o servidor.";
    });
  });

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-preauth-delete]");
    if (!button) return;
    if (!window.confirm("Excluir esta pré-autorização? O código deixa de abrir o portão.")) return;
    api("DELETE", "/api/preauth/" + encodeURIComponent(button.getAttribute("data-preauth-delete"))).then(function (result) {
      if (!result.ok) document.getElementById("preauths-error").textContent = describe(result);
      refreshPreauths();
    });
  });

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.hasAttribute("data-api-url")) return;
    event.preventDefault();
    clearErrors(form);
    var body = formBody(form);
    var url = form.getAttribute("data-api-url").replace("{id}", encodeURIComponent(body.id || ""));
    api(form.getAttribute("data-api-method"), url, body).then(function (result) {
      if (result.ok) {
        var ok = form.querySelector("[data-ok]");
        if (ok) ok.textContent = "Salvo: ramal " + result.data.id + " " + (result.data.status === "listening" ? "ouvindo." : result.data.status + ".");
        if (form.getAttribute("data-api-method") === "POST") form.reset();
        refresh("#extensions");
        return;
      }
      var field = result.data && result.data.field;
      if (!field && result.status === 409) {
        // A conflict names its field in the detail: "ai_port 8080 is used by …", "extension id 3 …".
        var detail = (result.data || {}).detail || "";
        var match = /^(ai_port|return_port)\b/.exec(detail);
        field = match ? match[1] : (/^extension id/.test(detail) ? "id" : null);
      }
      showError(form, result, field);
    }, function () {
      form.querySelector('[data-error-for="_"]').textContent = "Sem conexão com o servidor.";
    });
  });

  function refresh(selector) {
    var el = document.querySelector(selector);
    if (el && window.htmx) window.htmx.trigger(el, "sse:extension");
  }

  // ---------------------------------------------------------------- buttons

  function tableError(text) {
    var el = document.getElementById("extensions-error");
    if (el) el.textContent = text; else window.alert(text);
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button");
    if (!button) return;
    var id;
    if ((id = button.getAttribute("data-hangup"))) {
      if (!window.confirm("Desligar esta chamada?")) return;
      button.disabled = true;
      api("POST", "/api/sessions/" + encodeURIComponent(id) + "/hangup").then(function (result) {
        button.textContent = result.ok ? "Desligando…" : "Falhou";
        if (!result.ok) { button.disabled = false; window.alert(describe(result)); }
      });
    } else if ((id = button.getAttribute("data-restart"))) {
      api("POST", "/api/extensions/" + encodeURIComponent(id) + "/restart").then(function (result) {
        if (!result.ok) tableError(describe(result));
        refresh("#extensions");
      });
    } else if ((id = button.getAttribute("data-remove"))) {
      var force = document.querySelector('[data-force-for="' + id + '"]');
      var forced = force && force.checked;
      var question = forced ? "Remover o ramal " + id + " e desligar as chamadas dele?" : "Remover o ramal " + id + "? As chamadas em andamento terminam normalmente.";
      if (!window.confirm(question)) return;
      api("DELETE", "/api/extensions/" + encodeURIComponent(id) + (forced ? "?force=true" : "")).then(function (result) {
        if (!result.ok) tableError(describe(result));
        refresh("#extensions");
      });
    } else if ((id = button.getAttribute("data-edit"))) {
      var row = button.closest("tr");
      var data = JSON.parse(row.getAttribute("data-json"));
      var form = document.getElementById("edit-form");
      clearErrors(form);
      form.querySelectorAll("input[name]").forEach(function (input) {
        var value = data[input.name];
        input.value = value === null || value === undefined ? "" : value;
      });
      form.querySelector("input").focus();
    } else if (button.id === "logout") {
      api("POST", "/logout").then(function () { window.location.assign("/login"); });
    } else if (button.id === "privacy-toggle") {
      setPrivacy(!document.body.classList.contains("privacy"));
    }
  });

  // ---------------------------------------------------------------- privacy mode, clocks

  function setPrivacy(on) {
    document.body.classList.toggle("privacy", on);
    var toggle = document.getElementById("privacy-toggle");
    if (toggle) toggle.setAttribute("aria-pressed", on ? "true" : "false");
    try { window.localStorage.setItem("privacy", on ? "1" : "0"); } catch (e) { /* private browsing */ }
  }

  document.addEventListener("DOMContentLoaded", function () {
    var on = false;
    try { on = window.localStorage.getItem("privacy") === "1"; } catch (e) { on = false; }
    setPrivacy(on);
  });

  // Elapsed times tick between updates from the server.
  setInterval(function () {
    document.querySelectorAll("[data-elapsed]").forEach(function (cell) {
      var seconds = parseFloat(cell.getAttribute("data-elapsed")) + 1;
      cell.setAttribute("data-elapsed", String(seconds));
      var s = Math.floor(seconds);
      cell.textContent = Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
    });
  }, 1000);
})();
