// Postern web console: watching a live session, read-only (xterm.js on the console's
// WebSocket). Protocol: gateway/src/web/watch.rs.
"use strict";
(() => {
  const box = document.getElementById("terminal");
  const state = document.getElementById("state");
  const endedBox = document.getElementById("ended");
  const setState = (text, cls) => {
    state.textContent = text;
    state.className = "state " + (cls || "");
  };
  const term = new Terminal({
    disableStdin: true,
    cursorBlink: false,
    fontFamily: '"DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace',
    fontSize: 14,
    scrollback: 5000,
    theme: { background: "#0f1720", foreground: "#dbe4ee", cursor: "#5b6b7c" },
  });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  window.posternTerminal = term;

  const params = new URLSearchParams({ session: box.dataset.session });
  const ws = new WebSocket(`wss://${location.host}/ws/watch?${params}`);
  ws.binaryType = "arraybuffer";
  let ended = false;
  const showEnd = (text) => {
    ended = true;
    endedBox.textContent = text;
    endedBox.classList.add("shown");
    setState("ended", "ended");
  };
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") {
      term.write(new Uint8Array(e.data));
      return;
    }
    let m;
    try {
      m = JSON.parse(e.data);
    } catch {
      return;
    }
    if (m.watching) {
      setState("watching · read-only", "live");
    } else if (m.lagged) {
      term.write(`\r\n[postern: ${m.lagged} output chunks skipped: this page fell behind]\r\n`);
    } else if (m.refused) {
      showEnd(`Refused: ${m.refused}`);
    } else if (m.ended) {
      showEnd(`Watching ended: ${m.ended.reason}.`);
    }
  };
  ws.onclose = () => {
    if (!ended) showEnd("The connection to the gateway was lost.");
  };
  window.addEventListener("resize", () => fit.fit());
})();
