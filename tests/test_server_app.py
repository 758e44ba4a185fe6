"""The application in process: server errors are answered, logged in one line and counted."""

from __future__ import annotations

from fastapi.testclient import TestClient

from sd_onnx.runtime.server.app import ServeConfig, ServerState, create_app


def test_a_bug_is_a_counted_500_not_a_dropped_connection() -> None:
    state = ServerState(ServeConfig())
    app = create_app(state, loader=lambda: (_ for _ in ()).throw(AssertionError("not loaded in this test")))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    client = TestClient(app, raise_server_exceptions=False)
    r = client.get("/boom")
    assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
    metrics = client.get("/metrics").text
    assert 'sd_requests_total{endpoint="/boom",status="500"} 1.0' in metrics
