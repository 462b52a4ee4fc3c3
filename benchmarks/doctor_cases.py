"""The doctor against induced pathologies: each case of tests/doctor/test_induced.py, on the real
default model, with the top finding and whether it named the cause; one case's full report
(markdown + picture) written out as the worked example.

    python benchmarks/doctor_cases.py --report docs/img/doctor-batch-cap.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.doctor.test_induced import CASES, run_case, top  # noqa: E402
from tests.model.real import loaded  # noqa: E402
from tokenmill.doctor.evidence import windows  # noqa: E402
from tokenmill.doctor.report import markdown, plot  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", default=None, help="write the first case's markdown report here (PNG beside it)")
    args = ap.parse_args()
    model = loaded("auto")
    rows, right = [], 0
    for i, case in enumerate(CASES):
        findings, recording = run_case(model, case)
        got = top(findings)
        right += got == case.expected
        first = next((f for f in findings if f.severity != "info"), None)
        rows.append(f"| {case.name} | `{case.expected}` | `{got}`" + (f" ({first.severity}): {first.fix}" if first else "")
                    + f" | {'yes' if got == case.expected else '**no**'} |")
        print(rows[-1], flush=True)
        if i == 0 and args.report:
            out = Path(args.report)
            ws = windows(recording)
            picture = plot(ws, out.with_suffix(".png"))
            out.write_text(markdown(findings, ws, recording.seconds, picture.name))
    print("\n| case | expected | top finding above info | right? |\n|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{right} of {len(CASES)} right")
    return 0 if right == len(CASES) else 1


if __name__ == "__main__":
    sys.exit(main())
