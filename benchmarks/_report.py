"""Turn the raw per-rank, per-repeat timings into summary numbers, ratios, targets and markdown.

Reduction order: for each repeat, the slowest rank (max) is the time of the operation; over
repeats, min and median. Ratios use medians. GB/s is decimal (1e9 bytes) over the whole
checkpoint (all ranks' bytes).
"""

from __future__ import annotations

import statistics
from typing import Any

# Targets of issue 12 (medians, ratios measured side by side in one run).
TARGETS = {
    "save_vs_dcp": 1.0,  # ckptguard sync save (retention on) throughput / raw dcp.save throughput
    "load_vs_dcp": 1.0,  # ckptguard load throughput / raw dcp.load throughput
    "async_stall_pct": 2.0,  # async caller stall as % of the (default) sync save time
    "extras_pct": 3.0,  # (ckptguard keep_last=None save - raw DCP save) as % of that save
    "sync_mem_copies": 1.0,  # sync save: peak extra RSS / state size below 1 (no full copy)
    "async_mem_copies": 2.0,  # async: held staging + peak extra RSS below 2 copies (at most one)
}
# The save target is stated for these sizes; at the others the ratio is shown, not judged.
SAVE_TARGET_SIZES_GIB = (0.5, 2.0)
SYNC_ROWS = ("ckptguard", "ckptguard keep_last=1", "ckptguard keep_last=None")

_TIME_KEYS = ("save_s", "load_cold_s", "load_warm_s", "stall_s", "staged_s", "complete_s",
              "rehash_s", "trace_record_s", "retention_tail_s", "load_cold_noverify_s")
_MEM_KEYS = ("save_mem", "load_mem", "held_mem")
_COUNT_KEYS = ("deleted_n",)


