"""Human review of judge grades: a programmatic session, a terminal UI (rich) and a small local web page.

A review is appended to reviews.jsonl next to the judge's grades, which are never touched: `accept` records
the judge's grade as the person's, `overrule` records another grade with a reason. The latest review of an
item is its grade; metrics, judge-human agreement (Cohen's kappa, confusion matrix, disagreements, and
Krippendorff's alpha when there are more than two raters) are recomputed after every review.
"""

from __future__ import annotations

import html
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs

from k2lab.evals import calibration
from k2lab.evals.judge import GRADES, LETTER
from k2lab.evals.stats import cohen_kappa, confusion_matrix, krippendorff_alpha
from k2lab.runs import append_jsonl

PAST = {"accept": "accepted", "overrule": "overruled"}


def agreement(items: list[dict]) -> dict:
    """Judge vote vs the latest review on reviewed items (kappa, confusion, disagreements); Krippendorff's alpha
    over every judge and every reviewer (each one's latest review of an item) when there are more than two."""
    pairs = [(i["judge_grade"], i["reviews"][-1]["grade"]) for i in items if i["reviews"] and i["judge_grade"]]
    out: dict = {"reviewed_with_judge_grade": len(pairs), "labels": list(GRADES)}
    if pairs:
        judge, human = zip(*pairs)
        kappa = cohen_kappa(judge, human)
        out["cohen_kappa"] = None if kappa != kappa else kappa
        out["confusion_judge_rows_human_cols"] = confusion_matrix(judge, human, list(GRADES))
    out["disagreements"] = [{"id": i["id"], "question": i["question"], "judge": i["judge_grade"],
                             "human": i["reviews"][-1]["grade"], "reason": i["reviews"][-1]["reason"]}
                            for i in items if i["reviews"] and i["reviews"][-1]["grade"] != i["judge_grade"]]
    judges = sorted({g["judge"] for i in items for g in i["grades"]})
    reviewers = sorted({r["reviewer"] for i in items for r in i["reviews"]})
    if len(judges) + len(reviewers) > 2:
        ratings = [[next((g["grade"] for g in i["grades"] if g["judge"] == j), None) for i in items]
                   for j in judges]
        ratings += [[next((r["grade"] for r in reversed(i["reviews"]) if r["reviewer"] == name), None) for i in items]
                    for name in reviewers]
        alpha = krippendorff_alpha(ratings)
        out["krippendorff_alpha"] = None if alpha != alpha else alpha
        out["alpha_raters"] = judges + [f"reviewer:{name}" for name in reviewers]
    return out


