// One submit per form: after the first, its button is disabled. The server does not rely
// on this: each form carries a token that makes its operation's idempotency key.
document.addEventListener("submit", function (event) {
  var form = event.target;
  if (!form.hasAttribute("data-once")) return;
  if (form.dataset.sent) { event.preventDefault(); return; }
  form.dataset.sent = "1";
  form.querySelectorAll("button[type=submit]").forEach(function (button) {
    setTimeout(function () { button.disabled = true; }, 0);
  });
});

// A select marked data-autosubmit submits its form when it changes (no inline handlers:
// the console's Content-Security-Policy allows scripts from its own files only).
document.addEventListener("change", function (event) {
  if (event.target.matches("select[data-autosubmit]")) event.target.form.submit();
});
