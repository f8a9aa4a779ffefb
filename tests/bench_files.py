"""What every `idlegrid bench` run must leave for its user, checked the same way wherever a test runs one."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def check_bench_outputs(out: Path, results: dict) -> str:
    """Every file a user opens is there and valid; returns report.md."""
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == sum(r["sent"] for r in results["runs"])
    report = (out / "report.md").read_text()
    pngs = sorted(out.glob("*.png"))
    assert pngs
    for png in pngs:
        with Image.open(png) as image:
            image.verify()  # raises on a broken PNG
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
        assert f"]({png.name})" in report  # embedded in the report
    return report
