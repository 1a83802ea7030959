// The login page: the token goes once, as a Bearer header, and comes back as an HttpOnly cookie.
document.addEventListener("DOMContentLoaded", function () {
  var form = document.getElementById("login-form");
  if (!form) return;
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var error = document.getElementById("login-error");
    error.textContent = "";
    var token = document.getElementById("token").value.trim();
    fetch("/login", {method: "POST", credentials: "same-origin",
                     headers: {"Authorization": "Bearer " + token}})
      .then(function (response) {
        if (response.ok) { window.location.assign("/"); return; }
        error.textContent = response.status === 401 ? "Token inválido." : "Erro " + response.status + ".";
      })
      .catch(function () { error.textContent = "Sem conexão com o servidor."; });
  });
});
