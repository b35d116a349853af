"""The tables of docs/results.md "The study": the settings side by side (``paper``, ``calibrated`` and
their ``-authors`` units), the reported family of comparisons with Holm over exactly that family
(one family per metric, dense EPE first), the cross-setting differences (calibrated - paper,
paper-authors - paper), the grid response and the stiffness order with intervals over seeds x pairs.

Reads what ``benchmarks/study.py`` wrote into ``--study`` (``study_table.csv``,
``study_comparisons.csv``, ``grid_response.csv``, ``stiffness.csv``), writes ``study_report.md``
there (printed as well) and the forest plot of the first metric's family (``--figure``; pooled and
per seed, one panel per setting)::

    .venv/bin/python benchmarks/study_report.py --study outputs/study --figure docs/study_forest.png

Which comparisons docs/results.md reports is fixed here (``FAMILY``, ``CROSS_METHODS``), so each Holm
family is the set of rows a reader sees (one metric, pooled over seeds x pairs), not whatever
``study.py`` happened to compute. ``ants-synpreset`` is ANTs' antsRegistrationSyN[s] preset (the
practitioners' peer), ``ants-syn`` antspyx's quick ``SyN``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.atomic import atomic_write  # noqa: E402

#: the within-setting comparisons docs/results.md reports: (protocol, a, b), a - b in each reported metric
#: (``ants-synpreset``: the antsRegistrationSyN[s] preset; ``ants-syn``: antspyx's quick SyN)
FAMILY = (
    ("oracle", "elas-sas", "elas-g"), ("oracle", "diff-sas", "diff-g"), ("oracle", "elas-sas", "elas-sas@g"),
    ("oracle", "elas-sas+io", "elas-g+io"), ("oracle", "elas-sas (gradient)", "elas-g (gradient)"),
    ("oracle", "elas-sas (gradient)", "elas-sas"), ("oracle", "elas-sas+io", "elas-sas"),
    ("oracle", "elas-sas zero+io", "elas-sas+io"), ("oracle", "elas-g zero+io", "elas-g+io"),
    ("oracle", "elas-sas (csain)", "elas-sas"), ("oracle", "diff-sas (csain)", "diff-sas"),
    ("oracle", "elas-sas", "ants-syn"), ("oracle", "elas-sas+io", "ants-syn"),
    ("oracle", "elas-sas", "ants-synpreset"), ("oracle", "elas-sas+io", "ants-synpreset"),
    ("population", "elas-sas", "elas-g"), ("population", "elas-sas+io", "elas-g+io"),
    ("population", "elas-sas (gradient)", "elas-sas"), ("population", "elas-sas (csain)", "elas-g"),
    ("population", "elas-g+io", "elas-g"), ("population", "elas-sas+io", "ants-syn"),
    ("population", "elas-sas+io", "ants-synpreset"),
)
#: methods whose cross-setting differences (calibrated - paper; <setting>-authors - <setting>, the
#: authors' code against the paper text) docs/results.md reports, per protocol
CROSS_METHODS = (
    ("oracle", "elas-g"), ("oracle", "elas-sas"), ("oracle", "diff-g"), ("oracle", "diff-sas"),
    ("oracle", "elas-sas (csain)"), ("oracle", "elas-g+io"), ("oracle", "elas-sas+io"),
    ("population", "elas-sas"), ("population", "elas-sas+io"),
)
#: rows of the side-by-side table: (protocol, method); '' = no protocol (initial, SyN)
TABLE_ROWS = (
    ("", "initial"), ("", "ants-syn"), ("", "ants-synpreset"), ("oracle", "elas-g"), ("oracle", "elas-sas"), ("oracle", "diff-g"),
    ("oracle", "diff-sas"), ("oracle", "elas-sas (csain)"), ("oracle", "diff-sas (csain)"),
    ("oracle", "elas-sas (gradient)"), ("oracle", "elas-g+io"), ("oracle", "elas-sas+io"),
    ("oracle", "elas-g zero+io"), ("oracle", "elas-sas zero+io"), ("population", "elas-g"),
    ("population", "elas-sas"), ("population", "elas-g+io"), ("population", "elas-sas+io"),
)
CROSS = "calibrated - paper"
#: the metrics reported, the first one primary (synthetic data: dense EPE first, docs/results.md)
METRICS = ("dense_epe", "mean_dice")


def is_cross(setting: str) -> bool:
    """A cross-setting comparison (``"<a> - <b>"``, e.g. ``calibrated - paper``, ``paper-authors - paper``)."""
    return " - " in setting


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--study", default=os.path.join("outputs", "study"), help="folder written by benchmarks/study.py")
    p.add_argument("--figure", default="", help="forest plot of the reported family (.png; '' = none)")
    p.add_argument("--oracle", default="",
                   help="bench_oracle.py's oracle_pairs.csv on the study's data: its tissue-specific gain (no network) "
                        "is set beside the -sas - g rows in dense EPE ('' = none)")
    p.add_argument("--metrics", nargs="+", default=list(METRICS),
                   help="metrics of the comparisons, one Holm family each; the first is the figure's and the primary "
                        "(dense_epe: mm, lower is better; mean_dice: higher is better)")
    return p


def _read(study: str, name: str):
    import pandas as pd

    path = os.path.join(study, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run benchmarks/study.py first (it writes it after the units)")
    df = pd.read_csv(path, dtype={"seed": str})
    if "protocol" in df:
        df["protocol"] = df["protocol"].fillna("")
    return df


def reported_family(comp, metric: str = "mean_dice"):
    """The reported rows of ``study_comparisons.csv`` (every seed scope) for ``metric``, with
    ``p_family``: Holm over the pooled rows of the family (every setting's ``FAMILY`` rows and
    the ``CROSS_METHODS`` rows of every cross-setting comparison, ``"<a> - <b>"``, that are present).
    Rows keep their order."""
    import pandas as pd

    from hypermorph_spatially_adaptive.intervals import holm

    settings = list(comp["setting"].unique())
    wanted = [(s, prot, f"{a} - {b}") for s in settings if not is_cross(s) for prot, a, b in FAMILY]
    for cross in (s for s in settings if is_cross(s)):
        a, b = cross.split(" - ")
        wanted += [(cross, prot, f"{m} [{a}] - {m} [{b}]") for prot, m in CROSS_METHODS]
    keys = pd.DataFrame(wanted, columns=["setting", "protocol", "comparison"])
    fam = keys.merge(comp[comp["metric"] == metric], on=["setting", "protocol", "comparison"], how="inner")
    pooled = fam["seed"].astype(str) == "all"
    fam["p_family"] = np.nan
    fam.loc[pooled, "p_family"] = holm(fam.loc[pooled, "p"].to_numpy())
    return fam


def _cell(r) -> str:
    return f"{r['mean_diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"


def _p(x: float) -> str:
    return "-" if not np.isfinite(x) else (f"{x:.2g}" if x < 0.995 else "1")


def _per_seed(rows) -> str:
    per = rows[rows["seed"].astype(str) != "all"]
    return ", ".join(f"{v:+.3f}" for v in per.sort_values("seed")["mean_diff"]) or "-"


def _setting_cells(settings: Sequence[str], groups, key, fmt, empty: str) -> List[str]:
    """One cell group per setting: ``fmt(rows)`` of the rows of ``groups[setting]`` with index
    ``key``, or ``empty`` when that setting has none."""
    cells = []
    for s in settings:
        g = groups.get(s)
        rows = g.loc[[key]] if g is not None and key in g.index else None
        cells.append(empty if rows is None else fmt(rows))
    return cells


def _family_cell(rows) -> str:
    r = rows[rows["seed"].astype(str) == "all"].iloc[0]
    return (f"{_cell(r)} ({int(r['n_seeds'])} x {int(r['n_pairs'])}) | {_p(r['p'])} / {_p(r['p_family'])} | "
            f"{_per_seed(rows)}")


def family_markdown(fam) -> str:
    """One row per reported comparison, one column group per setting: pooled difference [95 %
    interval], p, Holm p over the family, and the per-seed differences."""
    within = fam[~fam["setting"].map(is_cross)]
    settings = list(dict.fromkeys(within["setting"]))
    groups = {s: g.set_index(["protocol", "comparison"]) for s, g in within.groupby("setting", sort=False)}
    head = "| protocol | a - b | " + " | ".join(f"{s}: pooled [95 %] | p / p_H | per seed" for s in settings) + " |"
    lines = [head, "|---|---|" + "---|---|---|" * len(settings)]
    for key in dict.fromkeys(zip(within["protocol"], within["comparison"])):
        cells = _setting_cells(settings, groups, key, _family_cell, "- | - | -")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cross_markdown(fam, cross: str = CROSS) -> str:
    """One cross-setting comparison (``"<a> - <b>"``) per reported method: pooled difference [95 %],
    p / Holm p (family)."""
    rows = fam[(fam["setting"] == cross) & (fam["seed"].astype(str) == "all")]
    if rows.empty:
        return ""
    a = cross.split(" - ")[0]
    lines = [f"| protocol | method | {cross} [95 %] | seeds x pairs | p / p_H |", "|---|---|---|---|---|"]
    for _, r in rows.iterrows():
        method = r["comparison"].split(f" [{a}]")[0]
        lines.append(f"| {r['protocol']} | {method} | {_cell(r)} | {int(r['n_seeds'])} x {int(r['n_pairs'])} | "
                     f"{_p(r['p'])} / {_p(r['p_family'])} |")
    return "\n".join(lines) + "\n"


def _table_cell(rows) -> str:
    r = rows.iloc[0]
    return (f"{r['mean_dice']:.3f} ({r['mean_dice_seed_range']:.3f}) | {r['hd95']:.2f} | {r['dense_epe']:.2f} | "
            f"{r['percent_neg_jac']:.3f}")


def settings_table_markdown(table, rows: Sequence = TABLE_ROWS) -> str:
    """Both settings side by side: mean Dice (range of the seed means), HD95, dense EPE, %negJ
    per setting; s/pair of the first setting that has the row. A row without protocol ('')
    takes the first protocol's entry (initial and SyN are the same in every protocol)."""
    settings = list(dict.fromkeys(table["setting"]))
    groups = {s: g.drop_duplicates("method").set_index("method") for s, g in table.groupby("setting", sort=False)}
    by_protocol = {s: g.set_index(["protocol", "method"]) for s, g in table.groupby("setting", sort=False)}
    head = "| protocol | row | " + " | ".join(f"{s}: Dice (seed range) | HD95 | EPE | %negJ" for s in settings)
    lines = [head + " | s/pair |", "|---|---|" + "---|---|---|---|" * len(settings) + "---|"]
    for prot, method in rows:
        src, key = (groups, method) if prot == "" else (by_protocol, (prot, method))
        found = [src[s].loc[[key]] for s in settings if key in src[s].index]
        if not found:
            continue
        cells = _setting_cells(settings, src, key, _table_cell, "- | - | - | -")
        seconds = found[0]["seconds"].iloc[0] if "seconds" in found[0] else np.nan
        lines.append(f"| {prot or '-'} | {method} | " + " | ".join(cells) + " | "
                     + (f"{seconds:.2f}" if np.isfinite(seconds) else "-") + " |")
    return "\n".join(lines) + "\n"


