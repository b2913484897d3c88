"""From the measurements to the figures: rows with target, value, spread and verdict; the end-to-end estimate.

Every row: `id` (stable, for tools and the test), `item` (1-6 of the issue), `figure`, `target` (op and
value, or none), `value` (the median), `spread` ([p25, p75]), `unit`, `status` ("met", "missed by X%",
"info", "error") and `why` (for a miss: what the overhead is made of; for info rows, what was measured).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from benchmarks.catalog import (VARIANTS_FILE, class_image_count, method_stages, run_names, training_rows as catalog_rows,
                                variants)
from benchmarks.measure import ratios, summary
from personalize.config import CONF_DIR
from personalize.methods.stages import checkpoint_steps, parse_stages

# What the issue asks for.
TARGETS = {"step_vs_floor": ("<=", 1.05), "e2e": ("<=", 0.15), "eval_generation": (">=", 0.9),
           "metric_share": ("<=", 0.10)}
# Item 4 compares two-stage trained to its 400-step UNet checkpoint (the performance issue's definition)
# with DreamBooth as configured; every other count (token steps, DreamBooth steps, class images) is the
# configured one.
E2E_TWO_STAGE_UNET_STEPS = 400


def row_ids(conf_dir: Path = CONF_DIR, variants_file: Path = VARIANTS_FILE) -> list[str]:
    """Every row a complete benchmark has, in table order (the training rows come from conf/method/ and
    the option variants of benchmarks/variants.yaml)."""
    rows = catalog_rows(conf_dir, variants_file)
    ids = [f"step_vs_floor/{row.name}" for row in rows]
    ids += [f"vs_plain/{row.name}" for row in rows if row.plain]
    ids += [f"naive_vs_ours/{row.name}" for row in rows]
    ids += ["class_images/ours_vs_stock", "e2e/two_stage_vs_dreambooth", "eval/generation_vs_raw", "eval/metric_share"]
    ids += [f"peak_memory/{name}" for name in run_names(conf_dir, variants_file)]
    return ids


def _row(id_, item, figure, value, spread, unit="x", target=None, why="", status=None) -> dict:
    if status is None:
        status = verdict(value, target)
    return {"id": id_, "item": item, "figure": figure, "target": list(target) if target else None, "value": value,
            "spread": spread, "unit": unit, "status": status, "why": why}


def _missing(result: dict | None) -> tuple[str, str]:
    """(why, status) of a figure that has no value: its worker's error, or not asked for."""
    result = result or {}
    if result.get("error"):
        return result["error"], "error"
    return result.get("skipped", "not measured"), "not measured"


def verdict(value, target) -> str:
    if value is None:
        return "error"
    if target is None:
        return "info"
    op, goal = target
    if (op == "<=" and value <= goal) or (op == ">=" and value >= goal):
        return "met"
    miss = value / goal - 1 if op == "<=" else 1 - value / goal
    return f"missed by {miss:.1%}"


def _med(summary_: dict | None):
    return None if not summary_ else summary_.get("median")


def _spread(summary_: dict | None):
    return None if not summary_ or summary_.get("p25") is None else [summary_["p25"], summary_["p75"]]


def _stage(training: dict, method: str, stage: str) -> dict | None:
    res = training.get(method) or {}
    return (res.get("stages") or {}).get(stage)


# ------------------------------------------------------------------ 1, 2, 6: training
def step_summaries(rec: dict) -> dict:
    ours = rec["ours"]
    naive_j = rec.get("naive_j") or list(range(len(rec["naive"])))
    return {
        "ours_s": summary(ours), "floor_s": summary(rec["floor"]), "naive_s": summary(rec["naive"]),
        "ours_loop_s": summary(rec["ours_loop"]), "ours_in_step_s": summary(rec["ours_in_step"]),
        "ours_vs_floor": summary(ratios(ours, rec["floor"])),
        "ours_vs_floor_of_minimums": min(ours) / min(rec["floor"]) if ours and rec["floor"] else None,
        "naive_vs_ours": summary(ratios(rec["naive"], [ours[j] for j in naive_j])),
    }


