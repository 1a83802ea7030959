"""
How the resident's voice answer is read: the decision rules run over the project's table of
replies (tests/data/resident_decisions.json) and over replies made by spoiling each plain
yes with a negation, a "?", a question word, a deferral, a condition, a send-away, sarcasm
or a hedge put in at a random place, in random case, with or without accents.

Prints, per category, how many replies came out authorized / denied / who / unclear, and
the headline figures: the share of plain yeses still recognized, the number of false yeses
(replies that are not a plain yes but came out authorized; must be 0), and the number of
replies tried.

    python benchmarks/decisions.py
    python benchmarks/decisions.py --spoiled 20000 --seed 7 --json decisions.json
    python benchmarks/decisions.py --code /path/to/other/checkout   # the rules of another tree

Pure Python, no server: a run takes about a second.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "tests" / "data" / "resident_decisions.json"
CATEGORIES = ("authorize", "may_ask_again", "who", "deny", "must_not_authorize")

SPOILERS = [
    # negation
    "não", "nao", "num", "nem", "nunca", "jamais", "nada", "ninguém", "de jeito nenhum",
    # questions
    "?", "quem é?", "né?", "como assim", "quem", "qual", "hein",
    # deferral
    "amanhã", "outro dia", "depois", "mais tarde", "outra hora", "semana que vem",
    # conditions
    "se for o João", "só se", "mas", "desde que seja rápido", "caso seja entrega", "porém",
    # send-away, sarcasm, hedges
    "deixa na portaria", "com o porteiro", "manda embora", "manda voltar", "pode desligar",
    "deixa pra lá", "pode esquecer", "e eu sou o Papa", "tá maluco", "só que não", "acho",
    "talvez", "sei lá", "pode ser",
]  # fmt: skip
SEPARATORS = [" ", " ", " ", ", ", ". ", "! ", "... ", "… "]


def spoil(rng: random.Random, yes: str) -> str:
    words = yes.split()
    words.insert(rng.randint(0, len(words)), rng.choice(SPOILERS))
    text = words[0]
    for word in words[1:]:
        text += rng.choice(SEPARATORS) + word
    text += rng.choice(["", ".", "!", "?", "..."])
    out = []
    for ch in text:
        if rng.random() < 0.5:
            ch = unicodedata.normalize("NFKD", ch)
            ch = "".join(c for c in ch if not unicodedata.combining(c))
        out.append(ch.upper() if rng.random() < 0.3 else ch)
    return "".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", default=str(TABLE), help="the decision table (JSON)")
    parser.add_argument("--spoiled", type=int, default=10000, help="spoiled yeses to try")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--code", help="import audiosocket from this checkout instead")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    sys.path.insert(0, args.code or str(ROOT))
    from audiosocket.flow.nlu import Decision, classify_decision

    table = json.loads(Path(args.table).read_text("utf-8"))
    rows = []
    for category in CATEGORIES:
        counts = {d: 0 for d in Decision}
        for text in table.get(category, []):
            counts[classify_decision(text)] += 1
        row = {"category": category, "replies": sum(counts.values())}
        rows.append(row | {d.value: n for d, n in counts.items()})

    rng = random.Random(args.seed)
    spoiled = [spoil(rng, rng.choice(table["authorize"])) for _ in range(args.spoiled)]
    false_spoiled = [t for t in spoiled if classify_decision(t) is Decision.AUTHORIZED]
    rows.append(
        {
            "category": "spoiled yes (generated)",
            "replies": len(spoiled),
            "authorized": len(false_spoiled),
            "denied": None,
            "who": None,
            "unclear": None,
        }
    )

    yeses = rows[0]
    false_table = sum(r["authorized"] for r in rows[1:-1])
    tried = sum(r["replies"] for r in rows)
    figures = {
        "plain_yes_recognized": (
            yeses["authorized"] / yeses["replies"] if yeses["replies"] else None
        ),
        "plain_yeses": yeses["replies"],
        "false_yes_table": false_table,
        "false_yes_spoiled": len(false_spoiled),
        "replies_tried": tried,
        "rows": rows,
        "false_yes_examples": [
            t for c in CATEGORIES[1:] for t in table.get(c, [])
            if classify_decision(t) is Decision.AUTHORIZED
        ][:20] + false_spoiled[:20],
    }  # fmt: skip

    columns = [
        ("category", "category"), ("replies", "replies"), ("authorized", "authorized"),
        ("denied", "denied"), ("who", "who"), ("unclear", "unclear"),
    ]  # fmt: skip
    lines = [
        "| " + " | ".join(h for _, h in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        cells = ("-" if row[k] is None else str(row[k]) for k, _ in columns)
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print()
    print(
        "plain yeses recognized: {}/{} ({:.1f} %); false yeses: {} in the table, {} of {} "
        "spoiled yeses; replies tried: {}".format(
            yeses["authorized"],
            yeses["replies"],
            100.0 * (figures["plain_yes_recognized"] or 0),
            false_table,
            len(false_spoiled),
            len(spoiled),
            tried,
        )
    )
    for example in figures["false_yes_examples"]:
        print("  false yes: {!r}".format(example))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
    return 0 if false_table == 0 and not false_spoiled else 1


if __name__ == "__main__":
    sys.exit(main())
