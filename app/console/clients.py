"""The console's two HTTP clients: OPA (who may see what) and the gateway's approvals API.

Both fail closed: OPA unreachable, slow or answering anything but ``{"scope": "all"}`` or
``{"scope": "own"}`` is a refusal; the gateway's answers are shown by their stable codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import httpx

from app.console.auth import User
from app.console.queries import Scope
from app.errors import Forbidden, Unavailable


class AccessPolicy:
    """Asks ``data.querygate.console.access`` what a user may read."""

    def __init__(self, http: httpx.AsyncClient, opa_url: str, path: str) -> None:
        self.http = http
        self.url = f"{opa_url}/v1/data/{path}"

    async def scope(self, user: User) -> Scope:
        payload = {"input": {"identity": {"sub": user.sub, "issuer": user.issuer,
                                          "groups": list(user.groups)}}}
        try:
            response = await self.http.post(self.url, json=payload)
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise Unavailable("policy_unavailable", "the policy cannot be asked") from exc
        result = body.get("result") if isinstance(body, dict) else None
        kind = result.get("scope") if isinstance(result, dict) else None
        if response.status_code != 200 or kind not in ("all", "own"):
            raise Forbidden("console_denied", "policy gives you no access to the console")
        scope_kind: Literal["all", "own"] = "all" if kind == "all" else "own"
        return Scope(scope_kind, user.sub, user.issuer)


@dataclass
class Answer:
    """The gateway's answer: its status and JSON body (the one error shape on failure)."""

    status: int
    body: dict[str, Any]

    @property
    def error(self) -> dict[str, Any] | None:
        error = self.body.get("error")
        return error if isinstance(error, dict) else None


class GatewayApi:
    """The gateway's /v1/approvals, called with the signed-in user's own token."""

    def __init__(self, http: httpx.AsyncClient, base_url: str) -> None:
        self.http = http
        self.base = base_url.rstrip("/")

    async def _call(self, method: str, path: str, user: User,
                    json: dict[str, Any] | None = None, params: dict[str, str] | None = None
                    ) -> Answer:
        try:
            response = await self.http.request(
                method, f"{self.base}{path}", json=json, params=params,
                headers={"authorization": f"Bearer {user.token}"},
            )
        except httpx.HTTPError:
            return Answer(503, {"error": {"code": "gateway_unavailable",
                                          "message": "the gateway cannot be reached"}})
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {"error": {"code": "gateway_error", "message": "the gateway's answer is not JSON"}}
        return Answer(response.status_code, body)

    async def pending(self, user: User) -> Answer:
        return await self._call("GET", "/v1/approvals", user, params={"status": "pending"})

    async def get(self, user: User, approval_id: str) -> Answer:
        return await self._call("GET", f"/v1/approvals/{approval_id}", user)

    async def decide(self, user: User, approval_id: str, verdict: Literal["approve", "reject"],
                     comment: str | None) -> Answer:
        return await self._call("POST", f"/v1/approvals/{approval_id}/{verdict}", user,
                                json={"comment": comment} if comment else {})
