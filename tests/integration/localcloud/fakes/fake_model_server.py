"""A stand-in model server (`serve --port P --host H`): GET /ping, POST /invocations.

An invocation whose JSON body has "fail": true answers 500; otherwise 200 with the body echoed back
under "echo" plus the request's content type. It prints one line when it listens (its log).
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self._answer(200 if self.path == "/ping" else 404, {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("fail"):
            self._answer(500, {"error": "the model refused: " + body.get("why", "")})
        else:
            self._answer(200, {"echo": body, "content_type": self.headers["Content-Type"]})

    def _answer(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


arguments = sys.argv[1:]
assert arguments[0] == "serve", arguments
port = int(arguments[arguments.index("--port") + 1])
host = arguments[arguments.index("--host") + 1]
print(f"model server listening on {host}:{port}", flush=True)
HTTPServer((host, port), Handler).serve_forever()
