"""How the ingress calls a deployment: a timeout, 503 on backpressure, one retry when a replica died."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from serve_app.errors import RequestError, raise_if_error

logger = logging.getLogger(__name__)

RETRIED_HEADER = "X-CMAN-Retried"


class ServiceUnavailable(RequestError):
    """503/504 with a Retry-After hint."""

    def __init__(self, status: int, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(status, message)
        self.retry_after_s = retry_after_s


def _chain(err: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while err is not None and len(out) < 6:
        out.append(err)
        err = getattr(err, "cause", None) or err.__cause__
    return out


def replica_died(err: BaseException) -> bool:
    """The call failed because the replica (or one it called) died or became unreachable, not because of input."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return any(isinstance(e, RayActorError | ReplicaUnavailableError) for e in _chain(err))


def backpressure(err: BaseException) -> Any:
    from ray.serve.exceptions import BackPressureError

    return next((e for e in _chain(err) if isinstance(e, BackPressureError)), None)


RETRY_DELAY_S = 1.5  # measured: an immediate retry can be routed to the replica that just died


async def call(
    make: Callable[[], Awaitable[Any]],
    *,
    timeout_s: float,
    idempotent: bool,
    what: str = "request",
    state: dict | None = None,
) -> Any:
    """Await `make()` (a fresh deployment call each attempt); one retry if a replica died and the call is idempotent.

    A retry is recorded in `state` (the ASGI scope's "state"): the Guard middleware then adds `X-CMAN-Retried: 1`.
    """
    for attempt in (1, 2):
        try:
            result = await asyncio.wait_for(make(), timeout=timeout_s)
        except TimeoutError:
            message = f"the {what} took longer than {timeout_s:g} s (serve.request_timeout_s); retry later"
            raise ServiceUnavailable(504, message) from None
        except RequestError:
            raise
        except Exception as err:  # noqa: BLE001 - classified below; anything else is a 500
            pressure = backpressure(err)
            if pressure is not None:
                raise ServiceUnavailable(503, f"the service is busy ({pressure}); retry shortly", 1.0) from None
            if not replica_died(err):
                raise
            if attempt == 1 and idempotent:
                logger.warning("a replica died during a %s; retrying once: %s", what, type(err).__name__)
                if state is not None:
                    state["retried"] = True
                await asyncio.sleep(RETRY_DELAY_S)  # let Serve notice the dead replica before routing again
                continue
            done = "was retried once and" if attempt == 2 else "is not retried (it changes state) and"
            raise ServiceUnavailable(
                503, f"a replica restarted while serving this {what}; it {done} may not have completed; retry", 2.0
            ) from None
        raise_if_error(result)
        return result
    raise AssertionError("unreachable")