def _step_why(s: dict, rec: dict) -> str:
    """What ours spends beyond the floor: the parts timed alone at the end of the stage."""
    ours, floor = _med(s["ours_s"]), _med(s["floor_s"])
    loop, in_step = _med(s["ours_loop_s"]), _med(s["ours_in_step_s"])
    parts = [f"ours {ours:.3f} s (training_step + callbacks {in_step:.3f}, loop + data {loop:.3f}) vs floor {floor:.3f} s"]
    c = rec.get("components") or {}
    if c:
        extra = c["optimizer_own_s"] - c["optimizer_floor_s"]
        parts.append(f"{c['optimizer_own']} step {c['optimizer_own_s']:.3f} s vs {c['optimizer_floor']} "
                     f"{c['optimizer_floor_s']:.3f} s (+{extra:.3f})")
        if "clip_s" in c:
            parts.append(f"grad clipping +{c['clip_s']:.3f} s")
    if s["ours_vs_floor_of_minimums"]:
        parts.append(f"ratio of fastest steps {s['ours_vs_floor_of_minimums']:.3f}")
    if rec.get("syncs"):
        parts.append(f"host-device syncs per step {sum(rec['syncs']) / len(rec['syncs']):.1f}")
    return "; ".join(parts) + f" ({s['ours_vs_floor']['n']} pairs)"


def vs_plain_row(row, training: dict) -> dict:
    """An option variant's step ÷ its plain method's step, both measured in this run, each against the
    plain method's floor timed beside it (the yardstick: the same work in both worker processes, so a
    load change between the two processes cancels; `training.plain_floor_maker`).

    value = median(variant step_i ÷ plain floor_i) ÷ median(plain step_i ÷ plain floor_i); spread: the
    quartiles' extremes (p25 ÷ p75 to p75 ÷ p25). The why gives the floors' ratio, paired the same way:
    what the option adds to the least work a step does, our overhead left out."""
    id_, figure = f"vs_plain/{row.name}", f"step ÷ plain {row.plain} step: {row.name}"
    rec = _stage(training, row.run, row.stage)
    plain = next(r for r in catalog_rows() if r.name == row.plain)
    base = _stage(training, plain.run, plain.stage)
    if rec is None or base is None or not rec.get("plain_floor"):
        result = training.get(row.run if rec is None else plain.run)
        why, status = _missing(result)
        if rec is not None and base is None and status == "not measured":
            why = f"needs {plain.run} measured in the same run (--methods {plain.method})"
        elif rec is not None and base is not None:
            why, status = f"{row.run} has no plain-floor times (a worker of an older harness?)", "error"
        return _row(id_, 1, figure, None, None, why=why, status=status)
    mine = summary(ratios(rec["ours"], rec["plain_floor"]))  # variant step ÷ the plain floor beside it
    theirs = summary(ratios(base["ours"], base["floor"]))  # plain step ÷ its own floor (the same work)
    floors = summary(ratios(rec["floor"], rec["plain_floor"]))
    what = next((v.what for v in variants() if v.name == row.run), "")
    why = (f"{what}: {row.name} step ÷ plain floor {mine['median']:.3f} vs {row.plain} step ÷ its floor "
           f"{theirs['median']:.3f} ({mine['n']} and {theirs['n']} pairs); the floors: {row.name} ÷ {row.plain} "
           f"{floors['median']:.3f}; seconds per step {_med(summary(rec['ours'])):.3f} vs {_med(summary(base['ours'])):.3f} "
           f"(two processes: the raw seconds move with the load, the ratios to the plain floor do not)")
    spread = None
    if mine.get("p25") is not None and theirs.get("p25") is not None:
        spread = [mine["p25"] / theirs["p75"], mine["p75"] / theirs["p25"]]
    return _row(id_, 1, figure, mine["median"] / theirs["median"], spread, why=why)


def training_rows(training: dict) -> list[dict]:
    rows, plain_rows, naive_rows = [], [], []
    for row in catalog_rows():
        name, rec = row.name, _stage(training, row.run, row.stage)
        if row.plain:
            plain_rows.append(vs_plain_row(row, training))
        if rec is None:
            why, status = _missing(training.get(row.run))
            rows.append(_row(f"step_vs_floor/{name}", 1, f"step ÷ floor: {name}", None, None,
                             target=TARGETS["step_vs_floor"], why=why, status=status))
            naive_rows.append(_row(f"naive_vs_ours/{name}", 2, f"naive ÷ ours: {name}", None, None, why=why,
                                   status=status))
            continue
        s = step_summaries(rec)
        rows.append(_row(f"step_vs_floor/{name}", 1, f"step ÷ floor: {name}", _med(s["ours_vs_floor"]),
                         _spread(s["ours_vs_floor"]), target=TARGETS["step_vs_floor"], why=_step_why(s, rec)))
        naive, ours = _med(s["naive_s"]), _med(s["ours_s"])
        naive_rows.append(_row(f"naive_vs_ours/{name}", 2, f"naive ÷ ours: {name}", _med(s["naive_vs_ours"]),
                               _spread(s["naive_vs_ours"]),
                               why=f"naive {naive:.3f} s vs ours {ours:.3f} s per step ({s['naive_vs_ours']['n']} pairs)"))
    return rows + plain_rows + naive_rows


