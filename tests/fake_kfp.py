"""A small stand-in for the KFP v2 REST API on 127.0.0.1: records every request, answers the calls
`kfp.Client.create_run_from_pipeline_package` makes (health, experiment lookup/creation, run creation)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

API = "/apis/v2beta1"


@dataclass
class FakeKFP:
    requests: list[dict[str, Any]] = field(default_factory=list)
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urlparse(self.path)
                server.requests.append({"method": "GET", "path": url.path, "query": parse_qs(url.query)})
                if url.path == f"{API}/healthz":
                    return self._send(200, {"multi_user": False})
                if url.path == f"{API}/experiments":
                    wanted = json.loads(parse_qs(url.query).get("filter", ["{}"])[0]).get("predicates", [])
                    names = {p.get("stringValue") for p in wanted if p.get("key") == "display_name"}
                    found = [
                        e for e in server.experiments.values() if not names or e["display_name"] in names
                    ]
                    return self._send(200, {"experiments": found, "total_size": len(found)})
                if url.path.startswith(f"{API}/runs/"):
                    run = server.runs.get(url.path.rsplit("/", 1)[-1])
                    return self._send(200, run) if run else self._send(404, {"error": "no such run"})
                return self._send(404, {"error": f"unknown path {url.path}"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                url = urlparse(self.path)
                server.requests.append({"method": "POST", "path": url.path, "body": body})
                if url.path == f"{API}/experiments":
                    experiment = {**body, "experiment_id": f"exp-{len(server.experiments) + 1}"}
                    server.experiments[experiment["experiment_id"]] = experiment
                    return self._send(200, experiment)
                if url.path == f"{API}/runs":
                    run = {**body, "run_id": f"run-{len(server.runs) + 1}", "state": "PENDING"}
                    server.runs[run["run_id"]] = run
                    return self._send(200, run)
                return self._send(404, {"error": f"unknown path {url.path}"})

            def log_message(self, *args):  # quiet
                pass

        return Handler


@contextmanager
def running() -> Iterator[tuple[FakeKFP, str]]:
    """``with running() as (fake, url):`` a fake KFP API server on an ephemeral port."""
    fake = FakeKFP()
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
