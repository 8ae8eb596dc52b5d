"""Files in a temporary workspace: list, read and write real files, confined to the episode's directory."""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

from k2lab.agents.tools import inside
from k2lab.synth.domains import Domain, spec
from k2lab.synth.env import Task, ToolError

PEOPLE = ("Ada", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kira", "Luis")
TOPICS = ("budget", "roadmap", "hiring", "launch", "security", "offsite", "migration", "pricing")

TOOLS = [
    spec("list_files", "List every file in the workspace (paths relative to it).", {}),
    spec("read_file", "Read a text file from the workspace.", {"path": {"type": "string", "minLength": 1}}),
    spec("write_file", "Write a text file in the workspace (parent folders are created).",
         {"path": {"type": "string", "minLength": 1}, "content": {"type": "string"}}),
]


class Files(Domain):
    name = "files"
    system = "You are a file assistant working in the user's workspace. Use the file tools; never guess contents."
    tools = TOOLS

    def initial_state(self, task: Task) -> Path:
        root = Path(tempfile.mkdtemp(prefix="k2lab-synth-files-")).resolve()
        for rel, text in task.world["files"].items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        return root

    def close(self, state: Path) -> None:
        shutil.rmtree(state, ignore_errors=True)

    def run_tool(self, root: Path, name, args):
        if name == "list_files":
            return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        try:
            target = inside(root, args["path"])
        except PermissionError as e:
            raise ToolError(str(e)) from None
        if name == "read_file":
            if not target.is_file():
                raise ToolError(f"no file {args['path']!r}")
            return {"path": args["path"], "content": target.read_text()}
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(args["content"])
        return {"path": args["path"], "written_chars": len(args["content"])}

    def check_state(self, root: Path, cp):
        path = root / cp["file"]
        if not path.is_file():
            return False, f"{cp['file']} was not written"
        ok = path.read_text().strip() == cp["equals"].strip()
        return ok, f"{cp['file']} has the expected content" if ok else f"{cp['file']} content differs from the expected"

    def make_task(self, rng: random.Random, task_id: str, index: int) -> Task:
        people = rng.sample(PEOPLE, rng.randint(5, 9))
        scores = {p: rng.randint(10, 99) for p in people}
        topics = rng.sample(TOPICS, 3)
        files = {"data/scores.csv": "name,score\n" + "".join(f"{p},{s}\n" for p, s in scores.items()),
                 "notes/meeting.txt": f"Meeting notes\nWe discussed the {topics[0]} and next steps.\n",
                 "notes/todo.txt": f"- follow up on {topics[1]}\n- book rooms\n",
                 "README.md": f"Team workspace. Ask {people[0]} about the {topics[2]}.\n"}
        t = rng.randint(30, 80)
        passed = sorted(p for p, s in scores.items() if s > t)
        kind, topic = rng.choice(("count", "summary", "find")), ""
        if kind == "count":
            turns = [f"How many people in data/scores.csv scored above {t}?"]
            cps = [{"id": "answer", "kind": "number", "turn": 0, "number": len(passed), "tolerance": 0},
                   {"id": "read_data", "kind": "tools", "sequence": ["read_file"]}]
            criteria = [f"answers {len(passed)}"]
        elif kind == "summary":
            turns = [f"Write the names of everyone in data/scores.csv who scored above {t} to passed.txt, "
                     f"one per line, in alphabetical order."]
            cps = [{"id": "file_written", "kind": "state", "file": "passed.txt", "equals": "\n".join(passed)},
                   {"id": "read_then_write", "kind": "tools", "sequence": ["read_file", "write_file"]}]
            criteria = [f"passed.txt lists {passed}"]
        else:
            topic = rng.choice(topics)
            where = next(p for p, text in files.items() if topic in text)
            turns = [f"Which file in my workspace mentions the {topic}?"]
            # the answer names the file and no other, and the agent read that file: a guess among the four files
            # passed a quarter of the time when only the name was checked (a reduced run's SFT model answered
            # "notes/meeting.txt mentions the security" for the migration)
            cps = [{"id": "answer", "kind": "contains", "turn": 0, "contains": [where],
                    "excludes": sorted(p for p in files if p != where)},
                   {"id": "read_it", "kind": "call", "name": "read_file", "arguments": {"path": where}},
                   {"id": "list_then_read", "kind": "tools", "sequence": ["list_files", "read_file"]}]
            criteria = [f"names {where} (and no other file), having read it"]
        rubric = {"success_criteria": criteria, "expected_tools": cps[-1]["sequence"], "checkpoints": cps}
        return self.task(rng, task_id, turns, rubric, {"files": files, "kind": kind, "threshold": t,
                                                       "topic": topic})

    def plan(self, task: Task, turn: int, results: list[dict]):
        w = task.world
        reads = {r["args"]["path"]: r["result"]["content"] for r in results
                 if r["name"] == "read_file" and "content" in r["result"]}
        if w["kind"] == "find":
            listing = next((r["result"] for r in results if r["name"] == "list_files"), None)
            if listing is None:
                return [("list_files", {})]
            unread = [p for p in listing if p not in reads]
            hits = [p for p, text in reads.items() if w["topic"] in text]
            if hits:
                return f"{hits[0]} mentions the {w['topic']}."
            return [("read_file", {"path": p}) for p in unread] or f"No file mentions the {w['topic']}."
        if "data/scores.csv" not in reads:
            return [("read_file", {"path": "data/scores.csv"})]
        rows = [line.split(",") for line in reads["data/scores.csv"].splitlines()[1:] if line]
        passed = sorted(name for name, score in rows if int(score) > w["threshold"])
        if w["kind"] == "count":
            return f"{len(passed)} people scored above {w['threshold']}: {', '.join(passed) or 'nobody'}."
        if not any(r["name"] == "write_file" for r in results):
            return [("write_file", {"path": "passed.txt", "content": "\n".join(passed) + "\n"})]
        return f"Wrote {len(passed)} names to passed.txt: {', '.join(passed) or 'none'}."
