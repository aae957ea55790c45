// Postern web console: a session's recording in asciinema-player (embedded from npm).
"use strict";
(() => {
  const box = document.getElementById("player");
  if (!box) return;
  // For tests and for the curious: the player object.
  window.posternPlayer = AsciinemaPlayer.create(box.dataset.cast, box, {
    fit: "width",
    idleTimeLimit: 2,
    autoPlay: true,
    terminalFontFamily: '"DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace',
  });
})();
