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
) -> ServerApp:
    """A ServerApp that runs `run_federation` on the runtime `resolve` returns."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        result = run_federation(grid, resolve(context))
        if on_result is not None:
            on_result(result)

    return app
