"""Sites in worker processes: the same transport seam, messages crossing process boundaries.

Each worker process builds its sites itself from their :class:`~securefed.federation.setup.SiteRecipe`
(it loads the task and opens each site's workspace and ledger), so no site object, model or
dataset ever exists in the coordinator's process. Only bytes cross the pipes. A worker that dies
takes its sites with it: the coordinator sees them as dropped, as it would over a network.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

from securefed.errors import ProtocolAbort
from securefed.federation.setup import SiteRecipe, build_site
from securefed.primitives.keys import Roster

__all__ = ["WorkerProcessTransport"]


def _serve(connection: Connection, recipes: list[SiteRecipe], roster_json: str) -> None:
    import torch

    from securefed.data import load_task

    torch.set_num_threads(1)  # several workers share the machine's cores
    try:
        config = recipes[0].config
        task = load_task(config.data, sites=config.site_names(), seed=config.federation.seed)
        roster = Roster.from_json(roster_json)
        sites = {r.name: build_site(r, task, roster) for r in recipes}
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which refuses to start
        connection.send(f"{type(exc).__name__}: {exc}")
        connection.close()
        return
    connection.send("ready")
    try:
        while True:
            batch = connection.recv()
            if batch is None:
                break
            replies: list[tuple[str, bytes | None, str | None]] = []
            for name, data in batch:
                try:
                    replies.append((name, sites[name].handle(data), None))
                except Exception as exc:  # noqa: BLE001 - the site fails; the worker and the others go on
                    replies.append((name, None, f"{type(exc).__name__}: {exc}"))
            connection.send(replies)
    finally:
        for site in sites.values():
            site.close()
        connection.close()


class WorkerProcessTransport:
    """``workers`` processes, each hosting some of the sites."""

    def __init__(self, recipes: Sequence[SiteRecipe], *, roster: Roster, workers: int) -> None:
        context = multiprocessing.get_context("spawn")
        count = max(1, min(workers, len(recipes)))
        groups: list[list[SiteRecipe]] = [list(recipes[i::count]) for i in range(count)]
        self.errors: dict[str, str] = {}  # site -> the last failure its worker reported
        self._owner: dict[str, int] = {}
        self._connections: list[Connection] = []
        self._processes: list[Any] = []
        for index, group in enumerate(groups):
            parent, child = context.Pipe()
            process = context.Process(target=_serve, args=(child, group, roster.to_json()), daemon=True,
                                      name=f"securefed-sites-{index}")
            process.start()
            child.close()
            self._connections.append(parent)
            self._processes.append(process)
            for recipe in group:
                self._owner[recipe.name] = index
        failures = []
        for index, connection in enumerate(self._connections):
            try:
                status = connection.recv()
            except (EOFError, OSError):
                status = "the process exited before building its sites"
            if status != "ready":
                failures.append(f"worker {index}: {status}")
        if failures:
            self.close()
            raise ProtocolAbort("the site worker processes could not start: " + "; ".join(failures)
                                + " (a script that starts workers must guard its entry point with "
                                "`if __name__ == \"__main__\":`)")

    def exchange(self, outgoing: Mapping[str, bytes]) -> dict[str, bytes]:
        unknown = sorted(set(outgoing) - set(self._owner))
        if unknown:
            raise KeyError(f"no site named {unknown[0]!r} on this transport")
        batches: dict[int, list[tuple[str, bytes]]] = {}
        for name, data in outgoing.items():
            batches.setdefault(self._owner[name], []).append((name, bytes(data)))
        sent = []
        for index, batch in batches.items():
            try:
                self._connections[index].send(batch)
                sent.append(index)
            except (BrokenPipeError, OSError):
                for name, _ in batch:
                    self.errors[name] = "its worker process is gone"
        replies: dict[str, bytes] = {}
        for index in sent:
            try:
                answers = self._connections[index].recv()
            except (EOFError, OSError):
                for name, _ in batches[index]:
                    self.errors[name] = "its worker process died"
                continue
            for name, data, error in answers:
                if error is not None:
                    self.errors[name] = error
                if data is not None:
                    replies[name] = data
        return replies

    def close(self) -> None:
        for connection in self._connections:
            try:
                connection.send(None)
            except (BrokenPipeError, OSError):
                pass
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
        for connection in self._connections:
            connection.close()
        self._connections, self._processes = [], []
