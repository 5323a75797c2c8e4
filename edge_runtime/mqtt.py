"""One way to talk MQTT v5 for both sides: persistent sessions, reconnect with backoff, Last Will,
frames published with protocol v1's properties, and inbound messages handed to a queue.

MQTT v5 matters here: with 3.1.1 a denied QoS 1 publish still gets a success PUBACK, so a device
could not see that the broker refused it.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_runtime.errors import EdgeError
from edge_runtime.wire import CONTENT_TYPE

log = logging.getLogger("fhai.mqtt")

SESSION_EXPIRY_S = 24 * 3600


class BrokerError(EdgeError):
    """The broker cannot be reached or refused us."""


@dataclass(frozen=True)
class BrokerSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None  # TLS when set
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30


@dataclass
class Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int
    retain: bool


@dataclass
class Connection:
    """A connected client whose received messages land in `inbox` (consumed by one worker thread)."""

    client: mqtt.Client
    inbox: queue.Queue[Inbound] = field(default_factory=queue.Queue)
    connected: threading.Event = field(default_factory=threading.Event)
    manual_ack: bool = False
    refused: str | None = None
    _acks: dict[int, threading.Event] = field(default_factory=dict)
    _reasons: dict[int, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(
        self,
        topic: str,
        payload: bytes,
        retain: bool = False,
        qos: int = 1,
        expiry_s: int | None = None,
        kind: str | None = None,
        wait_s: float | None = 30.0,
        content_type: str = CONTENT_TYPE,
    ) -> None:
        """Publish, and for QoS 1 wait (up to wait_s) for the broker's PUBACK, across a reconnect.

        Paho keeps an unacknowledged QoS 1 message of a persistent session and sends it again after
        reconnecting, so waiting on the PUBACK (not on the first send) is what makes it delivered.
        A PUBACK with a failure reason (MQTT v5, e.g. 135 not authorized) raises BrokerError.
        """
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = content_type
        if expiry_s is not None:
            props.MessageExpiryInterval = max(1, int(expiry_s))
        if kind is not None:
            props.UserProperty = [("fhai-kind", kind), ("fhai-protocol", "1")]
        if wait_s is not None:
            self.connected.wait(wait_s)
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise BrokerError("FHAI-B003", "the outgoing MQTT queue is full: the broker is unreachable for too long")
        if wait_s is None or qos == 0:
            return
        acked = self._ack_event(info.mid)
        try:
            if not acked.wait(wait_s):
                raise BrokerError("FHAI-B004", f"no PUBACK for {topic} within {wait_s:.0f}s: is the broker reachable?")
        finally:
            with self._lock:
                self._acks.pop(info.mid, None)
        reason = self._reasons.pop(info.mid, None)
        if reason is not None:
            raise BrokerError("FHAI-B005", f"the broker refused the publish to {topic}: {reason}")

    def _ack_event(self, mid: int) -> threading.Event:
        with self._lock:
            return self._acks.setdefault(mid, threading.Event())

    def on_puback(self, mid: int, reason: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._reasons[mid] = str(reason)
        self._ack_event(mid).set()

    def ack(self, msg: Inbound) -> None:
        """Acknowledge a QoS 1 message once what it carried is safely stored (manual-ack sessions)."""
        if self.manual_ack and msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)

    def subscribe(self, topic: str) -> None:
        """Subscribe for a while (the persistent session keeps it across reconnects until `unsubscribe`)."""
        self.client.subscribe(topic, qos=1)

    def unsubscribe(self, topic: str) -> None:
        self.client.unsubscribe(topic)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(
    client_id: str,
    settings: BrokerSettings,
    subscriptions: list[str],
    *,
    will: tuple[str, bytes] | None = None,
    online: tuple[str, bytes] | None = None,
    manual_ack: bool = False,
    clean_start: bool = False,
    timeout_s: float = 15.0,
) -> Connection:
    """Connect with a persistent session, (re)subscribe on every connect, and start the network loop.

    `will` is the Last Will (retained) the broker publishes if we vanish; `online` is published
    (retained) on every successful connect, so presence survives reconnects.
    """
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    conn = Connection(client, manual_ack=manual_ack)
    refused = threading.Event()
    first_connect = threading.Event()
    first_connect.set()
    if settings.username:
        client.username_pw_set(settings.username, settings.password)
    if settings.ca_file:
        client.tls_set(
            ca_certs=settings.ca_file,
            certfile=settings.cert_file,
            keyfile=settings.key_file,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.reconnect_delay_set(min_delay=1, max_delay=30)

    def on_connect(c: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            conn.refused = str(reason)
            log.error("broker refused %s: %s", client_id, reason)
            refused.set()
            return
        conn.refused = None
        # The first connect of a process asks for the retained messages (a restarted process has lost what it
        # knew). On a reconnect the persistent session already queued whatever was published meanwhile, so
        # retained copies are sent only for a subscription the broker no longer has: a device on a flaky
        # link does not download the retained global model again on every reconnect.
        handling = SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
        if first_connect.is_set():
            handling = SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE
        first_connect.clear()
        for topic in subscriptions:
            c.subscribe(topic, options=SubscribeOptions(qos=1, retainHandling=handling))
        if online is not None:
            c.publish(online[0], online[1], qos=1, retain=True)
        conn.connected.set()
        log.info("%s connected to %s:%d", client_id, settings.host, settings.port)

    def on_disconnect(_c: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        conn.connected.clear()
        if reason != 0:
            log.warning("%s lost the broker (%s); reconnecting with backoff", client_id, reason)

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        conn.inbox.put(Inbound(msg.topic, bytes(msg.payload), msg.mid, msg.qos, bool(msg.retain)))

    def on_publish(_c: mqtt.Client, _u: Any, mid: int, reason: Any, _props: Any) -> None:
        conn.on_puback(mid, reason)

    def on_subscribe(_c: mqtt.Client, _u: Any, mid: int, reasons: list[Any], _props: Any) -> None:
        # With MQTT v5 a denied subscription comes back as SUBACK reason 135, not as an error.
        for reason in reasons:
            if reason.is_failure:
                log.error("%s: the broker refused a subscription (%s): check this account's ACL", client_id, reason)

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.on_subscribe = on_subscribe
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0 if clean_start else SESSION_EXPIRY_S
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        try:
            client.connect(
                settings.host, settings.port, keepalive=settings.keepalive, clean_start=clean_start, properties=props
            )
            break
        except OSError as exc:
            if time.monotonic() + delay > deadline:
                raise BrokerError(
                    "FHAI-B001", f"cannot reach the MQTT broker at {settings.host}:{settings.port}: {exc}"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    client.loop_start()
    # Wait for a CONNACK; a refusal (bad credentials, not authorized) ends the wait at once.
    while not conn.connected.wait(0.05) and not refused.is_set() and time.monotonic() < deadline:
        pass
    if not conn.connected.is_set():
        client.loop_stop()
        raise BrokerError(
            "FHAI-B002",
            f"the broker at {settings.host}:{settings.port} did not accept {client_id}"
            + (f": {conn.refused}" if conn.refused else " in time")
            + " (check the credentials and the broker's log)",
        )
    return conn
