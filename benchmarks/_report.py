"""Turn the raw per-rank, per-repeat timings into summary numbers, ratios, targets and markdown.

Reduction order: for each repeat, the slowest rank (max) is the time of the operation; over
repeats, min and median. Ratios use medians. GB/s is decimal (1e9 bytes) over the whole
checkpoint (all ranks' bytes).
"""

from __future__ import annotations

import statistics
from typing import Any

TARGETS = {
    "save_vs_dcp": 0.9,  # ckptguard sync save throughput / raw DCP throughput
    "load_vs_dcp": 0.9,  # ckptguard load throughput / raw DCP throughput
    "async_stall_pct": 10.0,  # async stall as % of ckptguard sync save time
    "extras_pct": 5.0,  # (ckptguard save - raw DCP save) as % of ckptguard save
}

_TIME_KEYS = ("save_s", "load_cold_s", "load_warm_s", "stall_s", "staged_s", "complete_s",
              "rehash_s", "trace_record_s", "retention_s", "load_cold_noverify_s")
_MEM_KEYS = ("save_mem", "load_mem", "held_mem")


def reduce_ranks(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One repeat of one method: max over ranks of every time, memory and extra."""
    out: dict[str, Any] = {}
    for key in _TIME_KEYS + _MEM_KEYS:
        vals = [r[key] for r in per_rank if r.get(key) is not None]
        if vals:
            out[key] = max(vals)
    for key in ("save_extras", "load_extras"):
        labels = {label for r in per_rank for label in r.get(key, {})}
        if labels:
            out[key] = {lb: max(r.get(key, {}).get(lb, 0.0) for r in per_rank) for lb in labels}
    drops = {r.get("cache_drop") for r in per_rank if r.get("cache_drop")}
    if drops:
        out["cache_drop"] = ",".join(sorted(drops))
    return out


def summarize(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """min / median over repeats of each reduced metric of one method."""
    out: dict[str, Any] = {}
    for key in _TIME_KEYS + _MEM_KEYS:
        vals = [r[key] for r in repeats if key in r]
        if vals:
            out[key] = {"min": min(vals), "median": statistics.median(vals), "n": len(vals)}
    for key in ("save_extras", "load_extras"):
        labels = sorted({lb for r in repeats for lb in r.get(key, {})})
        if labels:
            out[key] = {
                lb: {"min": min(r.get(key, {}).get(lb, 0.0) for r in repeats),
                     "median": statistics.median(r.get(key, {}).get(lb, 0.0) for r in repeats)}
                for lb in labels
            }
    drops = {r["cache_drop"] for r in repeats if "cache_drop" in r}
    if drops:
        out["cache_drop"] = ",".join(sorted(drops))
    return out


def _med(summary: dict[str, Any], method: str, key: str) -> float | None:
    m = summary.get(method, {}).get(key)
    return m["median"] if m else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, computed from one configuration's medians."""
    cg_save = _med(summary, "ckptguard", "save_s")
    dcp_save = _med(summary, "dcp", "save_s")
    out: dict[str, Any] = {
        "save_vs_dcp": _ratio(dcp_save, cg_save),
        "load_cold_vs_dcp": _ratio(_med(summary, "dcp", "load_cold_s"),
                                   _med(summary, "ckptguard", "load_cold_s")),
        "load_warm_vs_dcp": _ratio(_med(summary, "dcp", "load_warm_s"),
                                   _med(summary, "ckptguard", "load_warm_s")),
    }
    retention = _med(summary, "ckptguard", "retention_s")
    out["save_with_retention_vs_dcp"] = _ratio(
        dcp_save, None if cg_save is None or retention is None else cg_save + retention
    )
    stall = _med(summary, "ckptguard async", "stall_s")
    out["async_stall_pct"] = None if stall is None or not cg_save else 100 * stall / cg_save
    out["extras_pct"] = (
        None if cg_save is None or dcp_save is None else 100 * (cg_save - dcp_save) / cg_save
    )
    out["met"] = {
        "save_vs_dcp": _ge(out["save_vs_dcp"], TARGETS["save_vs_dcp"]),
        "load_cold_vs_dcp": _ge(out["load_cold_vs_dcp"], TARGETS["load_vs_dcp"]),
        "load_warm_vs_dcp": _ge(out["load_warm_vs_dcp"], TARGETS["load_vs_dcp"]),
        "async_stall_pct": _le(out["async_stall_pct"], TARGETS["async_stall_pct"]),
        "extras_pct": _le(out["extras_pct"], TARGETS["extras_pct"]),
    }
    return out


def _ge(v: float | None, t: float) -> bool | None:
    return None if v is None else v >= t


def _le(v: float | None, t: float) -> bool | None:
    return None if v is None else v <= t


# ------------------------------------------------------------------------------------ markdown


def _fmt_s(m: dict[str, Any] | None) -> str:
    return "—" if not m else f"{m['min']:.3f} / {m['median']:.3f}"


def _fmt_x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def _gbps(nbytes: int, m: dict[str, Any] | None) -> str:
    return "—" if not m or m["median"] <= 0 else f"{nbytes / m['median'] / 1e9:.2f}"


def _mib(m: dict[str, Any] | None) -> str:
    return "—" if not m else f"{m['median'] / 2**20:.0f}"


def _mark(ok: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "—"}[ok]


def config_markdown(cfg: dict[str, Any]) -> str:
    """Tables of one (ranks, size) configuration."""
    s = cfg["summary"]
    nbytes = cfg["total_bytes"]
    lines = [
        f"### {cfg['size_gib']:g} GiB state ({nbytes / 2**30:.3f} GiB of tensors), "
        f"{cfg['nproc']} rank{'s' if cfg['nproc'] > 1 else ''} ({cfg['parallelism']}), "
        f"tensors on {cfg.get('device', 'cpu')}, "
        f"DCP thread_count={cfg['thread_count']}, {cfg['repeats']} repeats",
        "",
        "Times are min / median seconds of the slowest rank; GB/s and ratios use medians; "
        "ratio = throughput of the row / throughput of the reference (higher is better).",
        "",
        "| method | save s | save GB/s | vs DCP | vs torch.save | vs disk | load cold s | "
        "load GB/s | vs DCP | load warm s | vs DCP | save peak extra RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = {k: _med(s, k, "save_s") for k in ("dcp", "torch.save", "disk")}
    ref_cold = _med(s, "dcp", "load_cold_s")
    ref_warm = _med(s, "dcp", "load_warm_s")
    for method in ("disk", "torch.save", "dcp", "ckptguard"):
        if method not in s:
            continue
        m = s[method]
        save = _med(s, method, "save_s")
        cold = _med(s, method, "load_cold_s")
        warm = _med(s, method, "load_warm_s")
        lines.append(
            f"| {method} | {_fmt_s(m.get('save_s'))} | {_gbps(nbytes, m.get('save_s'))} | "
            f"{_fmt_x(_ratio(ref['dcp'], save))} | {_fmt_x(_ratio(ref['torch.save'], save))} | "
            f"{_fmt_x(_ratio(ref['disk'], save))} | {_fmt_s(m.get('load_cold_s'))} | "
            f"{_gbps(nbytes, m.get('load_cold_s'))} | {_fmt_x(_ratio(ref_cold, cold))} | "
            f"{_fmt_s(m.get('load_warm_s'))} | {_fmt_x(_ratio(ref_warm, warm))} | "
            f"{_mib(m.get('save_mem'))} |"
        )
    cg_save = _med(s, "ckptguard", "save_s")
    async_methods = [m for m in ("dcp.async_save", "ckptguard async") if m in s]
    lines += [] if not async_methods else [
        "",
        "| async method | caller stall s | stall % of ckptguard sync save | staged s | "
        "complete s | complete GB/s | peak extra RSS MiB | staging copy kept MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in async_methods:
        m = s[method]
        stall = _med(s, method, "stall_s")
        pct = "—" if stall is None or not cg_save else f"{100 * stall / cg_save:.1f}%"
        lines.append(
            f"| {method} | {_fmt_s(m.get('stall_s'))} | {pct} | {_fmt_s(m.get('staged_s'))} | "
            f"{_fmt_s(m.get('complete_s'))} | {_gbps(nbytes, m.get('complete_s'))} | "
            f"{_mib(m.get('save_mem'))} | {_mib(m.get('held_mem'))} |"
        )
    lines += [
        "",
        "Memory columns are per rank (max over ranks). A staging copy kept between saves is "
        "allocated by the first async save only, so it shows in that save's peak RSS and in the "
        "last column, not in the median peak.",
    ]
    lines += _extras_markdown(cfg)
    t = cfg["targets"]
    lines += [
        "",
        "| target | value | goal | status |",
        "|---|---|---|---|",
        f"| sync save throughput vs raw DCP (checksums included) | {_fmt_x(t['save_vs_dcp'])} | "
        f">= {TARGETS['save_vs_dcp']}x | {_mark(t['met']['save_vs_dcp'])} |",
        f"| (for information) sync save + deleting the previous checkpoint (`keep_last`) vs "
        f"raw DCP save | {_fmt_x(t.get('save_with_retention_vs_dcp'))} | — | — |",
        f"| load (cold cache) vs raw DCP (verify_on_load included) | "
        f"{_fmt_x(t['load_cold_vs_dcp'])} | >= {TARGETS['load_vs_dcp']}x | "
        f"{_mark(t['met']['load_cold_vs_dcp'])} |",
        f"| load (warm cache) vs raw DCP | {_fmt_x(t['load_warm_vs_dcp'])} | "
        f">= {TARGETS['load_vs_dcp']}x | {_mark(t['met']['load_warm_vs_dcp'])} |",
        f"| async stall, % of sync save | {_pct(t['async_stall_pct'])} | "
        f"<= {TARGETS['async_stall_pct']:g}% | {_mark(t['met']['async_stall_pct'])} |",
        f"| extras: (ckptguard save - raw DCP save) / ckptguard save | {_pct(t['extras_pct'])} | "
        f"<= {TARGETS['extras_pct']:g}% | {_mark(t['met']['extras_pct'])} |",
        "",
    ]
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}%"


def _extras_markdown(cfg: dict[str, Any]) -> list[str]:
    s = cfg["summary"]
    cg = s.get("ckptguard", {})
    save_med = _med(s, "ckptguard", "save_s")
    load_med = _med(s, "ckptguard", "load_cold_s")
    lines = [
        "",
        "Where ckptguard's time goes (median seconds inside the sync save / cold load, slowest "
        "rank; rows overlap: RNG capture is inside the rank file, the 'of which' rows inside "
        "the row above them, and fsync and crc32 run at the same time):",
        "",
        "| extra | seconds | % of ckptguard save or load |",
        "|---|---|---|",
    ]
    present = cfg.get("probes_present", {})
    for label, ok in present.items():
        if not ok:
            lines.append(f"| {label} | not in this version | — |")
            continue
        shown = [(key, ref, cg.get(key, {}).get(label))
                 for key, ref in (("save_extras", save_med), ("load_extras", load_med))]
        shown = [(key, ref, m) for key, ref, m in shown if m and m["median"] > 0]
        for key, ref, m in shown:
            pct = "—" if not ref else f"{100 * m['median'] / ref:.1f}%"
            where = "" if len(shown) == 1 else (" — in the save" if key == "save_extras" else " — in the load")
            lines.append(f"| {label}{where} | {m['median']:.4f} | {pct} |")
    retention = cg.get("retention_s")
    if retention:
        pct = "—" if not save_med else f"{100 * retention['median'] / save_med:.1f}%"
        lines.append(f"| retention (`keep_last`): deleting the previous checkpoint, which `save()` "
                     f"does after the commit (not in the save times above) | "
                     f"{retention['median']:.4f} | {pct} |")
    noverify = cg.get("load_cold_noverify_s")
    if noverify:
        pct = "—" if not load_med else f"{100 * noverify['median'] / load_med:.1f}%"
        dcp_cold = _med(s, "dcp", "load_cold_s")
        vs = "" if not dcp_cold else f", {dcp_cold / noverify['median']:.2f}x raw DCP"
        lines.append(f"| (for information) the same cold load with `verify_on_load=False`{vs} | "
                     f"{noverify['median']:.4f} | {pct} |")
    trace = cg.get("trace_record_s")
    if trace:
        lines.append(f"| run trace: `record(step, loss, batch)` of an 8x2048 int64 batch, per "
                     f"training step | {trace['median']:.5f} | per step, not per save |")
    rehash = cg.get("rehash_s")
    if rehash:
        pct = "—" if not save_med else f"{100 * rehash['median'] / save_med:.1f}%"
        lines.append(f"| (reference) a serial second pass of crc32 over the rank's files, warm "
                     f"cache | {rehash['median']:.4f} | {pct} |")
    return lines


def results_markdown(results: dict[str, Any]) -> str:
    mi = results["machine"]
    disk = mi.get("disk", {})
    head = [
        "# ckptguard checkpoint benchmark",
        "",
        f"Command: `{results['command']}`",
        "",
        f"- CPU: {mi.get('cpu')} ({mi.get('cores')} cores), RAM {mi.get('ram_gib')} GiB",
        f"- Disk: {disk.get('device')} ({disk.get('fs')}, rotational={disk.get('rotational')}) "
        f"mounted at {disk.get('mount')}; workdir {results['workdir']}",
        f"- torch {mi.get('torch')}, Python {mi.get('python')}, kernel {mi.get('kernel')}, "
        f"CUDA device: {mi.get('cuda') or 'none'}, ckptguard's crc32: {mi.get('crc32', 'zlib')}",
        f"- load average at start {mi.get('loadavg_start')}, at end {results.get('loadavg_end')}",
        f"- page cache before cold loads dropped by: {results.get('cache_drop', '?')}",
        "",
    ]
    body = [config_markdown(cfg) for cfg in results["configs"]]
    return "\n".join(head + body)
