"""Human review of judged trajectories: the queue the judges were unsure about, plus any judged item a person
wants to check. A review (accept or reject, with a reason) is appended to reviews.jsonl; the latest review of a
trajectory overrides the judges. `rebuild` writes dataset.jsonl from the verdicts (a person's where there is
one, else the judges') and review.json with judge-human agreement: Cohen's kappa and the confusion matrix over
items the judges decided and a person reviewed, and the list of disagreements. Terminal UI and a local web page.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

from k2lab.evals.review import serve_until_interrupted
from k2lab.evals.stats import cohen_kappa, confusion_matrix
from k2lab.runs import append_jsonl, read_jsonl, rewrite_jsonl, write_json
from k2lab.synth.stages import transcript

FILES = ("kept", "rejected", "queue")
VERDICTS = ("accept", "reject")


class ReviewSession:
    def __init__(self, out: str | Path, reviewer: str = "human"):
        self.out, self.reviewer = Path(out), reviewer
        if not (self.out / "run.json").exists():
            raise FileNotFoundError(f"{self.out}: not a synth run (no run.json); run `k2lab synth` first")
        self._lock = threading.Lock()  # the web page answers on threads

    def items(self) -> list[dict]:
        """Judged trajectories (format-rejected ones have no judge decision to review), each with its reviews."""
        reviews: dict[str, list[dict]] = {}
        for r in read_jsonl(self.out / "reviews.jsonl"):
            reviews.setdefault(r["task_id"], []).append(r)
        out = []
        for name in FILES:
            for r in read_jsonl(self.out / f"{name}.jsonl"):
                if r.get("decision") == "reject" and not any(v.get("grade") for v in r["verdicts"]):
                    continue
                out.append(r | {"judge_decision": r.get("decision", "accept" if r["accepted"] else "reject"),
                                "reviews": reviews.get(r["task_id"], [])})
        return out

    def pending(self) -> list[dict]:
        return [i for i in self.items() if i["judge_decision"] == "unsure" and not i["reviews"]]

    def review(self, task_id: str, verdict: str, reason: str = "") -> dict:
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        with self._lock:
            if not any(i["task_id"] == task_id for i in self.items()):
                raise KeyError(f"no judged trajectory {task_id!r} in {self.out}")
            rec = {"task_id": task_id, "verdict": verdict, "reason": reason or verdict, "reviewer": self.reviewer}
            append_jsonl(self.out / "reviews.jsonl", rec)
            rebuild(self.out)
        return rec


def goal(record: dict) -> str:
    """The task's goal (LLM path) or the user's first message (embedded domains)."""
    return record.get("goal") or next(m["content"] for m in record["messages"] if m["role"] == "user")


def agreement(items: list[dict]) -> dict:
    pairs = [(i["judge_decision"], i["reviews"][-1]["verdict"]) for i in items
             if i["reviews"] and i["judge_decision"] in VERDICTS]
    out = {"reviewed": sum(bool(i["reviews"]) for i in items), "judged_and_reviewed": len(pairs),
           "unsure_resolved": sum(bool(i["reviews"]) and i["judge_decision"] == "unsure" for i in items)}
    if pairs:
        kappa = cohen_kappa(*zip(*pairs))
        out["cohen_kappa"] = None if kappa != kappa else round(kappa, 4)
        out["confusion_judge_rows_human_cols"] = confusion_matrix(*zip(*pairs), list(VERDICTS))
        out["labels"] = list(VERDICTS)
    out["disagreements"] = [{"task_id": i["task_id"], "judges": i["judge_decision"],
                             "human": i["reviews"][-1]["verdict"], "reason": i["reviews"][-1]["reason"]}
                            for i in items if i["reviews"] and i["judge_decision"] in VERDICTS
                            and i["reviews"][-1]["verdict"] != i["judge_decision"]]
    return out


def rebuild(out: str | Path) -> dict:
    """dataset.jsonl = every trajectory whose final verdict is accept; review.json = agreement; card refreshed."""
    from k2lab.synth import card

    out = Path(out)
    items = ReviewSession(out).items()
    final = [i for i in items if (i["reviews"][-1]["verdict"] if i["reviews"] else i["judge_decision"]) == "accept"]
    rewrite_jsonl(out / "dataset.jsonl", [{k: v for k, v in i.items() if k not in ("reviews", "judge_decision")}
                                          | {"human_verdict": i["reviews"][-1] if i["reviews"] else None}
                                          for i in final])
    stats = agreement(items) | {"dataset": len(final)}
    write_json(out / "review.json", stats)
    card.write(out)
    return stats


def review_tui(session: ReviewSession, ask: Callable[[str], str] = input, show: Callable[[str], None] = print) -> int:
    """Go through the pending queue: a(ccept), r(eject), s(kip) or q(uit); returns how many were reviewed."""
    done = 0
    for i in session.pending():
        show(f"\n=== {i['task_id']} ({i['domain']}) ===\nGoal: {goal(i)}\nRubric: {i['rubric']['success_criteria']}\n"
             f"{transcript(i['messages'])}\nJudges: " +
             "; ".join(f"{v['judge']}: {v['grade']} {v['explanation']}" for v in i["verdicts"] if v.get("grade")))
        key = ask("[a]ccept / [r]eject / [s]kip / [q]uit: ").strip().lower()[:1]
        if key == "q":
            break
        if key in ("a", "r"):
            session.review(i["task_id"], "accept" if key == "a" else "reject", ask("reason: ").strip())
            done += 1
    return done


def render_page(session: ReviewSession, message: str = "") -> str:
    esc, items = html.escape, session.items()
    stats = agreement(items)
    cards = []
    for i in items:
        latest = i["reviews"][-1] if i["reviews"] else None
        status = f"{latest['verdict']}ed by {esc(latest['reviewer'])}: {esc(latest['reason'])}" if latest else "not reviewed"
        judges = "".join(f"<li><b>{esc(v['judge'])}</b>: {v['grade']} <i>{esc(v['explanation'])}</i></li>"
                         for v in i["verdicts"] if v.get("checkpoint") == "rubric")
        cards.append(f"""<section class="item" id="item-{esc(i['task_id'])}">
