"""Model management for the admin routes of every protocol (Triton's repository extension on /v2, genserve's
/v1/admin): what the ModelRepository deployment (service/repository.py) is asked, with its refusals as the domain
errors of service/errors.py."""

from __future__ import annotations

from typing import Any

from genserve.service.errors import Conflict, InvalidInput, LoadFailed, NotFound, ServiceError, Unavailable

ERRORS: dict[str, type[ServiceError]] = {"invalid": InvalidInput, "not_found": NotFound, "conflict": Conflict,
                                         "failed": LoadFailed}


class ManagementService:
    """Calls into the repository; each of its answers is {"ok": ...} or {"error": kind, "message": ...}."""

    def __init__(self, repository: Any):
        self.repository = repository

    async def _ask(self, method: str, *args: Any) -> Any:
        try:
            reply = await getattr(self.repository, method).remote(*args)
        except Exception as e:  # the repository replica restarting
            raise Unavailable(f"the model repository is not answering ({type(e).__name__}); retry shortly") from e
        if "error" in reply:
            raise ERRORS[reply["error"]](reply["message"])
        return reply["ok"]

    async def index(self) -> list[dict[str, Any]]:
        """Every model version in the store or loaded: name, version, state, reason."""
        return await self._ask("index")

    async def status(self) -> dict[str, Any]:
        return await self._ask("status")

    async def load(self, name: str, version: str | None = None) -> list[str]:
        """Load a version, or the versions the model's policy selects; returns the versions loaded (READY)."""
        return await self._ask("load", name, version)

    async def unload(self, name: str, version: str | None = None) -> None:
        await self._ask("unload", name, version)

    async def promote(self, name: str, version: str) -> None:
        await self._ask("promote", name, version)

    async def set_traffic(self, name: str, split: dict[str, int]) -> None:
        await self._ask("set_traffic", name, split)