def memory_rows(training: dict) -> list[dict]:
    rows = []
    for method in run_names():  # every method's run and every variant's
        res = training.get(method) or {}
        stages = res.get("stages") or {}
        peaks = {name: rec.get("peak_rss_mb") for name, rec in stages.items()}
        gpu = {name: rec.get("peak_gpu_allocated_mb") for name, rec in stages.items() if "peak_gpu_allocated_mb" in rec}
        if not peaks or None in peaks.values():
            why, status = _missing(res)
            rows.append(_row(f"peak_memory/{method}", 6, f"peak memory: {method}", None, None, unit="MB",
                             why=why, status=status))
            continue
        value, unit = (max(gpu.values()), "MB GPU allocated") if gpu else (max(peaks.values()), "MB RSS")
        detail = ", ".join(f"{n} {v:.0f}" for n, v in (gpu or peaks).items())
        why = f"per stage: {detail} MB" + (f"; CPU RSS {max(peaks.values()):.0f} MB" if gpu else "")
        rows.append(_row(f"peak_memory/{method}", 6, f"peak memory: {method}", value, None, unit=unit, why=why))
    return rows


# ------------------------------------------------------------------ 3, 5: generation
def generation_rows(gen: dict) -> list[dict]:
    rows = []
    ci = gen.get("class_images")
    if ci:
        ours, stock = ci["ours"], ci["stock"]
        how = "extrapolated from {} steps".format(ci["short_steps"]) if ci.get("short_steps") else "measured at full steps"
        why = (f"ours {_med(ours['images_per_s']):.3g} img/s ({ours['sampler']} {ours['steps']} steps, batch {ours['batch']}) "
               f"vs stock {_med(stock['images_per_s']):.3g} img/s ({stock['sampler']} {stock['steps']} steps = "
               f"{stock['calls_full']} UNet calls, batch {stock['batch']}); {how}")
        rows.append(_row("class_images/ours_vs_stock", 3, "class images/s: ours ÷ stock PNDM-50",
                         _med(ci["ratio"]), _spread(ci["ratio"]), why=why))
    else:
        why, status = _missing(gen)
        rows.append(_row("class_images/ours_vs_stock", 3, "class images/s: ours ÷ stock PNDM-50", None, None,
                         why=why, status=status))
    ev = gen.get("evaluation")
    if ev:
        how = f"extrapolated from {ev['short_steps']} steps" if ev.get("short_steps") else "measured at full steps"
        ours_fixed, raw_fixed = _med(ev["ours"]["fixed_s"]), _med(ev["raw"]["fixed_s"])
        why = (f"batch {ev['batch']}, {ev['sampler']} {ev['steps']} steps, {how}; fixed part per batch: "
               f"ours {ours_fixed:.2f} s vs raw {raw_fixed:.2f} s (PNG writes, grid, record)")
        rows.append(_row("eval/generation_vs_raw", 5, "eval images/s: ours ÷ raw pipe", _med(ev["ratio"]),
                         _spread(ev["ratio"]), target=TARGETS["eval_generation"], why=why))
        share_why = (f"metrics {', '.join(ev['metrics'])} (FID/IS on {ev['fid_features']} features): "
                     f"{_med(ev['metric_pair_s']):.2f} s per batch of {ev['batch']}; loading CLIP/DINO + references "
                     f"once per evaluation: {_med(ev['metric_once_s']):.2f} s (not in the share)")
        encode = ev.get("metric_encode_s") or {}
        if encode:
            share_why += "; image features per evaluation: " + ", ".join(
                f"{kind.upper()} {_med(s):.2f} s" for kind, s in encode.items())
        rows.append(_row("eval/metric_share", 5, "metric time ÷ evaluation time", _med(ev["metric_share"]),
                         _spread(ev["metric_share"]), unit="share", target=TARGETS["metric_share"], why=share_why))
    else:
        for id_, figure, target, unit in (
                ("eval/generation_vs_raw", "eval images/s: ours ÷ raw pipe", "eval_generation", "x"),
                ("eval/metric_share", "metric time ÷ evaluation time", "metric_share", "share")):
            why, status = _missing(gen)
            rows.append(_row(id_, 5, figure, None, None, unit=unit, target=TARGETS[target], why=why, status=status))
    return rows


