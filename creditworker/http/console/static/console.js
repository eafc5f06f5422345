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
