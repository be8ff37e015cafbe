"""The multi-user scenario of `make load` (run by run_load.py, not by pytest).

Each simulated user logs in through the gateway, calls several routes
repeatedly across access-token expiry (sometimes several calls in parallel,
which exercises single flight and the grace cache), and logs out.
"""

from __future__ import annotations

from gevent.pool import Group
from locust import HttpUser, between, task

CSRF = {"X-CSRF": "1"}
BURST = ("/api/demo/items", "/api/demo/user", "/api/demo/items/1", "/api/demo/user")


class FrontEndUser(HttpUser):
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        with self.client.post(
            "/auth/demo/login",
            json={"username": "demo", "password": "demo"},
            headers=CSRF,
            catch_response=True,
        ) as response:
            if response.status_code != 200 or "token" in response.text:
                response.failure(f"login: {response.status_code}")

    @task(5)
    def list_items(self) -> None:
        self.client.get("/api/demo/items", name="/api/demo/items")

    @task(3)
    def whoami(self) -> None:
        self.client.get("/api/demo/user", name="/api/demo/user")

    @task(2)
    def create_item(self) -> None:
        self.client.post(
            "/api/demo/items",
            json={"name": "load", "status": "new"},
            headers=CSRF,
            name="/api/demo/items [POST]",
        )

    @task(2)
    def parallel_burst(self) -> None:
        # Four calls at once with the same cookie: after an expiry they all
        # need the refresh, and exactly one may reach the token endpoint.
        group = Group()
        try:
            for path in BURST:
                group.spawn(self.client.get, path, name="burst " + path)
            group.join()
        finally:
            # When locust stops this user mid-burst, the calls must not outlive
            # it: on_stop logs out, and a call after that would (rightly) be 401.
            group.kill()

    @task(1)
    def session_panel(self) -> None:
        self.client.get("/auth/demo/session", name="/auth/demo/session")

    def on_stop(self) -> None:
        self.client.post("/auth/demo/logout", headers=CSRF, name="/auth/demo/logout")
