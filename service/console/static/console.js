// The console's only script: copy buttons. Everything else is plain HTML forms.
"use strict";
document.addEventListener("click", function (event) {
  var button = event.target.closest("button[data-copy]");
  if (!button) return;
  var field = document.getElementById(button.getAttribute("data-copy"));
  var status = button.parentElement.querySelector(".copy-status");
  function done(message) { if (status) status.textContent = message; }
  function fallback() {
    field.focus();
    field.select();
    done(document.execCommand("copy") ? "Copied." : "Select the key and copy it.");
  }
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(field.value).then(function () { done("Copied."); }, fallback);
  } else {
    fallback();
  }
});
