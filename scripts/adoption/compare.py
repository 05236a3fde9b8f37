"""Compare a suite's plain run with its run under bgtasks (JUnit XML from pytest).

    python compare.py <suite> <plain.xml> <bgtasks.xml> <bgtasks.apps> <seconds>

Exit status 1 if any test passes in one run and not in the other, or if the
bgtasks run created no app (the plugin did not take).
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def outcomes(path: str) -> dict[str, str]:
    if not Path(path).exists():
        return {}
    result: dict[str, str] = {}
    for case in ET.parse(path).iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        kind = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                kind = "failed"
            elif child.tag == "skipped":
                kind = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
        result[test] = kind
    return result


def counts(result: dict[str, str]) -> str:
    kinds = ("passed", "failed", "skipped", "xfailed")
    return ", ".join(f"{sum(v == k for v in result.values())} {k}" for k in kinds)


def main() -> int:
    suite, plain_xml, adopt_xml, apps_file, seconds = sys.argv[1:6]
    plain, adopt = outcomes(plain_xml), outcomes(adopt_xml)
    apps = Path(apps_file).read_text().strip() if Path(apps_file).exists() else "no report"
    print(f"{suite}: plain:   {counts(plain)}")
    print(f"{suite}: bgtasks: {counts(adopt)} ({apps}; both runs {seconds}s)")
    passed_plain = {t for t, k in plain.items() if k == "passed"}
    passed_adopt = {t for t, k in adopt.items() if k == "passed"}
    lost = sorted(passed_plain - passed_adopt)
    gained = sorted(passed_adopt - passed_plain)
    ok = bool(plain) and not lost and not gained and "apps=0 asgi_apps=0" not in apps
    for name, tests in (("passes only without bgtasks", lost), ("passes only with", gained)):
        for test in tests[:30]:
            print(f"  {name}: {test}")
        if len(tests) > 30:
            print(f"  ... and {len(tests) - 30} more")
    print(f"{suite}: {'same results' if ok else 'DIFFERENT'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
