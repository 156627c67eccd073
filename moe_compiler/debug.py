"""What the backend matched, fused and rejected, and why: log lines, the dump directory, tlparse artifacts.

    TORCH_LOGS=+moe_compiler          one line per compiled graph (debug: one line per region)
    MOE_COMPILER_DUMP_DIR=path        per graph: summary.txt, report.json and, per region, before.py
                                      (the matched subgraph), after.py (its replacement), region.dot
    TORCH_TRACE=dir + tlparse         the same report as a `moe_compiler_report` artifact
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re

import torch

log = logging.getLogger("moe_compiler")

_graph_ids = itertools.count()


@dataclasses.dataclass
class RegionReport:
    name: str
    cls: str
    num_nodes: int
    status: str = "rejected"  # "fused" | "rejected"
    reason: str = ""
    found_by: str = "module"  # "module" (a *Experts module), "data flow" (top-k ids), "index_add_ loop"
    eager: bool = False  # the reason is transformers' experts_implementation="eager" loop (graph breaks)
    form: str = ""
    spec: str = ""
    shape: dict = dataclasses.field(default_factory=dict)
    check: str = ""
    weights: str = ""  # how the op reads the expert weights (loops over per-expert parameters: re-laid out once)
    # The router feeding the fused experts call: fused into one route call, or left to Inductor and why.
    router_status: str = "not tried"  # "fused" | "not tried" | "rejected"
    router_form: str = ""
    router_spec: str = ""
    router_check: str = ""
    router_reason: str = ""
    # The shared-experts branch added to the fused call's output: "fused" (into the experts call's shared_*
    # arguments), "matched" (proven, but left to Inductor: shared_reason says why), "none" (the block has none),
    # "rejected" (a shared branch we could not prove; the block is still right).
    shared_status: str = "not tried"
    shared: str = ""
    shared_check: str = ""
    shared_reason: str = ""
    before: str = ""
    after: str = ""
    dot: str = ""


@dataclasses.dataclass
class GraphReport:
    graph_id: int = dataclasses.field(default_factory=lambda: next(_graph_ids))
    num_nodes: int = 0
    regions: list[RegionReport] = dataclasses.field(default_factory=list)
    # How Inductor is asked to build the graph's host code: "C++ (cpp_wrapper)", or "Python: <why>" (backend.py)
    host_code: str = ""
    router_gemv: int = 0  # route ops whose router linear became a fused reduction (passes/router_linear.py)
    # Per-expert weight groups to re-lay out once compile_fx is done (passes.restack_planned); not reported.
    restack: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def fused(self) -> list[RegionReport]:
        return [r for r in self.regions if r.status == "fused"]

    @property
    def rejected(self) -> list[RegionReport]:
        return [r for r in self.regions if r.status != "fused"]

    @property
    def fused_routers(self) -> list[RegionReport]:
        return [r for r in self.fused if r.router_status == "fused"]

    def summary_line(self) -> str:
        forms = sorted({r.form for r in self.fused})
        line = (
            f"moe_compiler graph {self.graph_id} ({self.num_nodes} nodes): {len(self.regions)} experts regions, "
            f"{len(self.fused)} fused{' (' + ', '.join(forms) + ')' if forms else ''}, {len(self.rejected)} rejected"
        )
        if self.fused:
            line += f"; routers: {len(self.fused_routers)} fused"
            kept = sorted({r.router_reason for r in self.fused if r.router_status != "fused" and r.router_reason})
            if kept:
                line += " (left to Inductor: " + " | ".join(kept) + ")"
            line += self._shared_summary()
        if self.rejected:
            reasons = sorted({r.reason for r in self.rejected})
            line += "; rejected because: " + " | ".join(reasons)
        if self.fused and self.host_code:
            line += f"; host code: {self.host_code}"
        if self.router_gemv:
            line += f"; {self.router_gemv} router linear(s) as a fused reduction"
        return line

    def _shared_summary(self) -> str:
        """'; shared experts: 2 fused, 1 matched, left to Inductor (why), 1 not proven (why)', or '' if none."""
        parts = []
        for status, label in (("fused", "fused"), ("matched", "matched, left to Inductor"), ("rejected", "not proven")):
            regions = [r for r in self.fused if r.shared_status == status]
            if regions:
                why = sorted({r.shared_reason for r in regions if r.shared_reason}) if status != "fused" else []
                parts.append(f"{len(regions)} {label}" + (" (" + " | ".join(why) + ")" if why else ""))
        return "; shared experts: " + ", ".join(parts) if parts else ""

    def summary_text(self) -> str:
        lines = [self.summary_line(), ""]
        for r in self.regions:
            found = "" if r.found_by == "module" else f", found by {r.found_by}"
            lines.append(f"[{r.status}] {r.name} ({r.cls}, {r.num_nodes} nodes{found})")
            if r.status == "fused":
                lines.append(f"    form: {r.form}; spec: {r.spec}; sizes: {r.shape}")
                lines.append(f"    numerical check: {r.check}")
                if r.weights:
                    lines.append(f"    weights: {r.weights}")
                if r.router_status == "fused":
                    lines.append(f"    router fused: {r.router_form}; {r.router_spec}; check: {r.router_check}")
                else:
                    lines.append(f"    router left to Inductor: {r.router_reason}")
                if r.shared_status == "fused":
                    lines.append(f"    shared experts fused into the experts call: {r.shared}")
                elif r.shared_status == "matched":
                    lines.append(f"    shared experts: {r.shared}; left to Inductor: {r.shared_reason}")
                elif r.shared_status == "rejected":
                    lines.append(f"    shared experts not proven (left to Inductor): {r.shared_reason}")
            else:
                lines.append(f"    reason: {r.reason}")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {
            "graph_id": self.graph_id,
            "num_nodes": self.num_nodes,
            "host_code": self.host_code,
            "router_gemv": self.router_gemv,
            "regions": [
                {k: v for k, v in dataclasses.asdict(r).items() if k not in ("before", "after", "dot")}
                for r in self.regions
            ],
        }


def region_dot(nodes) -> str:
    """A Graphviz picture of a region's data flow (render with `dot -Tpng region.dot`)."""
    lines = ["digraph region {", "  rankdir=TB; node [shape=box, fontsize=10];"]
    names = {n.name for n in nodes}
    for n in nodes:
        label = f"{n.name}\\n{n.op}: {getattr(n.target, '__name__', n.target)}"
        lines.append(f'  "{n.name}" [label="{label}"];')
        for a in n.all_input_nodes:
            style = "" if a.name in names else " [style=dashed]"
            lines.append(f'  "{a.name}" -> "{n.name}"{style};')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:80]


