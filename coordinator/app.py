"""The coordinator's Flower ServerApp: resolve the runtime, run the round loop."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.rounds import RunResult, run_federation
from coordinator.runtime import CoordinatorRuntime


def make_server_app(
    resolve: Callable[[Context], CoordinatorRuntime],
    on_result: Callable[[RunResult], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> ServerApp:
    """A ServerApp that runs `run_federation` on the runtime `resolve` returns.

    `on_result` receives the outcome; `on_error` the exception that ended the run (an in-process caller,
    the simulation, re-raises it as it was instead of Flower's generic "ServerApp failed").
    """
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            result = run_federation(grid, resolve(context))
        except BaseException as exc:
            if on_error is not None:
                on_error(exc)
            raise
        if on_result is not None:
            on_result(result)

    return app
