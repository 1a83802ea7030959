"""
How much the doorman understands from the visitor's first sentence: the rules
(L{audiosocket.flow.nlu.extract_facts}, with the directory) over the project's table of
visitor sentences (tests/data/visitor_sentences.json: deliveries by app and carrier,
services, domestic staff, family, friends, residents who forgot the key; colloquial and
speech-recognizer style — no punctuation, lower case, numbers in words or digits).

Prints, per fact (intent, visitor name, apartment, resident, block), the share of sentences
where the fact came out as expected; the share where every fact did; and what the flow
would do next: the share of calls that need no follow-up question at all (the apartment
found for sure, the name and purpose said), the share that need no question about *where*
(no "para qual apartamento?", no confirmation) and, of those, the share where that apartment
is the right one; and the questions per call (the apartment, a confirmation, one question for
a missing name and/or purpose — two with the previous flow, which asked them one by one).

    python benchmarks/visitors.py
    python benchmarks/visitors.py --misses             # list the sentences that missed
    python benchmarks/visitors.py --code /work/main    # the rules of another checkout
    python benchmarks/visitors.py --json visitors.json

Pure Python, no server: a run takes about a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "tests" / "data" / "visitor_sentences.json"
FACTS = ("intent", "visitor_name", "apartment", "resident_name", "block")
LABELS = {
    "intent": "intent",
    "visitor_name": "visitor name",
    "apartment": "apartment",
    "resident_name": "resident",
    "block": "block",
}


def _old_lookup(directory, facts, threshold):
    """The flow's look-up before L{audiosocket.flow.call.lookup} (for --code on old trees)."""
    from audiosocket.flow.directory import Match

    if facts.apartment:
        match = directory.find_apartment(facts.apartment)
        if match is not None and facts.resident_name:
            named = directory.find_resident(facts.resident_name, match.apartment, threshold=threshold)
            if named is not None:
                return Match(match.apartment, named.resident, named.score, match.exact)
        return match
    if facts.resident_name:
        return directory.find_resident(facts.resident_name, threshold=threshold)
    return None


def questions(facts, match, one_question: bool) -> list[str]:
    """What the flow asks the visitor after this first sentence, by prompt name."""
    asked = []
    if match is None:
        asked.append("ask_apartment")
    elif not match.exact:
        asked.append("confirm")
    missing = [f for f in ("visitor_name", "intent") if getattr(facts, f) is None]
    if missing and one_question:
        asked.append("ask_" + "_".join(m.split("_")[0] for m in missing))
    else:
        asked += ["ask_" + m.split("_")[0] for m in missing]
    return asked


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", default=str(TABLE), help="the sentence table (JSON)")
    parser.add_argument("--code", help="import audiosocket from this checkout instead")
    parser.add_argument("--misses", action="store_true", help="list the sentences that missed")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    sys.path.insert(0, args.code or str(ROOT))
    from audiosocket.flow.directory import Directory
    from audiosocket.flow.nlu import extract_facts

    try:
        from audiosocket.flow.call import lookup

        one_question = True
    except ImportError:
        lookup, one_question = _old_lookup, False

    table = json.loads(Path(args.table).read_text("utf-8"))
    directory = Directory.from_data(table["directory"])
    sentences = table["sentences"]
    right = {f: 0 for f in FACTS}
    all_right = no_question = where_known = where_right = asked_total = 0
    misses = []
    for case in sentences:
        facts = extract_facts(case["text"], directory)
        wrong = [f for f in FACTS if getattr(facts, f) != case[f]]
        for f in FACTS:
            right[f] += f not in wrong
        all_right += not wrong
        if wrong:
            misses.append(
                {"text": case["text"]}
                | {f: {"expected": case[f], "got": getattr(facts, f)} for f in wrong}
            )
        match = lookup(directory, facts, 80.0)
        asked = questions(facts, match, one_question)
        asked_total += len(asked)
        no_question += not asked
        unasked = not any(q in ("ask_apartment", "confirm") for q in asked)
        where_known += unasked
        where_right += unasked and match.apartment.number == case["apartment"]

    n = len(sentences)

    def share(k: int) -> str:
        return "{}/{} ({:.1f} %)".format(k, n, 100.0 * k / n)

    rows = [(LABELS[f], share(right[f])) for f in FACTS]
    rows += [
        ("every fact", share(all_right)),
        ("no follow-up question", share(no_question)),
        ("apartment without a question", share(where_known)),
        ("… and it is the right one", share(where_right)),
        ("questions per call", "{:.2f}".format(asked_total / n)),
    ]
    print("| measure | sentences |")
    print("|---|---|")
    for label, value in rows:
        print("| {} | {} |".format(label, value))
    if args.misses:
        print()
        for miss in misses:
            print(json.dumps(miss, ensure_ascii=False))
    if args.json:
        figures = {
            "sentences": n,
            "accuracy": {f: right[f] / n for f in FACTS},
            "every_fact": all_right / n,
            "no_follow_up": no_question / n,
            "apartment_without_question": where_known / n,
            "right_apartment_without_question": where_right / n,
            "questions_per_call": asked_total / n,
            "misses": misses,
        }
        Path(args.json).write_text(json.dumps(figures, ensure_ascii=False, indent=2), "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
