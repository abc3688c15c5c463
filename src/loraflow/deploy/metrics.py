"""The router's ``/metrics``: every replica's own series, labelled ``replica="ID"`` (Serve's
replica id), then their sum across replicas without that label, in Prometheus' text format
(a ratio's from its summed parts, the catalog version the least, a longest step the longest).

Each replica reports its engine's ``/metrics`` (``serve/api.py``: among them the adapter hit
rate, the share of requests whose adapter was in memory on arrival) and its routing counters
(``RoutingCounts``) to the catalog with each heartbeat; a ratio's fleet value is recomputed
from the summed counters it is made of, not summed."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# a ratio -> (numerator, denominator): its value across replicas is sum(numerator) / sum(denominator)
RATIOS = {
    "loraflow_adapter_hit_rate": ("loraflow_adapter_requests_without_load_total", "loraflow_adapter_requests_total")
}
# a level every replica has reached: its fleet value is the smallest
LEAST = {"loraflow_catalog_version"}
# a family named ``..._max`` (the longest step of each kind, serve/api.py): its fleet value is the largest
MOST_SUFFIX = "_max"


@dataclass
class RoutingCounts:
    """A replica's own word on where requests went: what arrived here, per adapter, and how
    many adapters Serve's multiplexing gave it. (Whether each request's adapter was already
    in memory is the engine's page's: ``loraflow_adapter_requests_without_load_total``.)"""

    requests: Counter = field(default_factory=Counter)  # adapter -> requests this replica ran with it
    taken_on: int = 0  # adapters Serve's multiplexing gave this replica (its LRU's misses)

    def lines(self) -> list[tuple[str, str, str, float]]:
        """(name, type, labels, value) in the order /metrics shows them."""
        out = [("loraflow_multiplexed_adapters_taken_on_total", "counter", "", self.taken_on)]
        out += [
            ("loraflow_requests_by_adapter_total", "counter", f'adapter="{name}"', n)
            for name, n in sorted(self.requests.items())
        ]
        return out


def render(lines: list[tuple[str, str, str, float]]) -> str:
    out, typed = [], set()
    for name, kind, labels, value in lines:
        if name not in typed:
            typed.add(name)
            out.append(f"# TYPE {name} {kind}")
        out.append(f"{name}{{{labels}}} {number(value)}" if labels else f"{name} {number(value)}")
    return "".join(line + "\n" for line in out)


def number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse(text: str) -> list[tuple[str, str, str, float]]:
    """(name, type, labels, value) of each sample of a Prometheus text page (untyped: "untyped")."""
    kinds, out = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            kinds[name] = kind
        elif line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            out.append((name, kinds.get(name, "untyped"), labels.rstrip("}"), float(value)))
    return out


def merge(pages: dict[str, str]) -> list[tuple[str, str, str, float]]:
    """Each replica's samples labelled with its id, each family followed by its sum per label set."""
    families: dict[str, tuple[str, list]] = {}
    for replica, page in sorted(pages.items()):
        for name, kind, labels, value in parse(page):
            families.setdefault(name, (kind, []))[1].append((replica, labels, value))
    sums = {name: _sums(rows) for name, (_, rows) in families.items()}
    out = []
    for name, (kind, rows) in families.items():
        for replica, labels, value in rows:
            out.append((name, kind, ",".join(x for x in (f'replica="{replica}"', labels) if x), value))
        for labels, total in sums[name].items():
            if name in RATIOS:
                num, den = (sums.get(n, {}).get(labels, 0.0) for n in RATIOS[name])
                total = num / den if den else 0.0
            elif name in LEAST:
                total = min(v for _, lab, v in rows if lab == labels)
            elif name.endswith(MOST_SUFFIX):
                total = max(v for _, lab, v in rows if lab == labels)
            out.append((name, kind, labels, total))
    return out


def _sums(rows) -> dict[str, float]:
    sums: dict[str, float] = {}
    for _, labels, value in rows:
        sums[labels] = sums.get(labels, 0.0) + value
    return sums


def samples(text: str, name: str) -> dict[str, float]:
    """``name``'s samples of a page by their labels ("" for the unlabelled one): for tests and
    benchmarks reading the router's /metrics."""
    return {labels: value for n, _, labels, value in parse(text) if n == name}
