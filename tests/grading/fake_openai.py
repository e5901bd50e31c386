"""A tiny OpenAI-compatible chat endpoint for tests: `respond(messages) -> dict` scripts replies."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(respond):
  """Starts the server in a thread; returns (base_url, requests list, stop)."""
  requests = []

  class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
      pass

    def do_POST(self):  # noqa: N802 - http.server API
      body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      requests.append(body)
      try:
        msg = respond(body["messages"])
        code = 200
        out = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
               "choices": [{"index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", **msg}}]}
      except Exception as e:  # noqa: BLE001
        code, out = 500, {"error": {"message": repr(e)}}
      data = json.dumps(out).encode()
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

  srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=srv.serve_forever, daemon=True).start()

  def stop():
    srv.shutdown()
    srv.server_close()

  return f"http://127.0.0.1:{srv.server_address[1]}/v1", requests, stop