def write_dump(report: GraphReport, dump_dir: str) -> str:
    gdir = os.path.join(dump_dir, f"graph_{report.graph_id}")
    os.makedirs(gdir, exist_ok=True)
    with open(os.path.join(gdir, "summary.txt"), "w") as f:
        f.write(report.summary_text())
    with open(os.path.join(gdir, "report.json"), "w") as f:
        json.dump(report.to_json(), f, indent=2, default=str)
    for i, r in enumerate(report.regions):
        rdir = os.path.join(gdir, f"region_{i}_{r.status}_{_safe(r.name)}")
        os.makedirs(rdir, exist_ok=True)
        for fname, text in (("before.py", r.before), ("after.py", r.after), ("region.dot", r.dot)):
            if text:
                with open(os.path.join(rdir, fname), "w") as f:
                    f.write(text)
        with open(os.path.join(rdir, "spec.json" if r.status == "fused" else "reason.txt"), "w") as f:
            if r.status == "fused":
                router = {k: getattr(r, "router_" + k) for k in ("status", "form", "spec", "check", "reason")}
                shared = {k: getattr(r, "shared_" + k) for k in ("status", "check", "reason")} | {"match": r.shared}
                spec = {"form": r.form, "spec": r.spec, "sizes": r.shape, "check": r.check, "weights": r.weights}
                json.dump({**spec, "router": router, "shared_experts": shared}, f, indent=2, default=str)
            else:
                f.write(r.reason + "\n")
    with open(os.path.join(dump_dir, "summary.txt"), "a") as f:
        f.write(report.summary_text() + "\n")
    return gdir


def emit(report: GraphReport, dump_dir: str | None) -> None:
    """Log the report, write the dump if asked, and hand it to tlparse."""
    has_eager = any(r.eager for r in report.rejected)
    level = logging.WARNING if has_eager else logging.INFO
    if report.regions or log.isEnabledFor(logging.DEBUG):
        # The report rides on the record too, so a handler (tools/support_matrix.py) reads it typed, not parsed.
        log.log(level, "%s", report.summary_line(), extra={"moe_compiler_report": report})
    for r in report.regions:
        log.debug("  [%s] %s: %s", r.status, r.name, r.spec if r.status == "fused" else r.reason)
        if r.status == "fused":
            router = r.router_spec if r.router_status == "fused" else r.router_reason
            log.debug("      router %s: %s", r.router_status, router)
            if r.shared_status in ("fused", "matched", "rejected"):
                log.debug("      shared experts %s: %s", r.shared_status, r.shared or r.shared_reason)
    if dump_dir:
        path = write_dump(report, dump_dir)
        log.info("moe_compiler dump for graph %d written to %s", report.graph_id, path)
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "moe_compiler_report", "encoding": "json"},
        payload_fn=lambda: json.dumps(report.to_json(), default=str),
    )
