// keygate console: our own script (copy buttons). Every page works without it.
"use strict";
document.addEventListener("click", function (ev) {
  var button = ev.target.closest("button[data-copy]");
  if (!button) { return; }
  var source = document.getElementById(button.getAttribute("data-copy"));
  var status = button.parentElement.querySelector(".copied");
  if (!source || !navigator.clipboard) {
    if (status) { status.textContent = "Select the text and copy it."; }
    return;
  }
  navigator.clipboard.writeText(source.textContent).then(function () {
    if (status) { status.textContent = "Copied."; }
  }, function () {
    if (status) { status.textContent = "Copy failed: select the text and copy it."; }
  });
});
