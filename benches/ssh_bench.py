#!/usr/bin/env python3
"""Timing helpers for benches/ssh-vs-openssh.sh and the other end-to-end benchmarks (standard library only).

  ssh_bench.py setup N -- CMD...          median/p90 wall time of running CMD N times
  ssh_bench.py pipe BYTES -- CMD...       stream BYTES zeros into CMD's stdin; MiB/s
  ssh_bench.py sink                       TCP sink on 127.0.0.1: prints its port, discards, answers 'k'
  ssh_bench.py forward PORT BYTES [TOKEN] send BYTES to 127.0.0.1:PORT, wait for 'k'; MiB/s
                                          (with TOKEN: an RDP preconnection blob and X.224
                                          connection request first, for the RDP door)
  ssh_bench.py setup-tokens FILE -- CMD   as setup, once per line of FILE, `{}` in CMD replaced by it
  ssh_bench.py echo N -- CMD...           keystroke echo round trip through CMD on a PTY
"""
import os, pty, select, socket, statistics, subprocess, sys, threading, time


def cmd_after_dashes(args):
    return args[args.index("--") + 1:]


def setup(n, cmd):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    times.sort()
    print(f"median {statistics.median(times)*1000:.1f} ms  p90 {times[int(len(times)*0.9)-1]*1000:.1f} ms  (n={n})")


def pipe(nbytes, cmd):
    chunk = b"\0" * (1 << 20)
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    left = nbytes
    while left > 0:
        n = min(left, len(chunk))
        p.stdin.write(chunk[:n])
        left -= n
    p.stdin.close()
    if p.wait() != 0:
        sys.exit(f"command failed: {cmd}")
    dt = time.perf_counter() - t
    print(f"{nbytes/dt/(1<<20):.0f} MiB/s  ({nbytes>>20} MiB in {dt:.2f} s)")


def setup_tokens(path, cmd):
    times = []
    for tok in open(path).read().split():
        argv = [a.replace("{}", tok) for a in cmd]
        t = time.perf_counter()
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    times.sort()
    n = len(times)
    print(f"median {statistics.median(times)*1000:.1f} ms  p90 {times[int(n*0.9)-1]*1000:.1f} ms  (n={n})")


def rdp_preamble(token):
    """MS-RDPEPS preconnection blob (v2) carrying token, then an X.224 Connection Request."""
    units = token.encode("utf-16-le") + b"\0\0"
    pcb = (16 + 2 + len(units)).to_bytes(4, "little") + (0).to_bytes(4, "little") + (2).to_bytes(4, "little")
    pcb += (0).to_bytes(4, "little") + (len(units) // 2).to_bytes(2, "little") + units
    cookie = b"Cookie: mstshash=bench\r\n"
    neg = bytes([1, 0, 8, 0, 1, 0, 0, 0])
    li = 6 + len(cookie) + len(neg)
    total = 5 + li
    cr = bytes([3, 0, total >> 8, total & 255, li, 0xE0, 0, 0, 0, 0, 0]) + cookie + neg
    return pcb + cr


def sink():
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    print(srv.getsockname()[1], flush=True)

    def serve(c):
        while c.recv(1 << 20):
            pass
        c.sendall(b"k")
        c.close()

    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def forward(port, nbytes, token=None):
    chunk = b"\0" * (1 << 20)
    deadline = time.time() + 20
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    t = time.perf_counter()
    if token:
        s.sendall(rdp_preamble(token))
    left = nbytes
    while left > 0:
        n = min(left, len(chunk))
        s.sendall(chunk[:n])
        left -= n
    s.shutdown(socket.SHUT_WR)
    if s.recv(1) != b"k":
        sys.exit("sink did not confirm")
    dt = time.perf_counter() - t
    print(f"{nbytes/dt/(1<<20):.0f} MiB/s  ({nbytes>>20} MiB in {dt:.2f} s)")


def echo(n, cmd):
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(cmd[0], cmd)

    def read_until(marker, timeout=20):
        buf = b""
        end = time.time() + timeout
        while marker not in buf:
            r, _, _ = select.select([fd], [], [], max(0, end - time.time()))
            if not r:
                sys.exit(f"timeout waiting for {marker!r}; got {buf[-200:]!r}")
            buf += os.read(fd, 4096)
        return buf

    # The remote side echoes every byte it reads (cat on a raw-mode PTY).
    os.write(fd, b"stty raw -echo; echo READY; exec cat\r")
    read_until(b"READY\n")
    rtts = []
    for i in range(n):
        c = bytes([97 + i % 26])
        t = time.perf_counter()
        os.write(fd, c)
        read_until(c)
        rtts.append(time.perf_counter() - t)
    os.kill(pid, 9)
    rtts.sort()
    print(f"median {statistics.median(rtts)*1000:.2f} ms  p90 {rtts[int(n*0.9)-1]*1000:.2f} ms  (n={n})")


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "setup":
        setup(int(a[1]), cmd_after_dashes(a))
    elif a[0] == "pipe":
        pipe(int(a[1]), cmd_after_dashes(a))
    elif a[0] == "sink":
        sink()
    elif a[0] == "forward":
        forward(int(a[1]), int(a[2]), a[3] if len(a) > 3 else None)
    elif a[0] == "setup-tokens":
        setup_tokens(a[1], cmd_after_dashes(a))
    elif a[0] == "echo":
        echo(int(a[1]), cmd_after_dashes(a))