def response_markdown(response) -> str:
    """Grid response per setting and regularizer: mean over seeds (per-seed values)."""
    lines = ["| setting | regularizer | grid Dice spread: mean (per seed) | -g inside the box: mean (per seed) |",
             "|---|---|---|---|"]
    for (s, reg), g in response.groupby(["setting", "regularizer"], sort=False):
        g = g.sort_values("seed")
        spread = ", ".join(f"{v:.3f}" for v in g["grid_spread_mean"])
        inside = ", ".join(f"{100 * v:.0f} %" for v in g["interior_fraction"])
        lines.append(f"| {s} | {reg} | {g['grid_spread_mean'].mean():.3f} ({spread}) | "
                     f"{100 * g['interior_fraction'].mean():.0f} % ({inside}) |")
    return "\n".join(lines) + "\n"


def stiffness_summary(stiff):
    """Per setting, objective and parameter (mu, lambda): the mean Spearman over seeds x pairs,
    its crossed 95 % interval (:func:`.intervals.crossed_interval` on the seeds x pairs table;
    pairs missing under a seed dropped; clipped to [-1, 1], the range of a Spearman correlation,
    which the t interval exceeds with few seeds), the per-seed means and n."""
    import pandas as pd

    from hypermorph_spatially_adaptive.intervals import crossed_interval

    rows = []
    for (s, obj), g in stiff.groupby(["setting", "objective"], sort=False):
        for param in ("mu", "lambda"):
            t = g.pivot_table(index="seed", columns="pair_id", values=f"spearman_{param}").dropna(axis=1)
            if t.shape[1] < 2:
                continue
            lo, hi, _ = crossed_interval(t.to_numpy(np.float64))
            rows.append({"setting": s, "objective": obj, "parameter": param, "mean": float(t.to_numpy().mean()),
                         "ci_low": max(-1.0, float(lo)), "ci_high": min(1.0, float(hi)), "n_seeds": t.shape[0], "n_pairs": t.shape[1],
                         "per_seed": ", ".join(f"{v:.2f}" for v in t.mean(axis=1))})
    return pd.DataFrame(rows)