# ------------------------------------------------------------------ 4: end to end
def _checkpoints_per_stage(stages_cfg: dict, steps: dict[str, int]) -> dict[str, int]:
    cfg = OmegaConf.create({name: dict(stage, steps=steps.get(name, stage["steps"])) for name, stage in stages_cfg.items()})
    stages = parse_stages(cfg)
    counts = {s.name: 0 for s in stages}
    for step in checkpoint_steps(stages):
        owner = next(s for s in stages if s.start < step <= s.end)
        counts[owner.name] += 1
    return counts


def e2e_counts(training: dict) -> tuple[dict[str, int], dict[str, int], int]:
    """(two-stage steps per stage, DreamBooth steps per stage, class images) of the end-to-end figure.

    As the workers composed them (so `--set` overrides count), else as conf/ says; two-stage's UNet stage
    stops at E2E_TWO_STAGE_UNET_STEPS.
    """
    def configured(method: str) -> dict[str, dict]:
        return ((training.get(method) or {}).get("configured") or {}).get("stages") or method_stages(method)

    two = {name: int(stage["steps"]) for name, stage in configured("two_stage").items()}
    two.update({name: E2E_TWO_STAGE_UNET_STEPS for name in two if name == "unet"})
    dream = {name: int(stage["steps"]) for name, stage in configured("dreambooth").items()}
    n_class = ((training.get("dreambooth") or {}).get("configured") or {}).get("class_images") or class_image_count()
    return two, dream, int(n_class)


def _e2e_costs(training: dict, gen: dict, q: str = "median", steps_of: str = "ours",
               class_images_by: str = "ours") -> tuple[dict, dict]:
    """Seconds of each part of the two runs from the measured medians (or quartiles `q`).

    steps_of: "ours" (the real step) or "floor" (as if every step ran at its floor);
    class_images_by: "ours" (our generation) or "stock" (the stock PNDM-50 pipeline call).
    """
    ts, db = training["two_stage"], training["dreambooth"]
    def step(res: dict, stage: str) -> float:
        return summary(res["stages"][stage][steps_of])[q]

    ci = gen["class_images"][class_images_by]
    per_image = ci["full_s"][q] / ci["images_per_call"]
    ours_ci = gen["class_images"]["ours"]
    pipeline_load = gen["class_pipeline_load_s"]
    # fit() samples the last checkpoint (same for both): 25 DPM steps, batch 4, like our class images
    samples = pipeline_load + gen["samples_images"] * ours_ci["full_s"][q] / ours_ci["images_per_call"]

    two_steps, db_steps, n_class = e2e_counts(training)
    two_ckpts = sum(_checkpoints_per_stage(ts["configured"]["stages"], two_steps).values())
    two = {"load model": ts["prepare_s"], "cache latents": ts["latent_cache_s"]}
    two.update({f"{n} {stage} steps": n * step(ts, stage) for stage, n in two_steps.items()})
    two.update({f"{two_ckpts} checkpoints": two_ckpts * ts["checkpoint_s"], "samples": samples})
    db_ckpts = sum(_checkpoints_per_stage(db["configured"]["stages"], db_steps).values())
    dream = {
        "load model": db["prepare_s"],
        "load class-image pipeline": pipeline_load,
        f"{n_class} class images": n_class * per_image,
        "cache latents": db["latent_cache_s"] / db["latent_cache_images"] * (db["photos"] + n_class),
    }
    prior = {name for name, stage in db["configured"]["stages"].items() if stage.get("prior_loss_weight", 0) > 0}
    dream.update({f"{n} {stage} steps" + (" with prior" if stage in prior else ""): n * step(db, stage)
                  for stage, n in db_steps.items()})
    dream.update({f"{db_ckpts} checkpoints": db_ckpts * db["checkpoint_s"], "samples": samples})
    return two, dream


def _ratio(parts: tuple[dict, dict]) -> float:
    return sum(parts[0].values()) / sum(parts[1].values())


