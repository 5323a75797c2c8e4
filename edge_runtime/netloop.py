"""Many MQTT clients on a few threads: paho's external-loop API driven by one selector per thread.

`loop_start()` costs a thread and a socket pair per client, which is 10,000 threads for 10,000 simulated
devices. Here each `NetLoop` thread owns a selector over its clients' sockets: it reads what arrives,
writes what paho has queued (paho tells it through the socket_register_write callbacks), runs each
client's keepalive (`loop_misc`) once a second, and reconnects lost clients with backoff. Callbacks
(on_connect, on_message, ...) run on the loop thread, so they must be quick: hand work to a queue.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger("fhai.mqtt")

MISC_INTERVAL_S = 1.0
RECONNECT_MIN_S, RECONNECT_MAX_S = 1.0, 30.0


class NetLoop(threading.Thread):
    """One thread serving the sockets of many paho clients."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._requests: queue.SimpleQueue[tuple[str, mqtt.Client, Any]] = queue.SimpleQueue()
        self._clients: set[mqtt.Client] = set()
        self._lost: dict[mqtt.Client, tuple[float, float]] = {}  # client -> (retry at, next delay)
        self._sockets: dict[mqtt.Client, Any] = {}
        self._stop = threading.Event()

    def attach(self, client: mqtt.Client) -> None:
        """Let this loop drive `client`; call before `client.connect()`."""
        client.on_socket_open = lambda c, _u, sock: self._request("open", c, sock)
        client.on_socket_close = lambda c, _u, sock: self._request("close", c, sock)
        client.on_socket_register_write = lambda c, _u, sock: self._request("write", c, sock)
        client.on_socket_unregister_write = lambda c, _u, sock: self._request("nowrite", c, sock)
        self._request("add", client, None)

    def lost(self, client: mqtt.Client) -> None:
        """Called from on_disconnect: reconnect the client later, with backoff."""
        self._request("lost", client, None)

    def stop(self) -> None:
        self._stop.set()
        self._wake()

    def _request(self, what: str, client: mqtt.Client, sock: Any) -> None:
        self._requests.put((what, client, sock))
        if threading.current_thread() is not self:
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe (a wake-up is pending), or the loop has stopped
            self._wake_w.send(b"\0")

    def run(self) -> None:
        next_misc = time.monotonic() + MISC_INTERVAL_S
        while not self._stop.is_set():
            self._apply_requests()
            timeout = max(0.0, min(next_misc - time.monotonic(), MISC_INTERVAL_S))
            for key, mask in self._selector.select(timeout):
                client = key.data
                if client is None:
                    self._drain_wake()
                    continue
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                if mask & selectors.EVENT_WRITE and client in self._sockets:
                    client.loop_write()
            if time.monotonic() >= next_misc:
                self._misc()
                next_misc = time.monotonic() + MISC_INTERVAL_S
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _apply_requests(self) -> None:
        while True:
            try:
                what, client, sock = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                self._apply(what, client, sock)
            except OSError:  # the socket closed before the request got here
                self._unregister(client)

    def _apply(self, what: str, client: mqtt.Client, sock: Any) -> None:
        if what == "add":
            self._clients.add(client)
        elif what == "open":
            self._unregister(client)
            self._selector.register(sock, selectors.EVENT_READ, client)
            self._sockets[client] = sock
            if client.want_write():
                self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        elif what == "close":
            if self._sockets.get(client) is sock:
                self._unregister(client)
        elif what in ("write", "nowrite") and client in self._sockets and self._sockets[client] is sock:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if what == "write" else 0)
            self._selector.modify(self._sockets[client], events, client)
        elif what == "lost":
            self._lost.setdefault(client, (time.monotonic() + RECONNECT_MIN_S, RECONNECT_MIN_S))

    def _unregister(self, client: mqtt.Client) -> None:
        sock = self._sockets.pop(client, None)
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)

    def _misc(self) -> None:
        for client in self._clients:
            if client in self._sockets:
                client.loop_misc()  # keepalive pings, and the broker's silence detected
        now = time.monotonic()
        for client, (at, delay) in list(self._lost.items()):
            if now < at:
                continue
            try:
                client.reconnect()
                del self._lost[client]
            except OSError as exc:
                log.debug("reconnect failed: %s", exc)
                self._lost[client] = (now + delay, min(2 * delay, RECONNECT_MAX_S))