class ReviewSession:
    """Accept or overrule the grades of one calibration run directory."""

    def __init__(self, run_dir: str | Path, reviewer: str = "human"):
        self.run_dir, self.reviewer = Path(run_dir), reviewer
        if not (self.run_dir / "grades.jsonl").exists():
            raise FileNotFoundError(f"{self.run_dir}: no grades.jsonl; run `k2lab eval calibration` first")
        self._lock = threading.Lock()  # the web page serves requests on threads

    def items(self) -> list[dict]:
        return calibration.load_items(self.run_dir)

    def pending(self) -> list[dict]:
        return [i for i in self.items() if not i["reviews"]]

    def item(self, item_id: str) -> dict:
        for i in self.items():
            if i["id"] == item_id:
                return i
        raise KeyError(f"no graded item {item_id!r} in {self.run_dir}")

    def accept(self, item_id: str, reason: str = "") -> dict:
        item = self.item(item_id)
        if not item["judge_grade"]:
            raise ValueError(f"item {item_id!r} has no judge grade to accept; overrule it with a grade")
        return self._record(item, "accept", item["judge_grade"], reason or "accepted")

    def overrule(self, item_id: str, grade: str, reason: str) -> dict:
        letter = grade.upper() if grade.upper() in GRADES else LETTER.get(grade.upper())
        if not letter:
            raise ValueError(f"grade must be one of {list(GRADES)} or {list(LETTER)}, got {grade!r}")
        if not reason.strip():
            raise ValueError("an overrule needs a reason")
        return self._record(self.item(item_id), "overrule", letter, reason.strip())

    def _record(self, item: dict, action: str, grade: str, reason: str) -> dict:
        rec = {"id": item["id"], "action": action, "grade": grade, "judge_grade": item["judge_grade"],
               "reason": reason, "reviewer": self.reviewer, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with self._lock:
            append_jsonl(self.run_dir / "reviews.jsonl", rec)
            calibration.finalize(self.run_dir)
        return rec


# ---- terminal UI -------------------------------------------------------------------------------------------

def render_item(item: dict, index: int, total: int):
    """A rich renderable of one item: question, gold, answer, each judge's grade and explanation."""
    from rich.panel import Panel
    from rich.table import Table

    t = Table.grid(padding=(0, 1))
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column()
    t.add_row("domain", f"{item['domain']} / {item['topic']}")
    t.add_row("question", item["question"])
    t.add_row("gold", item["gold"])
    t.add_row("answer", item["answer"] or "(empty)")
    for g in item["grades"]:
        t.add_row(f"judge {g['judge']}", f"[bold]{g['label']}[/bold]  {g['explanation']}")
    vote = GRADES[item["judge_grade"]] if item["judge_grade"] else ("TIE" if item["tie"] else "UNGRADED")
    t.add_row("vote", f"[bold yellow]{vote}[/bold yellow]")
    return Panel(t, title=f"item {index}/{total}  [dim]{item['id']}[/dim]", border_style="blue")


def review_tui(session: ReviewSession, ask: Callable[[str], str] | None = None, console=None) -> int:
    """Go through pending items: [a]ccept, [o]verrule (grade + reason), [s]kip, [q]uit. Returns reviews made.

    `ask(prompt) -> str` reads one answer (rich's console.input by default); tests pass a scripted one.
    """
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    ask = ask or (lambda prompt: console.input(escape(prompt)))  # "[a]ccept" is text, not rich markup
    pending, done = session.pending(), 0
    for n, item in enumerate(pending, 1):
        console.print(render_item(item, n, len(pending)))
        while True:
            choice = ask("[a]ccept  [o]verrule  [s]kip  [q]uit > ").strip().lower()
            if choice == "q":
                return done
            if choice == "s":
                break
            try:
                if choice == "a":
                    session.accept(item["id"], ask("reason (optional) > "))
                elif choice == "o":
                    grade = ask("grade A=CORRECT B=INCORRECT C=PARTIAL_ANSWER D=NOT_ATTEMPTED > ")
                    session.overrule(item["id"], grade, ask("reason > "))
                else:
                    console.print(f"[red]unknown choice {choice!r}[/red]")
                    continue
            except ValueError as e:
                console.print(f"[red]{e}[/red]")
                continue
            done += 1
            break
    results = calibration.finalize(session.run_dir)
    console.print(f"reviewed {done}; Omniscience Index now {results['overall']['omniscience_index']}")
    return done


# ---- web page ----------------------------------------------------------------------------------------------

def render_page(session: ReviewSession, message: str = "", pending_only: bool = False) -> str:
    items, esc = session.items(), html.escape
    if not (session.run_dir / "results.json").exists():
        calibration.finalize(session.run_dir)
    results = json.loads((session.run_dir / "results.json").read_text())
    o, ag = results["overall"], results["agreement"]
    cards = []
    for i in items:
        if pending_only and i["reviews"]:
            continue
        latest = i["reviews"][-1] if i["reviews"] else None
        status = (f"{PAST[latest['action']]}: {GRADES[latest['grade']]} ({esc(latest['reason'])})" if latest
                  else "not reviewed")
        judges = "".join(f"<li><b>{esc(g['judge'])}</b>: {g['label']} <i>{esc(g['explanation'])}</i></li>"
                         for g in i["grades"])
        vote = GRADES[i["judge_grade"]] if i["judge_grade"] else ("TIE" if i["tie"] else "UNGRADED")
        options = "".join(f'<option value="{k}">{k} {v}</option>' for k, v in GRADES.items())
        cards.append(f"""
<section class="item" id="item-{esc(i['id'])}" data-id="{esc(i['id'])}">
  <h3>{esc(i['domain'])} / {esc(i['topic'])} <small>{esc(i['id'])}</small></h3>
  <p><b>Question</b> {esc(i['question'])}</p><p><b>Gold</b> {esc(i['gold'])}</p>
  <p><b>Answer</b> {esc(i['answer']) or '<i>(empty)</i>'}</p>
  <ul>{judges}</ul><p>Judge vote: <b class="vote">{vote}</b> &middot; <span class="status">{status}</span></p>
  <form method="post" action="/review">
    <input type="hidden" name="id" value="{esc(i['id'])}">
    <input type="text" name="reason" placeholder="reason" size="40">
    <button type="submit" name="action" value="accept" class="accept">Accept</button>
    <select name="grade">{options}</select>
    <button type="submit" name="action" value="overrule" class="overrule">Overrule</button>
  </form>
</section>""")
    kappa = ag.get("cohen_kappa")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>k2lab review</title><style>
body{{font-family:sans-serif;max-width:60em;margin:1em auto;color:#222}} .item{{border:1px solid #ccd;
border-radius:6px;padding:.2em 1em;margin:1em 0}} small{{color:#888}} .msg{{color:#a00}} ul{{margin:.2em 0}}
</style></head><body><h1>k2lab review: {esc(str(session.run_dir.name))}</h1>
<p class="msg">{esc(message)}</p><p><a href="/">all items</a> &middot; <a href="/?pending=1">not reviewed</a></p>
<p id="metrics">Omniscience Index <b>{_fmt(o['omniscience_index'])}</b> &middot; accuracy
<b>{_fmt(o['accuracy'])}</b> &middot; hallucination rate <b>{_fmt(o['hallucination_rate'])}</b> &middot;
reviewed {results['reviewed']}/{len(items)}, overruled {results['overruled']} &middot; Cohen's kappa
<b>{_fmt(kappa)}</b></p>{''.join(cards)}</body></html>"""


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def make_server(session: ReviewSession, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for the review page (port 0 picks a free one); call serve_forever() on it."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep the terminal quiet
            pass

        def _send(self, code: int, body: str, ctype: str = "text/html; charset=utf-8", headers=None) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            if path == "/":
                self._send(200, render_page(session, pending_only="pending=1" in query))
            elif self.path == "/results.json":
                self._send(200, (session.run_dir / "results.json").read_text(), "application/json")
            else:
                self._send(404, "not found", "text/plain")

        def do_POST(self) -> None:
            if self.path != "/review":
                return self._send(404, "not found", "text/plain")
            form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
            get = lambda k: form.get(k, [""])[0]  # noqa: E731
            try:
                if get("action") == "accept":
                    session.accept(get("id"), get("reason"))
                elif get("action") == "overrule":
                    session.overrule(get("id"), get("grade"), get("reason"))
                else:
                    raise ValueError(f"unknown action {get('action')!r}")
            except (ValueError, KeyError) as e:
                return self._send(400, render_page(session, message=str(e)))
            self._send(303, "", headers={"Location": f"/#item-{get('id')}"})

    return ThreadingHTTPServer((host, port), Handler)


def main(run_dir: str | Path, web: bool, host: str, port: int, reviewer: str) -> None:
    """`k2lab review RUN_DIR`: the terminal UI, or with web=True the local page until Ctrl-C."""
    session = ReviewSession(run_dir, reviewer)
    if not web:
        review_tui(session)
        return
    serve_until_interrupted(make_server(session, host, port), host)


def serve_until_interrupted(server: ThreadingHTTPServer, host: str) -> None:
    """Serve a review page until Ctrl-C (calibration and synthesis reviews alike)."""
    print(f"review page: http://{host}:{server.server_address[1]}/  (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
