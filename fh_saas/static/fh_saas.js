// fh_saas: a form marked data-confirm asks before it is submitted. No inline handlers, so the
// Content-Security-Policy needs no 'unsafe-inline' for scripts.
document.addEventListener('submit', function (event) {
  var message = event.target.getAttribute('data-confirm');
  if (message && !window.confirm(message)) event.preventDefault();
}, true);
