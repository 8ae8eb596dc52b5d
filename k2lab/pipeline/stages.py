"""Resumable stages: each finished stage leaves RUN_DIR/stages/NAME.json with its numbers and wall time.

A rerun reads a finished stage's record instead of running it again, so the report is always rebuilt from
every stage's recorded results (a rerun never empties a section). A stage that did not finish has no record
and runs again; the functions stages call (pre-training, SFT, RL, synthesis, the evals) resume their own run
directories, so the work it had done is kept. A stage's time sums every attempt's (the record keeps them).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from k2lab.runs import read_json, write_json


class Stages:
    def __init__(self, run_dir: Path, after: Callable[[list[dict]], object] | None = None):
        """after(records): called with the finished stages' records after each stage that ran (or was interrupted
        by Ctrl-C); not after a reused one, so a rerun of a finished run does nothing but read records."""
        self.dir = Path(run_dir) / "stages"
        self.order: list[str] = []
        self.after = after or (lambda records: None)

    def record(self, name: str) -> dict | None:
        path = self.dir / f"{name}.json"
        return read_json(path) if path.exists() else None

    def run(self, name: str, title: str, fn: Callable[[], dict]) -> dict:
        """fn's result (a JSON-able dict), from the stage's record when it finished before."""
        self.order.append(name)
        done = self.record(name)
        if done is not None:
            print(f"== {title}: done before ({done['wall_s']:.1f} s), reusing {self.dir / (name + '.json')}",
                  flush=True)
            return done["result"]
        attempts_path = self.dir / f"{name}.attempts.json"
        earlier = read_json(attempts_path)["wall_s"] if attempts_path.exists() else []
        print(f"\n== {title}" + (f" (resuming; {len(earlier)} earlier attempt(s))" if earlier else ""), flush=True)
        start = time.perf_counter()
        try:
            result = fn()
        except KeyboardInterrupt:  # Ctrl-C: the attempt's time counts toward the stage; the report shows progress
            self._note_attempt(attempts_path, earlier, time.perf_counter() - start)
            self.after(self.records())
            raise
        except BaseException:  # a failed attempt's time still counts toward the stage
            self._note_attempt(attempts_path, earlier, time.perf_counter() - start)
            raise
        attempts = [*earlier, round(time.perf_counter() - start, 2)]
        write_json(self.dir / f"{name}.json", {"name": name, "title": title, "result": result,
                                               "wall_s": round(sum(attempts), 2), "attempts": attempts,
                                               "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        attempts_path.unlink(missing_ok=True)
        self.after(self.records())
        return result

    @staticmethod
    def _note_attempt(path: Path, earlier: list[float], spent: float) -> None:
        write_json(path, {"wall_s": [*earlier, round(spent, 2)]})

    def records(self) -> list[dict]:
        """The finished stages' records, in the order they ran this time."""
        return [r for r in (self.record(n) for n in self.order) if r is not None]
