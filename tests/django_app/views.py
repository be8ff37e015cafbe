from __future__ import annotations

import hashlib

from rest_framework.decorators import api_view, permission_classes
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response


@api_view(["GET"])
@permission_classes([IsAuthenticated])
def me(request: Request) -> Response:
    user = request.user
    return Response({"id": user.pk, "username": user.get_username()})


@api_view(["POST"])
@permission_classes([IsAuthenticated])
def echo(request: Request) -> Response:
    body = request._request.body  # the raw bytes, whatever the content type
    return Response({"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)})
