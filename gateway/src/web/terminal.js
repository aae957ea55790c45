// Postern web console: a terminal in the page (xterm.js on the console's WebSocket), either
// a shell on an instance (data-instance; protocol in gateway/src/web/terminal.rs:
// keystrokes as binary messages, resizes as {"resize":{...}}) or a live session watched
// read-only (data-session; gateway/src/web/watch.rs). Output comes as binary messages,
// events as JSON text.
"use strict";
(() => {
  const box = document.getElementById("terminal");
  const state = document.getElementById("state");
  const sessionLabel = document.getElementById("session");
  const endedBox = document.getElementById("ended");
  const watching = Boolean(box.dataset.session);
  const setState = (text, cls) => {
    state.textContent = text;
    state.className = "state " + (cls || "");
  };

  const term = new Terminal({
    disableStdin: watching,
    cursorBlink: !watching,
    fontFamily: '"DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace',
    fontSize: 14,
    scrollback: 5000,
    theme: { background: "#0f1720", foreground: "#dbe4ee", cursor: watching ? "#5b6b7c" : "#9fc0ff" },
  });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  // For tests and for the curious: the terminal object.
  window.posternTerminal = term;

  let url;
  if (watching) {
    url = `wss://${location.host}/ws/watch?${new URLSearchParams({ session: box.dataset.session })}`;
  } else {
    const params = new URLSearchParams({ instance: box.dataset.instance, cols: term.cols, rows: term.rows });
    if (box.dataset.login) params.set("login", box.dataset.login);
    if (box.dataset.profile) params.set("profile", box.dataset.profile);
    url = `wss://${location.host}/ws/terminal?${params}`;
  }
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  let ended = false;

  const showEnd = (text) => {
    ended = true;
    endedBox.textContent = text;
    endedBox.classList.add("shown");
    setState("ended", "ended");
    term.options.cursorBlink = false;
  };

  if (!watching) ws.onopen = () => setState("connected", "live");
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
    if (m.started) {
      sessionLabel.textContent = `session ${m.started.session}`;
      setState("live · recorded", "live");
      term.focus();
    } else if (m.watching) {
      setState("watching · read-only", "live");
    } else if (m.lagged) {
      term.write(`\r\n[postern: ${m.lagged} output chunks skipped: this page fell behind]\r\n`);
    } else if (m.refused) {
      showEnd(`Refused: ${m.refused}`);
    } else if (m.ended) {
      if (watching) {
        showEnd(`Watching ended: ${m.ended.reason}.`);
      } else {
        const code = m.ended.exit === null || m.ended.exit === undefined ? "" : ` (exit status ${m.ended.exit})`;
        showEnd(`Session ended: ${m.ended.reason}${code}.`);
      }
    }
  };
  ws.onclose = () => {
    if (!ended) showEnd("The connection to the gateway was lost.");
  };

  if (!watching) {
    const send = (bytes) => {
      if (ws.readyState === WebSocket.OPEN && !ended) ws.send(bytes);
    };
    term.onData((d) => send(encoder.encode(d)));
    term.onBinary((d) => send(Uint8Array.from(d, (c) => c.charCodeAt(0) & 0xff)));
    term.onResize(({ cols, rows }) => {
      if (ws.readyState === WebSocket.OPEN && !ended) ws.send(JSON.stringify({ resize: { cols, rows } }));
    });
  }
  let pending = 0;
  window.addEventListener("resize", () => {
    clearTimeout(pending);
    pending = setTimeout(() => fit.fit(), 50);
  });
})();