def reduce_ranks(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One repeat of one method: max over ranks of every time, memory, count and extra."""
    out: dict[str, Any] = {}
    for key in _TIME_KEYS + _MEM_KEYS + _COUNT_KEYS:
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
    """min / median / max over repeats of each reduced metric of one method."""
    out: dict[str, Any] = {}
    for key in _TIME_KEYS + _MEM_KEYS + _COUNT_KEYS:
        vals = [r[key] for r in repeats if key in r]
        if vals:
            out[key] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals),
                        "n": len(vals)}
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


def _peak(summary: dict[str, Any], method: str, key: str) -> float | None:
    m = summary.get(method, {}).get(key)
    return m.get("max", m["median"]) if m else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def targets(summary: dict[str, Any], size_gib: float, local_bytes: int) -> dict[str, Any]:
    """Issue 12's targets from one configuration's medians (memory: the worst repeat).

    ``local_bytes``: one rank's share of the state (the largest), the unit of the memory ratios.
    """
    cg_save = _med(summary, "ckptguard", "save_s")
    dcp_save = _med(summary, "dcp", "save_s")
    bare_save = _med(summary, "ckptguard keep_last=None", "save_s")
    out: dict[str, Any] = {
        "save_vs_dcp": _ratio(dcp_save, cg_save),
        "save_keep1_vs_dcp": _ratio(dcp_save, _med(summary, "ckptguard keep_last=1", "save_s")),
        "save_noretention_vs_dcp": _ratio(dcp_save, bare_save),
        "load_cold_vs_dcp": _ratio(_med(summary, "dcp", "load_cold_s"),
                                   _med(summary, "ckptguard", "load_cold_s")),
        "load_warm_vs_dcp": _ratio(_med(summary, "dcp", "load_warm_s"),
                                   _med(summary, "ckptguard", "load_warm_s")),
    }
    stall = _med(summary, "ckptguard async", "stall_s")
    out["async_stall_pct"] = None if stall is None or not cg_save else 100 * stall / cg_save
    out["extras_pct"] = (
        None if bare_save is None or dcp_save is None else 100 * (bare_save - dcp_save) / bare_save
    )
    sync_mem = [v for m in SYNC_ROWS if (v := _peak(summary, m, "save_mem")) is not None]
    out["sync_mem_ratio"] = _ratio(max(sync_mem), local_bytes) if sync_mem else None
    async_mem = _peak(summary, "ckptguard async", "save_mem")
    held = _peak(summary, "ckptguard async", "held_mem") or 0
    out["async_mem_ratio"] = None if async_mem is None else _ratio(async_mem + held, local_bytes)
    judged = any(abs(size_gib - t) < 1e-9 for t in SAVE_TARGET_SIZES_GIB)
    save_goal = TARGETS["save_vs_dcp"]
    out["met"] = {
        "save_vs_dcp": _ge(out["save_vs_dcp"], save_goal) if judged else None,
        "save_keep1_vs_dcp": _ge(out["save_keep1_vs_dcp"], save_goal) if judged else None,
        "load_cold_vs_dcp": _ge(out["load_cold_vs_dcp"], TARGETS["load_vs_dcp"]),
        "load_warm_vs_dcp": _ge(out["load_warm_vs_dcp"], TARGETS["load_vs_dcp"]),
        "async_stall_pct": _le(out["async_stall_pct"], TARGETS["async_stall_pct"]),
        "extras_pct": _le(out["extras_pct"], TARGETS["extras_pct"]),
        "sync_mem_copies": _lt(out["sync_mem_ratio"], TARGETS["sync_mem_copies"]),
        "async_mem_copies": _lt(out["async_mem_ratio"], TARGETS["async_mem_copies"]),
    }
    return out


def linear_fit(gib: list[float], seconds: list[float]) -> tuple[float, float, float] | None:
    """Least-squares ``seconds = intercept + slope * gib``: (slope s/GiB, intercept s, R^2).

    Near-linear cost means R^2 close to 1 and a small intercept; None with fewer than two
    distinct sizes.
    """
    if len(set(gib)) < 2:
        return None
    n = len(gib)
    mx, my = sum(gib) / n, sum(seconds) / n
    sxx = sum((x - mx) ** 2 for x in gib)
    sxy = sum((x - mx) * (y - my) for x, y in zip(gib, seconds, strict=True))
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in seconds)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(gib, seconds, strict=True))
    r2 = 1.0 if ss_tot == 0 else 1 - ss_res / ss_tot
    return slope, intercept, r2


def _lt(v: float | None, t: float) -> bool | None:
    return None if v is None else v < t


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


def _s_per_gib(nbytes: int, m: dict[str, Any] | None) -> str:
    return "—" if not m else f"{m['median'] / (nbytes / 2**30):.2f}"


def _mib(m: dict[str, Any] | None) -> str:
    return "—" if not m else f"{m['median'] / 2**20:.0f}"


def _copies(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def status_text(ok: bool | None) -> str:
    """How a target reads in the tables: misses stand out, sizes without a target say nothing."""
    return {True: "met", False: "**MISSED**", None: "—"}[ok]


def _cell(text: str, ok: bool | None) -> str:
    return text if ok is None or text == "—" else f"{text} {status_text(ok)}"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}%"


def _keep_label(cfg: dict[str, Any], method: str) -> str:
    keep = cfg.get("keep_last", {}).get(method, "?")
    return f"keep_last={keep}"


# ------------------------------------------------------------------------------------ headline


def headline_markdown(configs: list[dict[str, Any]]) -> list[str]:
    """The user's view, first in results.md: retention on, against the raw PyTorch calls."""
    if not configs:
        return []
    default_keep = _keep_label(configs[0], "ckptguard")
    repeats = sorted({c["repeats"] for c in configs})
    sizes = " and ".join(f"{g:g}" for g in SAVE_TARGET_SIZES_GIB)
    lines = [
        "## Headline: what a user gets (retention on)",
        "",
        f"Medians of {'/'.join(map(str, repeats))} interleaved repeats, slowest rank. Save and "
        "load columns are throughput ratios against the raw PyTorch call on the same state in "
        "the same run (raw time / ckptguard time: 1.00x = as fast, higher = faster). The "
        "ckptguard saves delete the oldest checkpoint beyond `keep_last` as part of the save, as "
        "in a user's run; raw `dcp.save` deletes nothing while timed. Targets (issue 12): save "
        f">= {TARGETS['save_vs_dcp']:g}x at {sizes} GiB (other sizes: shown, not judged); load "
        f">= {TARGETS['load_vs_dcp']:g}x; async stall <= {TARGETS['async_stall_pct']:g}% of "
        f"the sync save; extras (checksums, RNG, manifest, guard) <= "
        f"{TARGETS['extras_pct']:g}% of the save; sync save without a full copy of the state "
        "(extra RSS / state < 1), async with at most one staging copy (< 2).",
        "",
        f"| ranks | state | sync save ({default_keep}, default) vs dcp.save | sync save "
        "(keep_last=1) vs dcp.save | load cold vs dcp.load | load warm vs dcp.load | async "
        "stall, % of sync save | extras, % of save | sync save extra RSS / state | async extra "
        "RSS / state |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg in configs:
        t = cfg["targets"]
        met = t["met"]
        lines.append(
            f"| {cfg['nproc']} | {cfg['size_gib']:g} GiB | "
            f"{_cell(_fmt_x(t['save_vs_dcp']), met['save_vs_dcp'])} | "
            f"{_cell(_fmt_x(t['save_keep1_vs_dcp']), met['save_keep1_vs_dcp'])} | "
            f"{_cell(_fmt_x(t['load_cold_vs_dcp']), met['load_cold_vs_dcp'])} | "
            f"{_cell(_fmt_x(t['load_warm_vs_dcp']), met['load_warm_vs_dcp'])} | "
            f"{_cell(_pct(t['async_stall_pct']), met['async_stall_pct'])} | "
            f"{_cell(_pct(t['extras_pct']), met['extras_pct'])} | "
            f"{_cell(_copies(t['sync_mem_ratio']), met['sync_mem_copies'])} | "
            f"{_cell(_copies(t['async_mem_ratio']), met['async_mem_copies'])} |"
        )
    lines += ["", "Targets over all configurations:", ""]
    names = [
        ("save_vs_dcp", f"sync save, {default_keep} (default), vs raw dcp.save", _fmt_x),
        ("save_keep1_vs_dcp", "sync save, keep_last=1, vs raw dcp.save", _fmt_x),
        ("load_cold_vs_dcp", "load (cold cache) vs raw dcp.load", _fmt_x),
        ("load_warm_vs_dcp", "load (warm cache) vs raw dcp.load", _fmt_x),
        ("async_stall_pct", "async caller stall, % of sync save", _pct),
        ("extras_pct", "extras, % of save", _pct),
        ("sync_mem_copies", "sync save: no full copy of the state", _copies),
        ("async_mem_copies", "async: at most one staging copy", _copies),
    ]
    value_key = {"sync_mem_copies": "sync_mem_ratio", "async_mem_copies": "async_mem_ratio"}
    for key, label, fmt in names:
        judged = [(c, c["targets"]["met"].get(key)) for c in configs]
        judged = [(c, ok) for c, ok in judged if ok is not None]
        if not judged:
            why = (f"no configuration at {sizes} GiB in this run"
                   if key.startswith("save") else "not measured")
            lines.append(f"- {label}: {why}")
            continue
        missed = [c for c, ok in judged if not ok]
        if not missed:
            lines.append(f"- {label}: met in all {len(judged)} judged configurations")
            continue
        where = ", ".join(
            f"{c['nproc']} rank{'s' if c['nproc'] > 1 else ''} {c['size_gib']:g} GiB "
            f"({fmt(c['targets'][value_key.get(key, key)])})" for c in missed
        )
        lines.append(f"- {label}: **MISSED** in {len(missed)} of {len(judged)}: {where}")
    return lines + [""]


def cost_markdown(configs: list[dict[str, Any]]) -> list[str]:
    """Seconds per GiB of each row at each size, and a straight-line fit over the sizes."""
    sizes = sorted({c["size_gib"] for c in configs})
    rows = [("disk", "save_s"), ("torch.save", "save_s"), ("dcp", "save_s"),
            ("ckptguard", "save_s"), ("ckptguard keep_last=1", "save_s"),
            ("ckptguard keep_last=None", "save_s"), ("dcp", "load_cold_s"),
            ("ckptguard", "load_cold_s"), ("dcp.async_save", "complete_s"),
            ("ckptguard async", "complete_s"), ("ckptguard async", "stall_s")]
    lines = [
        "## Cost vs bytes",
        "",
        "Median seconds per GiB of state (all ranks' bytes) at each size, and a least-squares "
        "fit `seconds = fixed + slope x GiB` over the sizes: near-linear cost shows as a steady "
        "s/GiB, R² near 1 and a small fixed part.",
        "",
        "| ranks | row | what | " + " | ".join(f"s/GiB at {g:g} GiB" for g in sizes)
        + " | fit: s/GiB | fit: fixed s | R² |",
        "|---|---|---|" + "---|" * len(sizes) + "---|---|---|",
    ]
    for nproc in sorted({c["nproc"] for c in configs}):
        mine = [c for c in configs if c["nproc"] == nproc]
        for method, key in rows:
            points = [(c["total_bytes"] / 2**30, c["summary"][method][key]["median"], c)
                      for c in mine if key in c["summary"].get(method, {})]
            if not points:
                continue
            per = {c["size_gib"]: f"{sec / gib:.2f}" for gib, sec, c in points}
            fit = linear_fit([p[0] for p in points], [p[1] for p in points])
            fitted = "— | — | —" if fit is None else f"{fit[0]:.2f} | {fit[1]:.3f} | {fit[2]:.3f}"
            what = {"save_s": "save", "load_cold_s": "load cold", "complete_s": "async, complete",
                    "stall_s": "async, caller stall"}[key]
            lines.append(f"| {nproc} | {method} | {what} | "
                         + " | ".join(per.get(g, "—") for g in sizes) + f" | {fitted} |")
    return lines + [""]


# ------------------------------------------------------------------------ per configuration


def config_markdown(cfg: dict[str, Any]) -> str:
    """Tables of one (ranks, size) configuration."""
    s = cfg["summary"]
    nbytes = cfg["total_bytes"]
    local = cfg.get("local_bytes") or nbytes
    lines = [
        f"### {cfg['size_gib']:g} GiB state ({nbytes / 2**30:.3f} GiB of tensors), "
        f"{cfg['nproc']} rank{'s' if cfg['nproc'] > 1 else ''} ({cfg['parallelism']}), "
        f"tensors on {cfg.get('device', 'cpu')}, "
        f"DCP thread_count={cfg['thread_count']}, {cfg['repeats']} repeats",
        "",
        "Times are min / median seconds of the slowest rank; s/GiB, GB/s and ratios use medians; "
        "ratio = throughput of the row / throughput of the reference (higher is better). "
        "ckptguard rows save with retention as named (the deletion is inside the save time).",
        "",
        "| method | save s | s/GiB | save GB/s | vs DCP | vs torch.save | vs disk | load cold s | "
        "load GB/s | vs DCP | load warm s | vs DCP | save peak extra RSS MiB | "
        "extra RSS / state |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = {k: _med(s, k, "save_s") for k in ("dcp", "torch.save", "disk")}
    ref_cold = _med(s, "dcp", "load_cold_s")
    ref_warm = _med(s, "dcp", "load_warm_s")
    for method in ("disk", "torch.save", "dcp", *SYNC_ROWS):
        if method not in s:
            continue
        m = s[method]
        save = _med(s, method, "save_s")
        cold = _med(s, method, "load_cold_s")
        warm = _med(s, method, "load_warm_s")
        mem = _peak(s, method, "save_mem")
        lines.append(
            f"| {method} | {_fmt_s(m.get('save_s'))} | {_s_per_gib(nbytes, m.get('save_s'))} | "
            f"{_gbps(nbytes, m.get('save_s'))} | "
            f"{_fmt_x(_ratio(ref['dcp'], save))} | {_fmt_x(_ratio(ref['torch.save'], save))} | "
            f"{_fmt_x(_ratio(ref['disk'], save))} | {_fmt_s(m.get('load_cold_s'))} | "
            f"{_gbps(nbytes, m.get('load_cold_s'))} | {_fmt_x(_ratio(ref_cold, cold))} | "
            f"{_fmt_s(m.get('load_warm_s'))} | {_fmt_x(_ratio(ref_warm, warm))} | "
            f"{_mib(m.get('save_mem'))} | {_copies(_ratio(mem, local))} |"
        )
    cg_save = _med(s, "ckptguard", "save_s")
    async_methods = [m for m in ("dcp.async_save", "ckptguard async") if m in s]
    lines += [] if not async_methods else [
        "",
        "| async method | caller stall s | stall % of ckptguard sync save | staged s | "
        "complete s | complete GB/s | peak extra RSS MiB | staging copy kept MiB | "
        "extra RSS / state |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in async_methods:
        m = s[method]
        stall = _med(s, method, "stall_s")
        pct = "—" if stall is None or not cg_save else f"{100 * stall / cg_save:.1f}%"
        mem = _peak(s, method, "save_mem")
        held = _peak(s, method, "held_mem") or 0
        lines.append(
            f"| {method} | {_fmt_s(m.get('stall_s'))} | {pct} | {_fmt_s(m.get('staged_s'))} | "
            f"{_fmt_s(m.get('complete_s'))} | {_gbps(nbytes, m.get('complete_s'))} | "
            f"{_mib(m.get('save_mem'))} | {_mib(m.get('held_mem'))} | "
            f"{_copies(None if mem is None else _ratio(mem + held, local))} |"
        )
    lines += [
        "",
        "Memory columns are per rank (max over ranks; MiB columns are medians, 'extra RSS / "
        "state' is the worst repeat over this rank's share of the state, "
        f"{local / 2**20:.0f} MiB; for async it adds the staging copy kept between saves). A "
        "staging copy is allocated by the first async save only (in the warm-up), so it is in "
        "'staging copy kept', not in the peak.",
    ]
    lines += _retention_markdown(cfg)
    lines += _extras_markdown(cfg)
    t = cfg["targets"]
    met = t["met"]
    lines += [
        "",
        "| target | value | goal | status |",
        "|---|---|---|---|",
        f"| sync save ({_keep_label(cfg, 'ckptguard')}, default) vs raw DCP save | "
        f"{_fmt_x(t['save_vs_dcp'])} | >= {TARGETS['save_vs_dcp']:g}x | "
        f"{status_text(met['save_vs_dcp'])} |",
        f"| sync save (keep_last=1) vs raw DCP save | {_fmt_x(t['save_keep1_vs_dcp'])} | "
        f">= {TARGETS['save_vs_dcp']:g}x | {status_text(met['save_keep1_vs_dcp'])} |",
        f"| (for information) sync save (keep_last=None) vs raw DCP save | "
        f"{_fmt_x(t.get('save_noretention_vs_dcp'))} | — | — |",
        f"| load (cold cache) vs raw DCP (verify_on_load included) | "
        f"{_fmt_x(t['load_cold_vs_dcp'])} | >= {TARGETS['load_vs_dcp']:g}x | "
        f"{status_text(met['load_cold_vs_dcp'])} |",
        f"| load (warm cache) vs raw DCP | {_fmt_x(t['load_warm_vs_dcp'])} | "
        f">= {TARGETS['load_vs_dcp']:g}x | {status_text(met['load_warm_vs_dcp'])} |",
        f"| async stall, % of sync save | {_pct(t['async_stall_pct'])} | "
        f"<= {TARGETS['async_stall_pct']:g}% | {status_text(met['async_stall_pct'])} |",
        f"| extras: (ckptguard keep_last=None save - raw DCP save) / that save | "
        f"{_pct(t['extras_pct'])} | <= {TARGETS['extras_pct']:g}% | "
        f"{status_text(met['extras_pct'])} |",
        f"| sync save peak extra RSS / state (worst sync row) | {_copies(t['sync_mem_ratio'])} | "
        f"< {TARGETS['sync_mem_copies']:g} | {status_text(met['sync_mem_copies'])} |",
        f"| async (staging kept + peak extra RSS) / state | {_copies(t['async_mem_ratio'])} | "
        f"< {TARGETS['async_mem_copies']:g} | {status_text(met['async_mem_copies'])} |",
        "",
    ]
    return "\n".join(lines)


def _retention_markdown(cfg: dict[str, Any]) -> list[str]:
    s = cfg["summary"]
    rows = [m for m in cfg.get("keep_last", {}) if m in s]
    if not rows:
        return []
    lines = [
        "",
        "Retention in the timed saves (each row's root held its `keep_last` checkpoints before "
        "every timed save; the raw DCP rows delete their previous step after the timing):",
        "",
        "| row | keep_last | checkpoints deleted per timed save (min–max) | deletion still "
        "running after save() returned, s (median / max) |",
        "|---|---|---|---|",
    ]
    for method in rows:
        m = s[method]
        deleted = m.get("deleted_n")
        tail = m.get("retention_tail_s")
        deleted_text = "—" if not deleted else f"{deleted['min']:g}–{deleted['max']:g}"
        tail_text = "—" if not tail else f"{tail['median']:.3f} / {tail['max']:.3f}"
        lines.append(f"| {method} | {cfg['keep_last'][method]} | {deleted_text} | {tail_text} |")
    return lines


def _extras_markdown(cfg: dict[str, Any]) -> list[str]:
    s = cfg["summary"]
    cg = s.get("ckptguard", {})
    save_med = _med(s, "ckptguard", "save_s")
    load_med = _med(s, "ckptguard", "load_cold_s")
    lines = [
        "",
        "Where ckptguard's time goes (median seconds inside the sync save, default `keep_last`, "
        "until its deletions are done / the cold load; slowest rank; rows overlap: RNG capture "
        "is inside the rank file, the 'of which' rows inside the row above them, and fsync and "
        "crc32 run at the same time):",
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
    configs = results["configs"]
    body = ["## Per configuration", ""] + [config_markdown(cfg) for cfg in configs]
    return "\n".join(head + headline_markdown(configs) + cost_markdown(configs) + body)
