"""uvicorn's h11 protocol with a deadline on request headers.

uvicorn times out idle keep-alive connections, but not a client that opens a connection and sends
its headers a byte at a time (slowloris): any data cancels the keep-alive timer, and nothing else
bounds the headers. Here a connection has `request_header_timeout` seconds, from its opening or
from the end of its previous response, to finish a request's headers, or it is closed.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout_protocol(timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol subclass bound to `timeout_s` (uvicorn builds protocols from a class)."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in: the body has its own limits
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def uvicorn_options(settings) -> dict:
    """What uvicorn itself bounds, from the settings: used by `loraserve serve` and the test harness."""
    return {
        "http": header_timeout_protocol(settings.request_header_timeout),
        "limit_concurrency": settings.max_connections,  # past it, uvicorn answers 503 at once
        "timeout_keep_alive": settings.keep_alive_timeout,
    }
