"""Records, on the Django side, every request and every token Django issued.

One JSON object per line in $BFF_DJANGO_DIR/events.jsonl: ``t`` (unix time
at arrival), ``done``, ``method``, ``path``, ``status``, ``content_type``,
``authorization`` (the header as received, or null), ``presented_refresh``
(the refresh token posted to a refresh endpoint, or null) and ``issued``
(``{"access", "refresh"}`` from a token answer, else ``{}``). The test reads it
to count refresh calls and to know every token that could leak.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse

_LOCK = threading.Lock()


class RecordTokens:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.path = settings.DATA_DIR / "events.jsonl"

    def __call__(self, request: HttpRequest) -> HttpResponse:
        arrived = time.time()
        auth = request.headers.get("Authorization", "")
        presented = None
        if request.path.startswith("/api/token/refresh") and request.method == "POST":
            try:
                presented = json.loads(request.body).get("refresh")
            except (ValueError, AttributeError):
                presented = None
        response = self.get_response(request)
        issued: dict[str, Any] = {}
        if request.path.startswith("/api/token/") and response.status_code == 200:
            answer = json.loads(response.content)
            issued = {k: answer[k] for k in ("access", "refresh") if k in answer}
        entry = {
            "t": arrived,
            "done": time.time(),
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "content_type": request.META.get("CONTENT_TYPE"),
            # wsgiref joins repeated headers with ",": a second Authorization shows here.
            "authorization": auth or None,
            "presented_refresh": presented,
            "issued": issued,
        }
        with _LOCK, self.path.open("a") as log:
            log.write(json.dumps(entry) + "\n")
        return response
