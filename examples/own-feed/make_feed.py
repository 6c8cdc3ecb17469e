#!/usr/bin/env python3
"""A feed Payguard was not built for, to try the worked example of docs (README, "Your own feed"):
card payments with their own columns -- `txn_ref`, `ts_ms` (epoch ms), `amount_cents`, `card`,
`shop`, `entry` (a category), `v1` .. `v4` (anonymised numeric signals, as real data sets publish
them) -- and a label file of the frauds, reported a day or two after each.

    python3 make_feed.py OUT_DIR [--days 14] [--cards 3000] [--seed 7]

writes OUT_DIR/feed.jsonl and OUT_DIR/labels.jsonl. Standard library only; same seed, same bytes.
"""
import argparse
import json
import os
import random
from datetime import datetime, timedelta, timezone

START = datetime(2026, 10, 1, tzinfo=timezone.utc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--days", type=int, default=14)
    ap.add_argument("--cards", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    rnd = random.Random(a.seed)
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for c in range(a.cards):
        # Each card pays a few times a day at its usual shops; some cards are compromised once,
        # and then pay in a burst of keyed-in charges whose signals look unusual.
        shops = [rnd.randrange(400) for _ in range(3)]
        t = START + timedelta(minutes=rnd.uniform(0, 600))
        end = START + timedelta(days=a.days)
        burst_at = START + timedelta(days=rnd.uniform(2, a.days)) if rnd.random() < 0.04 else None
        while t < end:
            rows.append((t, c, rnd.choice(shops), False))
            t += timedelta(hours=rnd.expovariate(1 / 7.0))
        if burst_at:
            bt = burst_at
            for _ in range(rnd.randint(3, 9)):
                rows.append((bt, c, rnd.randrange(400), True))
                bt += timedelta(minutes=rnd.uniform(0.5, 12))
    rows.sort(key=lambda r: (r[0], r[1]))
    with open(os.path.join(a.out, "feed.jsonl"), "w") as feed, \
            open(os.path.join(a.out, "labels.jsonl"), "w") as labels:
        for i, (t, c, shop, fraud) in enumerate(rows):
            ref = f"tx{i:07d}"
            g = rnd.gauss
            msg = {
                "txn_ref": ref,
                "ts_ms": int(t.timestamp() * 1000),
                "amount_cents": int(rnd.lognormvariate(8.2 if fraud else 7.6, 0.9)),
                "card": f"card{c:05d}",
                "shop": f"shop{shop:03d}",
                "entry": (rnd.choices(["keyed", "chip", "contactless"], [0.6, 0.3, 0.1])[0] if fraud
                          else rnd.choices(["keyed", "chip", "contactless"], [0.05, 0.55, 0.4])[0]),
                "v1": round(g(1.6 if fraud else 0.0, 1.0), 4),
                "v2": round(g(-1.2 if fraud else 0.0, 1.0), 4),
                "v3": round(g(0.0, 1.0), 4),
                "v4": round(g(0.7 if fraud else 0.0, 1.3), 4),
            }
            feed.write(json.dumps(msg, separators=(",", ":")) + "\n")
            if fraud:
                reported = t + timedelta(hours=rnd.uniform(20, 60))
                labels.write(json.dumps({
                    "transaction_id": ref, "label": "fraud", "fraud_scenario": "compromised_card",
                    "reported_at": reported.strftime("%Y-%m-%dT%H:%M:%SZ"),
                }) + "\n")
    print(f"{len(rows)} transactions, {sum(r[3] for r in rows)} frauds -> {a.out}")


if __name__ == "__main__":
    main()
