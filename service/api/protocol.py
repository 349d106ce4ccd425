"""uvicorn's h11 protocol with a request-header timeout: a client that connects and sends its headers slower
than ``header_timeout_s`` (slowloris) gets 408 and is disconnected. uvicorn only times out idle keep-alive
connections; the body deadline is the BodyLimit middleware's."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def timed_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with this header timeout."""

    class HeaderTimeoutProtocol(H11Protocol):
        """H11Protocol plus a timer from the first byte of a request (or the connection) to its last header."""

        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                self._arm()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the headers are in: the body has its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.cycle is None or self.cycle.response_complete:
                # h11 cannot answer a request it has not parsed: write the envelope by hand, then close.
                body = json.dumps({"error": {"code": "request_timeout", "message":
                                   f"request headers not received within {header_timeout_s:g} s"}}).encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"content-length: %d\r\nx-request-id: %s\r\nconnection: close\r\n\r\n%s"
                                     % (len(body), uuid.uuid4().hex.encode(), body))
            self.transport.close()

    return HeaderTimeoutProtocol
