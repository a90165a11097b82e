"""How the ingress calls a deployment: a timeout, 503 on backpressure, retries (idempotent calls) if a replica died."""

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


# Waits before each retry after a replica died. An immediate retry can be routed to the replica that just died (Serve's
# router learns of the death from the controller a moment later), and on a loaded 2-core box the first retry 1.5 s
# later still met the dead replica for 4 of 164 requests (tests/test_serve_faults.py, stop 21): so back off, within
# the request's own timeout.
RETRY_DELAYS_S = (1.5, 3.0, 6.0)


async def call(
    make: Callable[[], Awaitable[Any]],
    *,
    timeout_s: float,
    idempotent: bool,
    what: str = "request",
    state: dict | None = None,
) -> Any:
    """Await `make()` (a fresh deployment call each attempt). If a replica died and the call is idempotent, retry
    after each of `RETRY_DELAYS_S` while the request's `timeout_s` (counted from the first attempt) allows.

    A retry is recorded in `state` (the ASGI scope's "state"): the Guard middleware then adds `X-CMAN-Retried: 1`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delays = list(RETRY_DELAYS_S) if idempotent else []
    retries = 0
    while True:
        try:
            result = await asyncio.wait_for(make(), timeout=max(deadline - loop.time(), 0.001))
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
            if delays and loop.time() + delays[0] < deadline:
                logger.warning("a replica died during a %s; retrying in %g s: %s", what, delays[0], type(err).__name__)
                if state is not None:
                    state["retried"] = True
                await asyncio.sleep(delays.pop(0))  # let Serve notice the dead replica before routing again
                retries += 1
                continue
            if not idempotent:
                done = "is not retried (it changes state) and"
            else:
                done = f"was retried {retries} time{'s' if retries != 1 else ''} and"
            raise ServiceUnavailable(
                503, f"a replica restarted while serving this {what}; it {done} may not have completed; retry", 2.0
            ) from None
        raise_if_error(result)
        return result
