"""`python -m deploy.ops order|user|dlq|doctor …` (the `danbao` script's order, user, dlq and doctor)."""
from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from typing import Any

from deploy.ops import dlq, doctor, story
from deploy.ops.common import dumps, short_time


def _set_path(obj: dict[str, Any], path: str, raw: str) -> None:
    """`data.reason=text` or `data.amount=100` (a JSON value when it parses as one)."""
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    *parents, last = path.split(".")
    for p in parents:
        obj = obj.setdefault(p, {})
        if not isinstance(obj, dict):
            raise SystemExit(f"cannot set {path}: {p} is not an object")
    obj[last] = value


def _edited_value(letter: dlq.DeadLetter, args: argparse.Namespace) -> bytes | None:
    if args.value_file:
        with open(args.value_file, "rb") as f:
            return f.read()
    if not args.set:
        return None
    env = dlq.decoded(letter.value)
    if not isinstance(env, dict):
        raise SystemExit("the dead letter is not a JSON object: give the whole fixed record with --value-file")
    for item in args.set:
        path, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants path=value, got {item!r}")
        _set_path(env, path, raw)
    return json.dumps(env, ensure_ascii=False).encode()


async def _run(args: argparse.Namespace) -> int:
    if args.cmd == "order":
        s = await story.order_story(args.order_id)
        print(dumps(s) if args.json else story.render_order(s))
        return 0 if s["found"] else 1
    if args.cmd == "user":
        s = await story.user_story(args.user_id)
        print(dumps(s) if args.json else story.render_user(s))
        return 0 if s["found"] else 1
    if args.cmd == "doctor":
        report = await doctor.diagnose(grace_seconds=args.grace, max_lag=args.max_lag, audit_wait=args.audit_wait)
        print(dumps(report.as_dict()) if args.json else doctor.render(report))
        return 0 if report.ok else 1
    # dlq
    try:
        if args.action == "list":
            letters = await dlq.read([args.topic] if args.topic else None)
            replayed = {r["dead_letter"]: r for r in await dlq.history(10_000)}
            rows = [{**d.summary(), "replayed": d.position in replayed} for d in letters]
            if args.json:
                print(dumps(rows))
            else:
                print(f"{len(rows)} dead letters")
                for r in rows:
                    print(f"  {r['position']:<28} {short_time(r['at'])}  {r['code'] or '-':<20} "
                          f"{(r['type'] or '?'):<16} key={r['key']}{'  (replayed)' if r['replayed'] else ''}")
                    print(f"      {(r['message'] or '')[:160]}")
            return 0
        if args.action == "show":
            print(dumps((await dlq.show(args.position)).detail()))
            return 0
        if args.action == "history":
            print(dumps(await dlq.history()))
            return 0
        letter = await dlq.show(args.position)
        result = await dlq.replay(args.position, value=_edited_value(letter, args),
                                  operator=args.operator or os.environ.get("DANBAO_OPERATOR") or getpass.getuser())
        print(dumps(result) if args.json else
              f"replayed {result['dead_letter']} to {result['topic']} partition {result['partition']} offset "
              f"{result['offset']} (event {result['event_id']}{', edited' if result['edited'] else ''})")
        return 0
    except dlq.ReplayError as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        return 2 if exc.code == "ALREADY_REPLAYED" else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="danbao", description="Operate Danbao: stories, dead letters, stuck work")
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("order", help="an order's whole story across every service")
    o.add_argument("order_id")
    o.add_argument("--json", action="store_true")
    u = sub.add_parser("user", help="a user's wallet, holds, Huabei account, statements and recent payments")
    u.add_argument("user_id")
    u.add_argument("--json", action="store_true")
    d = sub.add_parser("doctor", help="stuck work; exit 1 when something needs a human")
    d.add_argument("--json", action="store_true")
    d.add_argument("--grace", type=float, default=60, help="seconds a timer may be late before it counts (60)")
    d.add_argument("--max-lag", type=int, default=10_000, help="records a consumer group may be behind (10000)")
    d.add_argument("--audit-wait", type=float, default=5, help="seconds to let in-flight money settle (5)")
    q = sub.add_parser("dlq", help="dead letters: list, show, replay, history")
    qs = q.add_subparsers(dest="action", required=True)
    ql = qs.add_parser("list")
    ql.add_argument("--topic", help="one dead-letter topic, e.g. orders.events.dlq")
    ql.add_argument("--json", action="store_true")
    qsh = qs.add_parser("show")
    qsh.add_argument("position", help="<topic>.dlq:<partition>:<offset>, as `list` prints it")
    qs.add_parser("history", help="the replays done so far")
    qr = qs.add_parser("replay", help="send a dead letter (or a fixed copy) back to its topic, once")
    qr.add_argument("position")
    qr.add_argument("--set", action="append", metavar="PATH=VALUE",
                    help="edit the record first, e.g. --set data.reason=fixed (repeatable)")
    qr.add_argument("--value-file", help="replay this file's bytes instead (the whole fixed record)")
    qr.add_argument("--operator", help="who replays (default $DANBAO_OPERATOR or the login name)")
    qr.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
