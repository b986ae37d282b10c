"""A minimal prefill/decode proxy for two `vllm serve` instances with DxlConnector (docs/vllm.md).

    python examples/vllm_proxy.py --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 \\
        --port 8000

Clients then use http://127.0.0.1:8000/v1/completions (or /v1/chat/completions) as they would a
single `vllm serve`. For each request the proxy does the three steps of a P/D deployment:

1. send the request to the prefill with ``max_tokens: 1`` (no streaming) and
   ``kv_transfer_params: {"do_remote_decode": true}``: the prefill computes the prompt's KV,
   offers it and answers with ``kv_transfer_params`` (dxl's tickets);
2. copy those ``kv_transfer_params``, unchanged, into the original request and send it to the
   decode, which loads the KV instead of computing the prompt;
3. pass the decode's answer (streamed or not) back to the client.

The standard library only, one thread per request: an example to read and adapt (several
prefills or decodes, health checks, retries), not a production router. It never logs the
tickets: they name a request's KV (docs/vllm.md).

``--timing`` prints one line per request to stderr, ``vllm_proxy: timing {...}``: the request's
``request_id`` (if the client set one) and the wall-clock times (time.time()) at which the
proxy had the request, sent the prefill's, had its answer, sent the decode's, had the decode's
first chunk and its last (benchmarks/ttft_pair.py breaks time to first token down with them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ROUTES = ("/v1/completions", "/v1/chat/completions")
MAX_BODY = 16 * 2**20  # a request body larger than this is refused (413)
TIMEOUT_S = 600.0


def _post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(req, timeout=TIMEOUT_S)


def prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    """Step 1's request: one token, no streaming, and ask for a remote decode."""
    pre = dict(body)
    pre["max_tokens"] = 1
    if "max_completion_tokens" in pre:
        pre["max_completion_tokens"] = 1
    pre["stream"] = False
    pre.pop("stream_options", None)
    pre["kv_transfer_params"] = {"do_remote_decode": True}
    return pre


class Proxy(BaseHTTPRequestHandler):
    prefill = ""
    decode = ""
    timing = False
    protocol_version = "HTTP/1.0"  # the response ends with the connection: simple streaming

    def do_POST(self) -> None:
        if self.path not in ROUTES:
            self._reply(404, {"error": f"not found: {self.path}; routes: {', '.join(ROUTES)}"})
            return
        stamps = {"in": time.time()}
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._reply(413, {"error": f"request body over {MAX_BODY} bytes"})
            return
        try:
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
        except ValueError as exc:
            self._reply(400, {"error": f"bad request body: {exc}"})
            return
        # 1. prefill: compute the prompt's KV, get the tickets
        try:
            stamps["prefill_sent"] = time.time()
            with _post(self.prefill + self.path, prefill_request(body)) as resp:
                params = json.loads(resp.read()).get("kv_transfer_params")
            stamps["prefill_done"] = time.time()
        except urllib.error.HTTPError as exc:  # the prefill refused: pass its answer on
            self._relay(exc.code, exc.headers.get("Content-Type"), exc)
            return
        except (OSError, ValueError) as exc:
            self._reply(502, {"error": f"prefill {self.prefill}: {exc}"})
            return
        if not isinstance(params, dict):
            self._reply(502, {"error": "the prefill answered without kv_transfer_params"})
            return
        # 2. decode, with the prefill's kv_transfer_params as they came
        body["kv_transfer_params"] = params
        try:
            stamps["decode_sent"] = time.time()
            resp = _post(self.decode + self.path, body)
        except urllib.error.HTTPError as exc:
            self._relay(exc.code, exc.headers.get("Content-Type"), exc)
            return
        except OSError as exc:
            self._reply(502, {"error": f"decode {self.decode}: {exc}"})
            return
        # 3. the decode's answer to the client, chunk by chunk (streams stay streams)
        with resp:
            self._relay(resp.status, resp.headers.get("Content-Type"), resp, stamps)
        if self.timing:
            stamps["done"] = time.time()
            rid = body.get("request_id")
            line = json.dumps({"request_id": rid if isinstance(rid, str) else None, **stamps})
            sys.stderr.write(f"vllm_proxy: timing {line}\n")
            sys.stderr.flush()

    def _relay(
        self,
        status: int,
        content_type: str | None,
        stream: Any,
        stamps: dict[str, float] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type or "application/json")
        self.end_headers()
        while chunk := stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536):
            if stamps is not None and "decode_first" not in stamps:
                stamps["decode_first"] = time.time()
            self.wfile.write(chunk)
            self.wfile.flush()

    def _reply(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write("vllm_proxy: " + (format % args) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", required=True, help="the prefill's base URL, http://HOST:PORT")
    ap.add_argument("--decode", required=True, help="the decode's base URL, http://HOST:PORT")
    ap.add_argument("--host", default="127.0.0.1", help="where the proxy listens")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument(
        "--timing", action="store_true", help="one line of timestamps per request, to stderr"
    )
    args = ap.parse_args()
    Proxy.prefill, Proxy.decode = args.prefill.rstrip("/"), args.decode.rstrip("/")
    Proxy.timing = args.timing
    server = ThreadingHTTPServer((args.host, args.port), Proxy)
    print(f"vllm_proxy: listening on http://{args.host}:{server.server_port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