def end_to_end(training: dict, gen: dict) -> dict:
    two, dream = _e2e_costs(training, gen)
    lo = sum(_e2e_costs(training, gen, "p25")[0].values()) / sum(_e2e_costs(training, gen, "p75")[1].values())
    hi = sum(_e2e_costs(training, gen, "p75")[0].values()) / sum(_e2e_costs(training, gen, "p25")[1].values())
    return {
        "two_stage_s": two, "dreambooth_s": dream,
        "two_stage_total_s": sum(two.values()), "dreambooth_total_s": sum(dream.values()),
        "ratio": _ratio((two, dream)), "ratio_range": [lo, hi],
        # what-ifs that say where the ratio comes from
        "ratio_if_every_step_at_its_floor": _ratio(_e2e_costs(training, gen, steps_of="floor")),
        "ratio_vs_dreambooth_with_stock_class_images": _ratio(_e2e_costs(training, gen, class_images_by="stock")),
        "estimated": "sum of measured medians x counts: per-step times (ours), per-image class-image time, "
                     "model load, latent caching per photo, one real checkpoint (artifacts + resume state), the "
                     "samples fit() writes; the evaluation after training is left out (same per checkpoint for "
                     "every method). Parts come from different worker processes, so load changes between them "
                     "move this figure more than the interleaved ones.",
    }


def e2e_row(training: dict, gen: dict) -> tuple[dict, dict | None]:
    two_steps, db_steps, n_class = e2e_counts(training)
    figure = (f"end to end: two-stage {'+'.join(map(str, two_steps.values()))} ÷ DreamBooth {n_class} cls+"
              f"{'+'.join(map(str, db_steps.values()))}")
    try:
        e2e = end_to_end(training, gen)
    except (KeyError, TypeError, ZeroDivisionError) as error:
        missing = [m for m in ("two_stage", "dreambooth") if "stages" not in (training.get(m) or {})]
        missing += ["generation"] if "class_images" not in gen else []
        why = f"needs {', '.join(missing)}" if missing else f"{type(error).__name__}: {error}"
        return _row("e2e/two_stage_vs_dreambooth", 4, figure, None, None, target=TARGETS["e2e"], why=why,
                    status="not measured" if missing else "error"), None
    def top(parts: dict) -> str:
        return ", ".join(f"{k} {v:.0f} s" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:3])

    why = (f"estimated from measured parts: two-stage {e2e['two_stage_total_s']:.0f} s ({top(e2e['two_stage_s'])}) "
           f"vs DreamBooth {e2e['dreambooth_total_s']:.0f} s ({top(e2e['dreambooth_s'])}); with every step at its "
           f"floor {e2e['ratio_if_every_step_at_its_floor']:.3f}; vs a DreamBooth whose class images come from the "
           f"stock PNDM-50 pipeline {e2e['ratio_vs_dreambooth_with_stock_class_images']:.3f}")
    return _row("e2e/two_stage_vs_dreambooth", 4, figure, e2e["ratio"], e2e["ratio_range"], target=TARGETS["e2e"],
                why=why), e2e


def all_rows(training: dict, gen: dict) -> tuple[list[dict], dict | None]:
    rows = training_rows(training)
    e2e, e2e_detail = e2e_row(training, gen)
    rows += generation_rows(gen)
    rows.insert(len(rows) - 2, e2e)  # table order: ..., class images, e2e, eval
    rows += memory_rows(training)
    order = {id_: i for i, id_ in enumerate(row_ids())}
    rows.sort(key=lambda r: order.get(r["id"], len(order)))
    return rows, e2e_detail


# ------------------------------------------------------------------ the table
def _fmt(value, unit) -> str:
    if value is None:
        return "—"
    if unit == "share":
        return f"{value:.1%}"
    if unit.startswith("MB"):
        return f"{value:,.0f} MB"
    return f"{value:.3f}"


def format_table(rows: list[dict]) -> str:
    head = f"{'#':<2} {'figure':<58} {'target':<8} {'median':>9} {'spread (p25-p75)':>18}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        target = f"{r['target'][0]} {r['target'][1]:g}" if r["target"] else ""
        if r["unit"] == "share" and r["target"]:
            target = f"{r['target'][0]} {r['target'][1]:.0%}"
        spread = ""
        if r["spread"]:
            lo, hi = r["spread"]
            spread = f"{_fmt(lo, r['unit'])}-{_fmt(hi, r['unit'])}"
        lines.append(f"{r['item']:<2} {r['figure'][:58]:<58} {target:<8} {_fmt(r['value'], r['unit']):>9} "
                     f"{spread:>18}  {r['status']}")
        # the estimates and a variant's cost say what they are made of
        measured_detail = (r["item"] in (3, 4, 5) or r["id"].startswith("vs_plain/")) and r["value"] is not None
        if r["status"] not in ("met", "info", "not measured") or measured_detail:
            lines.append(f"{'':<3}  ↳ {r['why']}")
    return "\n".join(lines)
