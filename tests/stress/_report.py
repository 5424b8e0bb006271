"""The counts every stress test reports, printed as one table at the end of the run."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Row:
    part: str
    metric: str
    value: str
    target: str = ""
    ok: bool | None = None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def add(
        self, part: str, metric: str, value: object, target: str = "", ok: bool | None = None
    ) -> None:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        self.rows.append(Row(part, metric, text, target, ok))

    def table(self) -> str:
        if not self.rows:
            return ""
        head = ("part", "metric", "value", "target", "")
        cells = [
            (r.part, r.metric, r.value, r.target, {None: "", True: "ok", False: "FAIL"}[r.ok])
            for r in self.rows
        ]
        widths = [max(len(c[i]) for c in [head, *cells]) for i in range(5)]
        lines = []
        last = None
        for c in [head, *cells]:
            if c is not head and c[0] == last:
                c = ("", *c[1:])
            else:
                last = c[0]
                if c is not head:
                    lines.append("-" * (sum(widths) + 8))
            lines.append("  ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)).rstrip())
        return "\n".join(lines)


REPORT = Report()