def stiffness_markdown(summary) -> str:
    lines = ["| setting | identification | parameter | mean Spearman [95 %] | seeds x pairs | per seed |",
             "|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        lines.append(f"| {r['setting']} | {r['objective']} | {r['parameter']} | {r['mean']:+.2f} "
                     f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | {r['n_seeds']} x {r['n_pairs']} | {r['per_seed']} |")
    return "\n".join(lines) + "\n"


#: the -sas vs -g rows set beside the oracle's gain (protocol, a, b)
CLAIM_ROWS = (("oracle", "elas-sas", "elas-g"), ("oracle", "elas-sas+io", "elas-g+io"),
              ("population", "elas-sas", "elas-g"), ("population", "elas-sas+io", "elas-g+io"))


def oracle_gain(oracle):
    """What tissue-specific regularization could gain without a network (``bench_oracle.py``'s
    ``oracle_pairs.csv``): per selection, n pairs, mean dense EPE (mm) of the best global and the
    tissue-specific setting, their paired difference tissue - global with a 95 % t interval over
    the pairs, and how many pairs the tissue-specific setting wins."""
    import pandas as pd

    from hypermorph_spatially_adaptive.intervals import one_sample_interval

    rows = []
    for sel, g in oracle.groupby("selection", sort=False):
        d = (g["epe_tissue"] - g["epe_global"]).to_numpy(np.float64)
        lo, hi, _ = one_sample_interval(d, method="t") if d.size >= 2 else (np.nan, np.nan, np.nan)
        rows.append({"selection": sel, "n": d.size, "epe_global": g["epe_global"].mean(),
                     "epe_tissue": g["epe_tissue"].mean(), "mean_diff": d.mean(), "ci_low": float(lo),
                     "ci_high": float(hi), "wins": int((d < 0).sum())})
    return pd.DataFrame(rows)


def network_oracle_gain(net):
    """The networks' own oracle (``network_epe_oracle.csv`` of ``study.py``: per setting, seed and
    test pair, the dense EPE of the elastic SA and global models with parameters chosen on the true
    EPE): per setting, elas-sas - elas-g as the study's other rows (:func:`.tables.paired_comparison`:
    crossed seeds x pairs interval, pairs missing under a seed dropped), with the per-seed means over
    the same pairs, the mean EPE of both models over the kept pairs and the share of cells where -sas is lower."""
    import pandas as pd

    from hypermorph_spatially_adaptive.tables import difference_table, paired_comparison

    rows = []
    for setting, g in net.groupby("setting", sort=False):
        long = pd.concat([g.assign(method=m, dense_epe=g[col]) for m, col in (("elas-sas", "sas"), ("elas-g", "g"))])
        comp = paired_comparison(long, [("elas-sas", "elas-g")], metrics=["dense_epe"])
        if comp.empty:
            continue
        cells = difference_table(long, "elas-sas", "elas-g", "dense_epe").dropna(axis=1)  # the pairs comp keeps
        kept = g[g["pair_id"].isin(cells.columns)]
        rows.append({"setting": setting, **comp.iloc[0][["n_seeds", "n_pairs", "mean_diff", "ci_low", "ci_high", "p"]],
                     "epe_g": kept["g"].mean(), "epe_sas": kept["sas"].mean(),
                     "per_seed": ", ".join(f"{v:+.3f}" for v in cells.mean(axis=1)),
                     "sas_lower": float((cells.to_numpy() < 0).mean())})
    return pd.DataFrame(rows)


def claim_markdown(gain, fam_epe, net_gain=None) -> str:
    """The oracle's gain beside the networks' and the refined rows' -sas - g (dense EPE, mm): the
    first rows say what the data allows, the others what the models deliver (pooled over seeds x
    pairs per setting, with their intervals and per-seed values); ``net_gain``
    (:func:`network_oracle_gain`) adds, per setting, the networks with EPE-chosen parameters."""
    lines = ["| what | a - b (dense EPE, mm) | difference [95 %] | n | note |", "|---|---|---|---|---|"]
    for _, r in gain.iterrows():
        rel = 100 * r["mean_diff"] / r["epe_global"] if r["epe_global"] else np.nan
        lines.append(f"| oracle, {r['selection']} (no network) | tissue-specific - best global | {_cell(r)} | "
                     f"{int(r['n'])} pairs | {r['epe_global']:.3f} -> {r['epe_tissue']:.3f} mm ({rel:+.0f} %), "
                     f"tissue lower on {int(r['wins'])}/{int(r['n'])} |")
    pooled = fam_epe[fam_epe["seed"].astype(str) == "all"]
    for setting in dict.fromkeys(s for s in fam_epe["setting"] if not is_cross(s)):
        for prot, a, b in CLAIM_ROWS:
            sel = fam_epe[(fam_epe["setting"] == setting) & (fam_epe["protocol"] == prot)
                          & (fam_epe["comparison"] == f"{a} - {b}")]
            one = pooled.loc[pooled.index.intersection(sel.index)]
            if one.empty:
                continue
            r = one.iloc[0]
            lines.append(f"| {setting}, {prot} | {a} - {b} | {_cell(r)} | {int(r['n_seeds'])} x {int(r['n_pairs'])} | "
                         f"per seed {_per_seed(sel)} |")
        if net_gain is not None and len(net_gain):
            for _, r in net_gain[net_gain["setting"] == setting].iterrows():
                lines.append(f"| {setting}, networks' EPE oracle (parameters chosen per pair on the true EPE) | "
                             f"elas-sas - elas-g | {_cell(r)} | {int(r['n_seeds'])} x {int(r['n_pairs'])} | "
                             f"{r['epe_g']:.3f} -> {r['epe_sas']:.3f} mm, -sas lower in {100 * r['sas_lower']:.0f} % "
                             f"of cells; per seed {r['per_seed']} |")
    return "\n".join(lines) + "\n"


def stiffness_across_markdown(across) -> str:
    """Subject-specific recovery (``stiffness_across.csv``, ``--stiffness-spread`` studies): per
    setting, identification, parameter and tissue, the Spearman of identified vs true values across
    the test pairs, mean over seeds with a 95 % t interval over the seeds and the per-seed values."""
    from hypermorph_spatially_adaptive.intervals import one_sample_interval

    lines = ["| setting | identification | parameter | tissue | Spearman across pairs: mean over seeds [95 %] | "
             "per seed |", "|---|---|---|---|---|---|"]
    for (s, obj, param, tissue), g in across.groupby(["setting", "objective", "param", "tissue"], sort=False):
        rho = g.sort_values("seed")["spearman"].to_numpy(np.float64)
        ok = rho[np.isfinite(rho)]
        cell = "-"
        if ok.size >= 2:
            lo, hi, _ = one_sample_interval(ok, method="t")
            cell = f"{ok.mean():+.2f} [{max(-1.0, float(lo)):+.2f}, {min(1.0, float(hi)):+.2f}]"
        lines.append(f"| {s} | {obj} | {param} | {tissue} | {cell} | " + ", ".join(f"{v:+.2f}" for v in rho) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = build_parser().parse_args(argv)
    comp = _read(args.study, "study_comparisons.csv")
    parts = ["## Settings side by side, mean over seeds x pairs", settings_table_markdown(_read(args.study, "study_table.csv"))]
    families = {}
    for metric in args.metrics:
        fam = reported_family(comp, metric)
        if fam.empty:
            raise ValueError(f"{args.study}/study_comparisons.csv has none of the reported comparisons for {metric}")
        families[metric] = fam
        n_family = int((fam["seed"].astype(str) == "all").sum())
        parts += [f"## Reported comparisons: {metric} (p_H: Holm over these {n_family} pooled rows)", family_markdown(fam)]
        for cross in dict.fromkeys(s for s in fam["setting"] if is_cross(s)):
            parts += [f"### {cross}: {metric}", cross_markdown(fam, cross)]
    if args.oracle and "dense_epe" in families:
        import pandas as pd

        gain = oracle_gain(pd.read_csv(args.oracle, dtype={"pair_id": str}))
        net_path = os.path.join(args.study, "network_epe_oracle.csv")
        net = network_oracle_gain(pd.read_csv(net_path, dtype={"pair_id": str})) if os.path.isfile(net_path) else None
        parts.insert(2, claim_markdown(gain, families["dense_epe"], net))
        parts.insert(2, "## What tissue-specific regularization could gain here, and what the models deliver")
    parts += ["## Grid response of the global models", response_markdown(_read(args.study, "grid_response.csv")),
              "## Stiffness order within each pair (elastic SA model vs the pair's true Lame values)",
              stiffness_markdown(stiffness_summary(_read(args.study, "stiffness.csv")))]
    if os.path.isfile(os.path.join(args.study, "stiffness_across.csv")):
        parts += ["## Subject-specific stiffness across pairs (elastic SA model)",
                  stiffness_across_markdown(_read(args.study, "stiffness_across.csv"))]
    text = "\n".join(parts)

    out = os.path.join(args.study, "study_report.md")
    atomic_write(out, text)
    if args.figure:
        from hypermorph_spatially_adaptive.figures import plot_comparison_forest

        fam = families[args.metrics[0]]
        within = fam[~fam["setting"].map(is_cross)].assign(p_holm=fam["p_family"])
        plot_comparison_forest(within, args.figure, args.metrics[0])
        print(f"[study_report] wrote {args.figure}", flush=True)
    print(text, flush=True)
    print(f"[study_report] wrote {out}", flush=True)
    return out


if __name__ == "__main__":
    from hypermorph_spatially_adaptive.cli import cli_main

    cli_main(main)
