"""The demo upstream keeps HTTP's framing: an answer that may carry no body (204, 304) carries
none, so the next request on the same kept-alive connection gets its own answer."""

from __future__ import annotations

import threading

import httpx

from api_shim.demo_upstream import make_server


def test_a_bodiless_status_leaves_the_kept_alive_connection_clean() -> None:
    server = make_server("127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with httpx.Client(base_url=base, timeout=5) as client:
            # When a 204, a 304 and a 200 are asked for in turn on one connection
            answers = [client.get(path) for path in ("/status/204", "/status/304", "/status/200")]
        # Then each request got its own answer, the bodiless ones with no body
        assert [answer.status_code for answer in answers] == [204, 304, 200]
        assert [answer.content for answer in answers[:2]] == [b"", b""]
        assert answers[2].json() == {"status": 200}
        assert server.stats["/status/200"] == 1  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