<h3>{esc(i['domain'])} <small>{esc(i['task_id'])}</small></h3><p><b>Goal</b> {esc(goal(i))}</p>
<p><b>Rubric</b> {esc('; '.join(i['rubric']['success_criteria']))}</p><pre>{esc(transcript(i['messages']))}</pre>
<ul>{judges}</ul><p>Judges: <b class="decision">{i['judge_decision']}</b> &middot; <span class="status">{status}</span></p>
<form method="post" action="/review"><input type="hidden" name="task_id" value="{esc(i['task_id'])}">
<input type="text" name="reason" placeholder="reason" size="40">
<button type="submit" name="verdict" value="accept" class="accept">Accept</button>
<button type="submit" name="verdict" value="reject" class="reject">Reject</button></form></section>""")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>k2lab synth review</title><style>
body{{font-family:sans-serif;max-width:60em;margin:1em auto}} .item{{border:1px solid #ccd;border-radius:6px;
padding:.2em 1em;margin:1em 0}} pre{{white-space:pre-wrap;background:#f6f6f8}} .msg{{color:#a00}}</style></head>
<body><h1>Synthesized trajectories: review</h1><p class="msg">{esc(message)}</p>
<p id="metrics">pending {len(session.pending())} &middot; reviewed {stats['reviewed']} &middot; Cohen's kappa
<b>{stats.get('cohen_kappa', 'n/a')}</b></p>{''.join(cards)}</body></html>"""


def make_server(session: ReviewSession, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, code: int, body: str, headers: dict | None = None) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(200, render_page(session)) if self.path.split("?")[0] == "/" else self._send(404, "not found")

        def do_POST(self) -> None:
            form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
            get = lambda k: form.get(k, [""])[0]  # noqa: E731
            try:
                session.review(get("task_id"), get("verdict"), get("reason"))
            except (ValueError, KeyError) as e:
                return self._send(400, render_page(session, message=str(e)))
            self._send(303, "", {"Location": f"/#item-{get('task_id')}"})

    return ThreadingHTTPServer((host, port), Handler)


def main(out: str | Path, web: bool, host: str, port: int, reviewer: str) -> None:
    session = ReviewSession(out, reviewer)
    if not web:
        print(f"reviewed {review_tui(session)}; {rebuild(out)}")
        return
    serve_until_interrupted(make_server(session, host, port), host)
